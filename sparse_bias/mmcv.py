"""mmcv / mmengine plugin entry: ``custom_imports=dict(imports=["sparse_bias.mmcv"])`` in a config.

Importing this module registers this library's own, collision-free names (``SparseBiasMultiheadAttention``,
``SparseBiasPETRTransformerDecoderLayer``, ``SparseBiasPETRTransformerDecoder``, ``SparseBiasCmtTransformer``,
``SparseBiasAttentionBiasGenerator``, ``SparseBiasAQRWeightGenerator``) in every importable mmcv 1.x /
mmdet 2.x / mmengine registry (mmcv 2.x, mmdet 3.x, mmdet3d 1.x: mmengine's ``MODELS`` and its mmdet /
mmdet3d children), replacing nothing. For the dense versions' names call
``sparse_bias.nn.register_modules(dense_names=True)`` yourself (see docs/migration.md).
"""
from .nn.registry import register_modules

REGISTERED = register_modules()
