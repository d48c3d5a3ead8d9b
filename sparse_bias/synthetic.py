"""Synthetic CMT scenes: layouts, cameras, random queries (implemented in `sparse_bias.tools.synthetic`)."""
from .tools.synthetic import CMT_CONFIGS, CmtConfig, SyntheticScene, synthetic_cameras, synthetic_scene

__all__ = ["CMT_CONFIGS", "CmtConfig", "SyntheticScene", "synthetic_cameras", "synthetic_scene"]
