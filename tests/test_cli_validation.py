"""Parse-time validation of every numeric option of the four command-line tools (one line on stderr, exit status
2), ``--quick`` never overriding a value typed on the command line, ``--help`` stating each default once, and the
workers' progress reaching the parent's bar."""
import importlib
import re
import subprocess
import sys

import pytest

from sparse_bias.tools import cli

TOOLS = ["benchmark", "aqr_benchmark", "demo", "selftest"]


def parser_of(tool):
    mod = importlib.import_module(f"sparse_bias.tools.{tool}")
    return getattr(mod, "_parser", None)


BAD = [
    ("benchmark", ["--queries", "0"], "--queries"), ("benchmark", ["--repeats", "0"], "--repeats"),
    ("benchmark", ["--bev-window", "4"], "--bev-window"), ("benchmark", ["--cam-window", "0"], "--cam-window"),
    ("benchmark", ["--bev-window", "-3"], "--bev-window"), ("benchmark", ["--batch-size", "0"], "--batch-size"),
    ("benchmark", ["--heads", "-1"], "--heads"), ("benchmark", ["--head-dim", "0"], "--head-dim"),
    ("benchmark", ["--check-queries", "0"], "--check-queries"), ("benchmark", ["--dropout", "-0.1"], "--dropout"),
    ("benchmark", ["--dropout", "1"], "--dropout"), ("benchmark", ["--max-dense-gib", "0"], "--max-dense-gib"),
    ("benchmark", ["--queries", "1.5"], "--queries"),
    ("benchmark", ["--quick", "--queries", "-5"], "--queries"), ("benchmark", ["--quick", "--repeats", "0"], "--repeats"),
    ("aqr_benchmark", ["--heads", "3", "--quick"], "--heads 3"), ("aqr_benchmark", ["--queries", "0"], "--queries"),
    ("aqr_benchmark", ["--embed-dims", "0"], "--embed-dims"), ("aqr_benchmark", ["--bev-window", "4"], "--bev-window"),
    ("aqr_benchmark", ["--cam-window", "2"], "--cam-window"), ("aqr_benchmark", ["--repeats", "0"], "--repeats"),
    ("aqr_benchmark", ["--check-queries", "-1"], "--check-queries"),
    ("aqr_benchmark", ["--batch-size", "0"], "--batch-size"),
    ("demo", ["--queries", "-5"], "--queries"), ("demo", ["--batch-size", "0"], "--batch-size"),
    ("demo", ["--window", "15", "4"], "--window"), ("demo", ["--seed", "-1"], "--seed"),
    ("demo", ["--quick", "--queries", "0"], "--queries"),
    ("selftest", ["--queries", "0"], "--queries"), ("selftest", ["--window", "4"], "--window"),
    ("selftest", ["--repeats", "0"], "--repeats"), ("selftest", ["--quick", "--window", "6"], "--window"),
]


@pytest.mark.parametrize("tool, argv, names", BAD)
def test_bad_numbers_are_one_line_and_exit_2_in_process(tool, argv, names, capsys):
    main = importlib.import_module(f"sparse_bias.tools.{tool}").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m sparse_bias.tools.{tool}: error:") and names in lines[0], err


@pytest.mark.parametrize("tool, argv", [("benchmark", ["--queries", "0"]), ("benchmark", ["--repeats", "0"]),
                                        ("benchmark", ["--bev-window", "4"]), ("demo", ["--queries", "-5"]),
                                        ("aqr_benchmark", ["--heads", "3", "--quick"])])
