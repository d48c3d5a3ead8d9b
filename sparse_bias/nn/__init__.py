"""``nn.Module``s for CMT / PETR decoders (mmcv 1.x calling conventions, no mmcv dependency).

They own parameters and call the functional ops `sparse_bias.sparse_bias_attention` and
`sparse_bias.window_attention`. Importing them registers nothing anywhere: see
`register_modules` and the ``sparse_bias.mmcv`` plugin module.
"""
from .attention import SparseBiasMultiheadAttention
from .aqr import AQROutput, AQRWeightGenerator, Projection
from .generators import AttentionBiasGenerator, MLPWeightGenerator
from .head import AQRAttentionBias
from .registry import register_modules
from .transformer import FFN, CmtTransformer, PETRTransformerDecoder, PETRTransformerDecoderLayer

__all__ = [
    "SparseBiasMultiheadAttention",
    "AttentionBiasGenerator",
    "AQRWeightGenerator",
    "AQROutput",
    "Projection",
    "MLPWeightGenerator",
    "AQRAttentionBias",
    "FFN",
    "PETRTransformerDecoderLayer",
    "PETRTransformerDecoder",
    "CmtTransformer",
    "register_modules",
]
