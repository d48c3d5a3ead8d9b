"""mmcv / mmengine plugin entry: ``custom_imports=dict(imports=["sparse_bias.mmcv"])`` in a config.

Importing this module registers this library's own, collision-free names (``SparseBiasMultiheadAttention``,
``SparseBiasPETRTransformerDecoderLayer``, ``SparseBiasPETRTransformerDecoder``, ``SparseBiasCmtTransformer``,
``SparseBiasAttentionBiasGenerator``, ``SparseBiasAQRWeightGenerator``) in every importable mmcv 1.x /
mmdet 2.x / mmengine registry, replacing nothing. For the dense versions' names call
``sparse_bias.nn.register_modules(dense_names=True)`` yourself (see docs/migration.md).
"""
from .nn.registry import register_modules

REGISTERED = register_modules()