def test_the_reported_cases_exit_2_with_one_line(tool, argv):
    res = subprocess.run([sys.executable, "-m", f"sparse_bias.tools.{tool}"] + argv, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_heads_error_names_what_the_user_typed(capsys):
    from sparse_bias.tools import aqr_benchmark
    for argv, says in ((["--heads", "3", "--quick"], "--embed-dims, which is 32 with --quick"),
                       (["--heads", "3"], "--embed-dims, 256 by default"),
                       (["--heads", "5", "--embed-dims", "48"], "--embed-dims 48")):
        with pytest.raises(SystemExit):
            aqr_benchmark.main(argv)
        err = capsys.readouterr().err
        assert f"--heads {argv[1]} must divide " + says in err, err
    args = aqr_benchmark._parser().parse_args(["--heads", "3", "--quick", "--embed-dims", "48"])
    assert (args.heads, args.embed_dims, args.queries) == (3, 48, 32)


def test_quick_keeps_values_given_explicitly():
    from sparse_bias.tools import aqr_benchmark, benchmark
    from sparse_bias.tools import selftest as st
    args = benchmark._parser().parse_args(["--quick", "--repeats", "5"])
    assert (args.repeats, args.queries, args.config, args.batch_size, args.heads) == (5, 32, "small", 1, 2)
    args = benchmark._parser().parse_args(["--quick", "--queries", "48", "--config", "fusion"])
    assert (args.queries, args.config, args.repeats) == (48, "fusion", 1) and args._explicit == {"queries", "config"}
    args = benchmark._parser().parse_args([])
    assert (args.queries, args.config, args.repeats, args.batch_size, args.heads) == (900, "fusion", 5, 2, 8)
    assert aqr_benchmark._parser().parse_args(["--quick", "--repeats", "2"]).repeats == 2
    args = st._parser().parse_args(["--quick", "--queries", "40"])
    assert (args.queries, args.window, args.layout, args.repeats) == (40, 5, "small", 1)


def test_benchmark_windows_default_by_mode(monkeypatch):
    from sparse_bias.tools import benchmark
    seen = {}

    def fake_sweep(args, spec):
        seen.update(bev=args.bev_window, cam=args.cam_window)
        return []
    monkeypatch.setattr(benchmark, "sweep", fake_sweep)
    benchmark.main(["--quick", "--sweep"])
    assert seen == {"bev": 5, "cam": 5}
    benchmark.main(["--quick", "--sweep", "--bev-window", "7"])
    assert seen == {"bev": 7, "cam": 5}


def test_selftest_function_validates_its_sizes():
    from sparse_bias.tools.selftest import selftest

    for kwargs in ({"queries": 0}, {"window": 4}, {"repeats": 0}, {"layout": "huge"}):
        with pytest.raises(ValueError):
            selftest("cpu", ["float32"], quick=True, log=lambda line: None, progress=False, **kwargs)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_states_each_default_once_and_no_flag_as_true(tool):
    res = subprocess.run([sys.executable, "-m", f"sparse_bias.tools.{tool}", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0
    text = res.stdout
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    assert not re.search(r"\(default \d", text), text                    # "(default 900) (default: 900)"
    blocks = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    for block in blocks:
        if not block.strip() or block.startswith("-h"):
            continue
        flat = " ".join(block.split())
        assert flat.count("(default") == 1, flat
    for flag in ("--forward-only", "--no-check", "--no-timing", "--no-attention", "--quick"):
        for block in blocks:
            if block.startswith(flag + " ") or block.startswith(flag + "\n"):
                assert "(default: off)" in " ".join(block.split()), block


def test_formatter_leaves_flags_and_stated_defaults_alone():
    p = cli.Parser("prog", "test")
    p.add_argument("--on", action="store_true", help="a flag")
    p.add_argument("--off", dest="x", action="store_false", help="another")
    p.add_argument("--n", type=cli.positive_int, default=3, help="a number")
    p.add_argument("--m", type=cli.positive_int, default=3, help="a number (default: three)")
    p.add_argument("--k", type=cli.positive_int, default=3, quick=1, help="a size")
    text = " ".join(p.format_help().split())
    assert "a flag (default: off)" in text and "another (default: off)" in text
    assert "a number (default: 3)" in text and "(default: three) (default" not in text
    assert "a size (default: 3; 1 with --quick)" in text


def test_worker_progress_reaches_the_parent_bar():
    class Bar:                                        # what run_worker needs of a tqdm bar
        disable, n, total = False, 0, None
        seen = []

        def refresh(self):
            self.seen.append((self.n, self.total))
    bar = Bar()
    argv = ["--worker", "-", "--mode", "time", "--queries", "8", "--config", "small", "--batch-size", "1",
            "--heads", "2", "--repeats", "1", "--bev-window", "3", "--cam-window", "3",
            "--check-variants", "sdpa,sparse-auto"]
    result = cli.run_worker("sparse_bias.tools.benchmark", argv, "test worker", bar=bar)
    assert set(result) == {"sdpa", "sparse-auto"}
    assert bar.seen[-1] == (8, 8) and len(bar.seen) == 9           # (1 warm-up + 1 repeat) x 2 variants x 2 passes
    result = cli.run_worker("sparse_bias.tools.benchmark", argv, "test worker")      # no bar: no progress lines
    assert set(result) == {"sdpa", "sparse-auto"}
