"""The argument parser of the command-line entry points: help with defaults, one-line errors."""
from __future__ import annotations

import argparse
import sys


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` showing every default in ``--help`` and reporting a bad argument in one line
    on stderr (``prog: error: ... (see --help)``, exit status 2) instead of the usage block."""

    def __init__(self, prog: str, description: str, **kwargs):
        super().__init__(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)
