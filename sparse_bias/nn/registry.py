"""Registration in mmcv 1.x / mmdet 2.x and mmengine (mmcv 2.x, mmdet 3.x, mmdet3d 1.x) registries -- only
when asked.

``import sparse_bias`` touches no registry. Two explicit routes:

* ``custom_imports=dict(imports=["sparse_bias.mmcv"])`` in a config (or `register_modules` with no
  arguments) registers this library's own, collision-free names (``SparseBiasMultiheadAttention``,
  ``SparseBiasPETRTransformerDecoderLayer``, ...), never replacing anything;
* ``register_modules(dense_names=True)`` also registers the dense versions' names (``CmtTransformer``,
  ``PETRTransformerDecoderLayer``, ``PETRTransformerDecoder``, ``PETRMultiheadAttention``,
  ``PETRMultiheadFlashAttention``, ``AttentionBiasGenerator``, ``AQRWeightGenerator``), so that an unchanged
  CMT / CMTTEST config builds this library's classes -- for users who drop the dense modules from their
  plugin. A name already taken by another class is an error naming both classes, unless ``force=True``
  (then a warning names what was replaced).
"""
from __future__ import annotations

import importlib
import logging
import sys
import warnings
from typing import Dict, List, Optional

from . import aqr, attention, generators, transformer

logger = logging.getLogger("sparse_bias")

#: (registry module, attribute) -> the kinds of module it holds.
_REGISTRIES = {
    ("mmcv.cnn.bricks.registry", "ATTENTION"): "attention",
    ("mmcv.cnn.bricks.registry", "TRANSFORMER_LAYER"): "layer",
    ("mmcv.cnn.bricks.registry", "TRANSFORMER_LAYER_SEQUENCE"): "sequence",
    ("mmdet.models.utils.builder", "TRANSFORMER"): "transformer",
    ("mmengine.registry", "MODELS"): "all",
    # mmcv 2.x has no registries of its own: its bricks build from mmengine's root MODELS; mmdet 3.x and mmdet3d 1.x
    # build from child registries that fall back to the root -- registered there too, so that a dense name a
    # plugin holds there is found (and not silently preferred to the root's). Only when that package is already
    # imported (see _LOADED_ONLY): a lookup through the child finds the root's names anyway.
    ("mmdet.registry", "MODELS"): "all",
    ("mmdet3d.registry", "MODELS"): "all",
}

#: registries used only when their top-level package is already imported: importing mmdet / mmdet3d (and with
#: them mmcv's bricks into the root registry) is not this library's business
_LOADED_ONLY = {("mmdet.registry", "MODELS"), ("mmdet3d.registry", "MODELS")}

#: kind -> [(own name, dense versions' names, class name in sparse_bias.nn)]
_NAMES = {
    "attention": [("SparseBiasMultiheadAttention", ("PETRMultiheadAttention", "PETRMultiheadFlashAttention"),
                   "SparseBiasMultiheadAttention")],
    "layer": [("SparseBiasPETRTransformerDecoderLayer", ("PETRTransformerDecoderLayer",),
               "PETRTransformerDecoderLayer")],
    "sequence": [("SparseBiasPETRTransformerDecoder", ("PETRTransformerDecoder",), "PETRTransformerDecoder")],
    "transformer": [("SparseBiasCmtTransformer", ("CmtTransformer",), "CmtTransformer"),
                    ("SparseBiasAttentionBiasGenerator", ("AttentionBiasGenerator",), "AttentionBiasGenerator"),
                    ("SparseBiasAQRWeightGenerator", ("AQRWeightGenerator",), "AQRWeightGenerator")],
}
_NAMES["all"] = [entry for kind in ("attention", "layer", "sequence", "transformer") for entry in _NAMES[kind]]


def _registered(registry, name: str):
    table = getattr(registry, "module_dict", None)
    if table is None:
        table = getattr(registry, "_module_dict", {})
    return table.get(name)


