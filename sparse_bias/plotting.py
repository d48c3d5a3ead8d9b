"""Plots of a sparse bias and of benchmark rows (implemented in `sparse_bias.tools.plotting`)."""
from .tools.plotting import plot_comparison, plot_losses, plot_query_bias, query_bias_maps

__all__ = ["query_bias_maps", "plot_query_bias", "plot_comparison", "plot_losses"]
