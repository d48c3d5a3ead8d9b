"""What the command-line tools share: the argument parser, the entry helper, worker processes, progress bars.

Every tool (`benchmark`, `aqr_benchmark`, `demo`, `selftest`) has a ``main(argv=None)`` and runs it through
`run_cli` -- as ``python -m sparse_bias.<tool>`` and as its console script (``cli()``) alike:

    def cli() -> int:
        return run_cli(main)

    if __name__ == "__main__":
        sys.exit(cli())
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any, Callable, Dict, Optional, Sequence

__all__ = ["Parser", "run_cli", "run_worker", "report_to_parent", "write_json", "progress_bar"]


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` showing every default in ``--help`` and reporting a bad argument in one line
    on stderr (``prog: error: ... (see --help)``, exit status 2) instead of the usage block."""

    def __init__(self, prog: str, description: str, **kwargs):
        super().__init__(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         **kwargs)

    @classmethod
    def for_tool(cls, name: str, doc: str, **kwargs) -> "Parser":
        """The parser of ``python -m sparse_bias.<name>``, described by the first line of the tool's docstring."""
        return cls(f"python -m sparse_bias.{name}", doc.splitlines()[0], **kwargs)

    def add_worker_arguments(self, modes: Sequence[str], default: str) -> None:
        """The hidden ``--worker VARIANT --mode MODE`` of a tool that measures each variant in a fresh process of
        its own (see `run_worker`)."""
        self.add_argument("--worker", default=None, help=argparse.SUPPRESS)
        self.add_argument("--mode", default=default, choices=list(modes), help=argparse.SUPPRESS)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def run_cli(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run a tool's ``main(argv)`` (``argv`` None: the command line) and return the exit status of the command.

    ``main`` returns its report (a list or a dict: exit status 0) or an ``int`` exit status (the self-test's 1 when
    a check failed). A bad argument exits with status 2 inside ``main`` (`Parser.error`).

    Example:
        >>> run_cli(lambda argv: {"rows": []}), run_cli(lambda argv: 1)
        (0, 1)
    """
    result = main(argv)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def run_worker(module: str, argv: Sequence[str], what: str) -> Dict:
    """Run ``python -m <module> <argv>`` in a fresh process and return the JSON object it printed last (its
    `report_to_parent`); a failing worker raises ``RuntimeError`` with the end of its stderr, naming ``what``."""
    res = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report_to_parent(result: Dict) -> None:
    """A worker's answer to `run_worker`: one JSON line on stdout."""
    print(json.dumps(result))


def write_json(path: str, obj: Any, **kwargs) -> None:
    """Write a tool's report (``--json PATH``), indented; ``kwargs`` go to ``json.dump``."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, **kwargs)


def progress_bar(iterable=None, *, desc: str, unit: str, enabled: bool = True, **kwargs):
    """A tqdm bar on stderr, shown only when stderr is a terminal (and ``enabled``), so piped output stays clean."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, file=sys.stderr, disable=None if enabled else True, **kwargs)
