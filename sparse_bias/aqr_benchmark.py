"""``python -m sparse_bias.aqr_benchmark``: the AQR step benchmark (implemented in `sparse_bias.tools.aqr_benchmark`)."""
import sys

from .tools.aqr_benchmark import CHECK_TOLERANCE, VARIANTS, cli, format_table, main

__all__ = ["VARIANTS", "CHECK_TOLERANCE", "format_table", "main", "cli"]

if __name__ == "__main__":
    sys.exit(cli())
