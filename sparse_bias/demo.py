"""``python -m sparse_bias.demo``: the library's main job on a synthetic CMT scene (in `sparse_bias.tools.demo`)."""
import sys

from .tools.demo import cli, main

__all__ = ["main", "cli"]

if __name__ == "__main__":
    sys.exit(cli())
