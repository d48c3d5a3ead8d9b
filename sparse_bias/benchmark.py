"""``python -m sparse_bias.benchmark``: the attention benchmark (implemented in `sparse_bias.tools.benchmark`)."""
import sys

from .tools.benchmark import (ALL_VARIANTS, BACKENDS, CHECK_TOLERANCE, DROPOUT_SEED, DTYPES, LOW_PRECISION_RATIO,
                              QUICK_SWEEP, SWEEP, cli, compare, format_table, main, sweep, sweep_markdown, variants)

__all__ = ["BACKENDS", "DTYPES", "CHECK_TOLERANCE", "LOW_PRECISION_RATIO", "DROPOUT_SEED", "ALL_VARIANTS", "SWEEP",
           "QUICK_SWEEP", "variants", "format_table", "compare", "sweep", "sweep_markdown", "main", "cli"]

if __name__ == "__main__":
    sys.exit(cli())
