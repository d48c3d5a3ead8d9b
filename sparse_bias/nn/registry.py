"""Registration in mmcv 1.x / mmdet 2.x and mmengine registries, where those are importable.

With mmcv 1.x a config can then say ``dict(type="SparseBiasMultiheadAttention", ...)`` in ``attn_cfgs``;
with mmengine the modules are in ``mmengine.registry.MODELS``. Nothing happens when neither is installed.
"""
from __future__ import annotations

import importlib
import logging
from typing import Dict, List

logger = logging.getLogger("sparse_bias")

# registry (module path, attribute) -> names of sparse_bias.nn classes registered there
_TARGETS = {
    ("mmcv.cnn.bricks.registry", "ATTENTION"): ["SparseBiasMultiheadAttention"],
    ("mmcv.cnn.bricks.registry", "TRANSFORMER_LAYER"): ["PETRTransformerDecoderLayer"],
    ("mmcv.cnn.bricks.registry", "TRANSFORMER_LAYER_SEQUENCE"): ["PETRTransformerDecoder"],
    ("mmdet.models.utils.builder", "TRANSFORMER"): ["CmtTransformer"],
    ("mmengine.registry", "MODELS"): ["SparseBiasMultiheadAttention", "PETRTransformerDecoderLayer",
                                      "PETRTransformerDecoder", "CmtTransformer", "AttentionBiasGenerator",
                                      "AQRWeightGenerator"],
}


def register_modules() -> Dict[str, List[str]]:
    """Register the modules in every importable registry; returns ``{registry: [names]}`` for what was done."""
    from . import aqr, attention, generators, transformer
    classes = {name: getattr(mod, name) for mod in (aqr, attention, generators, transformer) for name in mod.__all__}
    done = {}
    for (module, attr), names in _TARGETS.items():
        try:
            registry = getattr(importlib.import_module(module), attr)
        except Exception:          # not installed, or an incompatible version
            continue
        for name in names:
            registry.register_module(name=name, module=classes[name], force=True)
        done[f"{module}.{attr}"] = names
        logger.debug("sparse_bias: registered %s in %s.%s", names, module, attr)
    return done
