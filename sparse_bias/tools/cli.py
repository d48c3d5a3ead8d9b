"""What the command-line tools share: the argument parser, the entry helper, worker processes, progress bars.

Every tool (`benchmark`, `aqr_benchmark`, `demo`, `selftest`) has a ``main(argv=None)`` and runs it through
`run_cli` -- as ``python -m sparse_bias.<tool>`` and as its console script (``cli()``) alike:

    def cli() -> int:
        return run_cli(main)

    if __name__ == "__main__":
        sys.exit(cli())

Numeric options are validated when the command line is parsed (``type=positive_int`` and friends below): a bad
value is one line on stderr and exit status 2, before anything runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Sequence

__all__ = ["Parser", "HelpFormatter", "positive_int", "non_negative_int", "odd_positive_int", "probability",
           "positive_float", "run_cli", "run_worker", "report_to_parent", "write_json", "progress_bar",
           "LineProgress", "PLAIN_PROGRESS_INTERVAL_S", "worker_progress"]


# ---- argument types (argparse ``type=``): a bad value is "argument --x: <message>", exit status 2 -------------

def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _int_at_least(text: str, low: int, what: str) -> int:
    value = _int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1.

    >>> positive_int("3")
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a positive integer (>= 1), got 0
    """
    return _int_at_least(text, 1, "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    """An integer >= 0.

    >>> non_negative_int("0")
    0
    """
    return _int_at_least(text, 0, "an integer >= 0")


def odd_positive_int(text: str) -> int:
    """An odd integer >= 1 (a window size: the window is centred on its cell).

    >>> odd_positive_int("15")
    15
    >>> odd_positive_int("4")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be an odd positive integer (a window is centred on its cell: 1, 3, 5, ...), got 4
    """
    value = _int(text)
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(
            f"must be an odd positive integer (a window is centred on its cell: 1, 3, 5, ...), got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value:
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def probability(text: str) -> float:
    """A probability in [0, 1) (a dropout rate).

    >>> probability("0.1")
    0.1
    >>> probability("1")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be in [0, 1), got 1.0
    """
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0.

    >>> positive_float("16")
    16.0
    """
    value = _float(text)
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


# ---- the parser ---------------------------------------------------------------------------------------------

class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help, unless the help already states its default, the option is
    hidden, or its default is None; an on/off flag (``store_true`` / ``store_false``) reads ``(default: off)``
    -- it is off unless given, whatever the attribute it sets."""

    def _get_help_string(self, action):
        text = action.help or ""
        if text == argparse.SUPPRESS or "(default" in text or "%(default)" in text or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text + " (default: off)"
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.default in (
                None, argparse.SUPPRESS):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` showing every default in ``--help`` (`HelpFormatter`) and reporting a bad
    argument in one line on stderr (``prog: error: ... (see --help)``, exit status 2) instead of the usage block.

    ``add_argument(..., quick=VALUE)`` declares an option whose value ``--quick`` changes: the default of the
    command line is None, and `parse_args` fills in ``default`` (or ``VALUE`` with ``--quick``) only where the
    user gave no value, so ``--quick`` never overrides a value typed on the command line. The names of the
    options the user did give are in ``args._explicit``.
    """

    def __init__(self, prog: str, description: str, **kwargs):
        super().__init__(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
        self._quick_defaults: Dict[str, tuple] = {}

    @classmethod
    def for_tool(cls, name: str, doc: str, **kwargs) -> "Parser":
        """The parser of ``python -m sparse_bias.tools.<name>``, described by the first line of the tool's docstring."""
        return cls(f"python -m sparse_bias.tools.{name}", doc.splitlines()[0], **kwargs)

    _NO_QUICK = object()

    def add_argument(self, *args, quick=_NO_QUICK, **kwargs):
        if quick is self._NO_QUICK:
            return super().add_argument(*args, **kwargs)
        default = kwargs.pop("default")
        show = (lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)
        kwargs["help"] = f"{kwargs.get('help', '')} (default: {show(default)}; {show(quick)} with --quick)"
        action = super().add_argument(*args, default=None, **kwargs)
        self._quick_defaults[action.dest] = (default, quick)
        return action

    def parse_known_args(self, args=None, namespace=None):
        ns, rest = super().parse_known_args(args, namespace)
        explicit = set(getattr(ns, "_explicit", ()))
        quick = bool(getattr(ns, "quick", False))
        for dest, (default, quick_value) in self._quick_defaults.items():
            if getattr(ns, dest, None) is None:
                setattr(ns, dest, quick_value if quick else default)
            else:
                explicit.add(dest)
        ns._explicit = explicit
        return ns, rest

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


# ---- worker processes and their progress -------------------------------------------------------------------

#: set in a worker's environment when its parent shows a bar: the worker then reports its steps on stderr
_PROGRESS_ENV = "SPARSE_BIAS_WORKER_PROGRESS"
_PROGRESS_TAG = "\x1esparse_bias progress "


def run_worker(module: str, argv: Sequence[str], what: str, bar=None) -> Dict:
    """Run ``python -m <module> <argv>`` in a fresh process and return the JSON object it printed last (its
    `report_to_parent`); a failing worker raises ``RuntimeError`` with the end of its stderr, naming ``what``.

    ``bar``: a `progress_bar` the worker's `worker_progress` steps advance (its total is set from the worker's).
    """
    env = dict(os.environ)
    show = bar is not None and not getattr(bar, "disable", True)
    if show:
        env[_PROGRESS_ENV] = "1"
    else:
        env.pop(_PROGRESS_ENV, None)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", module, *argv], stdout=out, stderr=subprocess.PIPE, text=True,
                                env=env)
        err = []
        for line in proc.stderr:
            if line.startswith(_PROGRESS_TAG):
                done, total = (int(x) for x in line[len(_PROGRESS_TAG):].split())
                if show:
                    bar.total = total
                    bar.n = done
                    bar.refresh()
            else:
                err.append(line)
        proc.wait()
        out.seek(0)
        stdout = out.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{''.join(err)[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def worker_progress(iterable, total: Optional[int] = None):
    """Yield the items of ``iterable``, reporting each step to the parent's bar (`run_worker`) when it shows one."""
    if os.environ.get(_PROGRESS_ENV) != "1":
        yield from iterable
        return
    total = len(iterable) if total is None else total
    for i, item in enumerate(iterable):
        sys.stderr.write(f"{_PROGRESS_TAG}{i} {total}\n")
        sys.stderr.flush()
        yield item
    sys.stderr.write(f"{_PROGRESS_TAG}{total} {total}\n")
    sys.stderr.flush()


def report_to_parent(result: Dict) -> None:
    """A worker's answer to `run_worker`: one JSON line on stdout."""
    print(json.dumps(result))


def write_json(path: str, obj: Any, **kwargs) -> None:
    """Write a tool's report (``--json PATH``), indented; ``kwargs`` go to ``json.dump``."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, **kwargs)


#: seconds between two lines of a `progress_bar` drawn as plain lines (stderr not a terminal, or no tqdm)
PLAIN_PROGRESS_INTERVAL_S = 10.0


def progress_bar(iterable=None, *, desc: str, unit: str, enabled: bool = True, **kwargs):
    """Progress of a long phase on stderr: a tqdm bar where stderr is a terminal; elsewhere (a pipe, a log file,
    a notebook, or tqdm not installed) plain lines (`LineProgress`), at most one every
    `PLAIN_PROGRESS_INTERVAL_S` seconds, so a log shows the phase is moving without carriage returns.
    ``enabled=False``: silent. ``kwargs`` go to tqdm (``total``, ``leave``, ...)."""
    total = kwargs.pop("total", None)
    if enabled and _is_terminal(sys.stderr):
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is a requirement; a broken environment falls back to plain lines
            pass
        else:
            return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, **kwargs)
    return LineProgress(iterable, desc=desc, unit=unit, total=total, disable=not enabled)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):       # a closed or stand-in stream
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class LineProgress:
    """What `progress_bar` returns where no tqdm bar can be drawn: the part of tqdm's interface the tools use
    (iteration, ``update``, ``n`` / ``total``, ``refresh``, ``set_postfix_str``, ``clear``, ``write``,
    ``external_write_mode``, ``close``, a context manager), printing ``desc: n/total unit (p %), m:ss elapsed,
    about m:ss left [postfix]`` on stderr when `PLAIN_PROGRESS_INTERVAL_S` seconds have passed since its last
    line, and a closing ``desc: done ...`` line if it printed any -- a phase shorter than the interval stays
    silent. ``disable=True``: silent."""

    def __init__(self, iterable=None, *, desc: str, unit: str, total: Optional[int] = None, disable: bool = False):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc, unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self._start = self._last = time.monotonic()
        self._postfix, self._printed, self._closed = "", False, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __len__(self):
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self, done: bool = False) -> str:
        elapsed = time.monotonic() - self._start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        unit = self.unit if self.unit.endswith("s") or (self.total or self.n) == 1 else self.unit + "s"
        text = f"{self.desc}: {'done, ' if done else ''}{count} {unit}"
        if self.total and not done:
            text += f" ({100 * self.n / self.total:.0f} %)"
        text += f", {_clock(elapsed)} elapsed"
        if self.total and 0 < self.n < self.total and not done:
            text += f", about {_clock(elapsed * (self.total - self.n) / self.n)} left"
        return text + (f" [{self._postfix}]" if self._postfix and not done else "")

    def _emit(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        self._printed, self._last = True, time.monotonic()

    def refresh(self) -> None:
        if not self.disable and not self._closed and time.monotonic() - self._last >= PLAIN_PROGRESS_INTERVAL_S:
            self._emit(self._line())

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = s
        if refresh and s:
            self.refresh()

    def clear(self) -> None:
        """Nothing to clear: plain lines are never redrawn."""

    def write(self, s: str, file=None) -> None:
        print(s, file=file or sys.stdout, flush=True)

    def external_write_mode(self, file=None):
        return contextlib.nullcontext()

    def close(self) -> None:
        if not self._closed and self._printed and not self.disable:
            self._emit(self._line(done=True))
        self._closed = True
