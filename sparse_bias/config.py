"""Former home of `build_attention_bias` (it builds a module, so it lives in `sparse_bias.nn.config`); kept so that
``from sparse_bias.config import build_attention_bias`` keeps working."""
from .nn.config import build_attention_bias

__all__ = ["build_attention_bias"]
