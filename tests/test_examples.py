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


def assert_one_thread_unless_told(out):
    """Models this small run on one thread unless OMP_NUM_THREADS says otherwise (torch's own layers on shared
    cores wait for a time slice per parallel region)."""
    assert f"threads: {os.environ.get('OMP_NUM_THREADS', '1')} " in out, out[:500]


def training_losses(out):
    return {m.group(1).strip(): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^(.+?) loss: first ([\d.]+), final \(mean of last 20 steps\) ([\d.]+)", out, re.M)}


def test_training_example_learns_with_bias_and_beats_the_control(tmp_path):
    out = run_example(EXAMPLES[[p.stem for p in EXAMPLES].index("cmt_decoder_training")], tmp_path)
    assert_one_thread_unless_told(out)
    losses = training_losses(out)
    first, final = losses["sparse bias"]
    assert final < 0.7 * first
    assert final < losses["no bias (control)"][1]


def test_aqr_example_routes_each_query_to_the_sensor_that_works(tmp_path):
    """On held-out batches, queries whose LiDAR failed weight the camera up and the LiDAR down, and vice versa
    (quick mode, seed 0; the smallest gap over seeds 0-4 is 1.58 of the asserted 1.0); the task loss falls
    and beats the model without the bias."""
    out = run_example(EXAMPLES[[p.stem for p in EXAMPLES].index("cmt_aqr_training")], tmp_path)
    assert_one_thread_unless_told(out)
    losses = training_losses(out)
    first, final = losses["AQR + sparse bias"]
    assert final < 0.7 * first
    assert final < losses["no bias (control)"][1]
    weights = {m.group(1).strip(): (int(m.group(2)), float(m.group(3)), float(m.group(4)))
               for m in re.finditer(r"^held-out AQR weights, (.+?) queries \(\s*(\d+)\): lidar ([-+\d.]+), "
                                    r"camera ([-+\d.]+)", out, re.M)}
    assert set(weights) == {"lidar failed", "camera failed", "both work"}, out[-2000:]
    n, lidar, camera = weights["lidar failed"]
    assert n >= 50 and lidar < 0 < camera and camera - lidar > 1.0, weights
    n, lidar, camera = weights["camera failed"]
    assert n >= 50 and camera < 0 < lidar and lidar - camera > 1.0, weights
    n, lidar, camera = weights["both work"]
    assert lidar > 0 and camera > 0, weights