#: registry module -> (package, major version it exists in): probed only on that version, so that on mmcv 2.x /
#: mmdet 3.x the probe imports nothing of theirs (mmcv.cnn would register mmcv's bricks in mmengine's registry)
_MAJOR = {"mmcv.cnn.bricks.registry": ("mmcv", 1), "mmdet.models.utils.builder": ("mmdet", 2)}


def _probe(module: str) -> bool:
    if module in _MAJOR:
        package, major = _MAJOR[module]
        try:
            version = importlib.import_module(package).__version__
            return int(str(version).split(".")[0]) == major
        except Exception:
            return False
    return True


def _importable_registries() -> Dict[str, object]:
    found = {}
    for (module, attr), kind in _REGISTRIES.items():
        if (module, attr) in _LOADED_ONLY and module.split(".")[0] not in sys.modules or not _probe(module):
            continue
        try:
            found[f"{module}.{attr}"] = (getattr(importlib.import_module(module), attr), kind)
        except Exception:          # not installed, or an incompatible version
            continue
    return found


def register_modules(dense_names: bool = False, force: bool = False,
                     registries: Optional[Dict[str, tuple]] = None) -> Dict[str, List[str]]:
    """Register this library's modules in every importable registry: mmcv 1.x's ``ATTENTION``,
    ``TRANSFORMER_LAYER``, ``TRANSFORMER_LAYER_SEQUENCE``, mmdet 2.x's ``TRANSFORMER``, mmengine's root ``MODELS``
    (where mmcv 2.x's bricks build) and its children ``mmdet.registry.MODELS`` / ``mmdet3d.registry.MODELS``
    (those two when mmdet / mmdet3d is already imported).

    Args:
        dense_names: also register under the dense versions' names (``CmtTransformer``,
            ``PETRTransformerDecoderLayer``, ``PETRTransformerDecoder``, ``PETRMultiheadAttention``,
            ``PETRMultiheadFlashAttention``, ``AttentionBiasGenerator``, ``AQRWeightGenerator``).
        force: replace a name another class holds (with a warning naming both); otherwise that is an error.
        registries: ``{label: (registry, kind)}`` to use instead of the importable ones (``kind`` one of
            ``"attention"``, ``"layer"``, ``"sequence"``, ``"transformer"``, ``"all"``); for tests.

    Returns:
        ``{registry: [names registered]}``.

    Raises:
        ValueError: a name is taken by another class and ``force`` is False (nothing is registered then).
    """
    classes = {name: getattr(mod, name) for mod in (aqr, attention, generators, transformer) for name in mod.__all__}
    targets = _importable_registries() if registries is None else registries
    plan = []
    for label, (registry, kind) in targets.items():
        for own, dense, cls_name in _NAMES[kind]:
            for name in (own,) + (dense if dense_names else ()):
                plan.append((label, registry, name, classes[cls_name]))
    conflicts = [(label, name, _registered(registry, name), cls) for label, registry, name, cls in plan
                 if _registered(registry, name) not in (None, cls)]
    if conflicts and not force:
        raise ValueError("registry names already taken by other classes: " + "; ".join(
            f"{label}[{name!r}] is {_qualname(old)}, not {_qualname(cls)}" for label, name, old, cls in conflicts)
            + " -- pass force=True to replace them")
    for label, name, old, cls in conflicts:
        warnings.warn(f"sparse_bias.nn.register_modules: {label}[{name!r}]: replacing {_qualname(old)} with "
                      f"{_qualname(cls)}", UserWarning, stacklevel=2)
    done: Dict[str, List[str]] = {}
    for label, registry, name, cls in plan:
        if _registered(registry, name) is not cls:
            registry.register_module(name=name, module=cls, force=True)
        done.setdefault(label, []).append(name)
    for label, names in done.items():
        logger.debug("sparse_bias: registered %s in %s", names, label)
    return done


def _qualname(cls) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
