"""Every script in examples/ runs in quick mode (SPARSE_BIAS_QUICK=1), so the examples cannot rot."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = sorted(pathlib.Path(__file__).resolve().parent.parent.joinpath("examples").glob("*.py"))


def run_example(path, tmp_path):
    env = dict(os.environ, SPARSE_BIAS_QUICK="1", SPARSE_BIAS_OUT=str(tmp_path), MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    assert path.read_text().count("# %%") >= 2, "examples are jupytext percent scripts"
    run_example(path, tmp_path)


@pytest.mark.parametrize("stem, name", [("cmt_decoder_training", "sparse bias"),
                                        ("cmt_aqr_training", "AQR + sparse bias")])
def test_training_example_learns_with_bias_and_beats_the_control(stem, name, tmp_path):
    out = run_example(EXAMPLES[[p.stem for p in EXAMPLES].index(stem)], tmp_path)
    losses = {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
              for m in re.finditer(r"^(.+?) loss: first ([\d.]+), final \(mean of last 20 steps\) ([\d.]+)", out, re.M)}
    first, final = losses[name]
    assert final < 0.7 * first
    assert final < losses["no bias (control)"][1]
