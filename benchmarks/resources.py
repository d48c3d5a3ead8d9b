"""Peak RAM and wall time of the set-up-free commands a user runs: the demo, each example, the test suite.

    python benchmarks/resources.py [--only demo quickstart ...] [--json out.json]

Each command runs in a fresh child process; its peak RSS is the largest resident set of that process tree
(``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a dedicated waiter, which counts the largest child, the
benchmark's worker processes included), its time the wall clock. The README's "Memory and time" table comes
from this script. ``make test`` is timed the same way (its peak is that of the largest test process).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PY = sys.executable
COMMANDS = {
    "demo": [PY, "-m", "sparse_bias.tools.demo", "--out", "demo_out"],
    **{p.stem: [PY, str(p)] for p in sorted((ROOT / "examples").glob("*.py"))},
    "make test": ["make", "test"],
}

_WAITER = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(json.dumps(dict(rc=rc, seconds=time.perf_counter() - t,
                      peak_gib=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)))
"""


def measure(cmd):
    """``{rc, seconds, peak_gib}`` of ``cmd`` (a fresh waiter process, so earlier runs do not count)."""
    res = subprocess.run([PY, "-c", _WAITER] + cmd, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, SPARSE_BIAS_OUT="examples_out"))
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/resources.py", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(COMMANDS), default=[n for n in COMMANDS if n != "make test"],
                        help="commands to measure (default: the demo and every example)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'command':28s} {'time [s]':>9s} {'peak RSS [GiB]':>15s}  exit")
    for name in args.only:
        r = dict(command=" ".join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c
                                  for c in COMMANDS[name][1:] if c != PY) if name != "make test" else "make test",
                 name=name, **measure(COMMANDS[name]))
        rows.append(r)
        print(f"{name:28s} {r['seconds']:9.0f} {r['peak_gib']:15.2f}  {r['rc']}", flush=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
