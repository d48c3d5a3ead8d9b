"""``nn.Module``s for CMT / PETR decoders (mmcv 1.x calling conventions, no mmcv dependency).

They own parameters and call the functional op :func:`sparse_bias.sparse_bias_attention`.
"""
from .attention import SparseBiasMultiheadAttention
from .generators import AQRWeightGenerator, AttentionBiasGenerator
from .registry import register_modules
from .transformer import FFN, CmtTransformer, PETRTransformerDecoder, PETRTransformerDecoderLayer

__all__ = [
    "SparseBiasMultiheadAttention",
    "AttentionBiasGenerator",
    "AQRWeightGenerator",
    "FFN",
    "PETRTransformerDecoderLayer",
    "PETRTransformerDecoder",
    "CmtTransformer",
    "register_modules",
]

register_modules()
