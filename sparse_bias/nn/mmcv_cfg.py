"""The dense versions' mmcv config dicts (``attn_cfgs``, ``ffn_cfgs``, ``transformerlayers``, ``decoder``)
translated into the constructor keyword arguments of this library's modules, so an unchanged CMT / CMTTEST /
MoME config builds them.

A pure translator: dicts in, checked keyword-argument dicts out (or a ValueError / TypeError naming what is not
supported). It imports no module class; the modules (`sparse_bias.nn.transformer`, `sparse_bias.nn.aqr`) build
themselves from what it returns. No mmcv import: the few config types those configs use are mapped here by name.
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Union

#: Attention types of CMT / CMTTEST / MoME configs; all become `SparseBiasMultiheadAttention` (same
#: constructor arguments, same state-dict names ``attn.in_proj_*`` / ``attn.out_proj.*``).
ATTENTION_TYPES = ("MultiheadAttention", "PETRMultiheadAttention", "PETRMultiheadFlashAttention",
                   "SparseBiasMultiheadAttention")
LAYER_TYPES = ("PETRTransformerDecoderLayer", "SparseBiasPETRTransformerDecoderLayer")
DECODER_TYPES = ("PETRTransformerDecoder", "SparseBiasPETRTransformerDecoder")


def _pop_type(cfg: dict, allowed: Sequence[str], what: str, default: Optional[str] = None) -> dict:
    if not isinstance(cfg, dict):
        raise TypeError(f"{what} must be a config dict, got {type(cfg).__name__}")
    cfg = copy.deepcopy(cfg)
    kind = cfg.pop("type", default)
    if kind not in allowed:
        raise ValueError(f"{what} type {kind!r} is not supported; expected one of {list(allowed)}")
    return cfg


def attention_kwargs(cfg: dict, batch_first: bool, backend: str) -> dict:
    """An mmcv ``attn_cfgs`` entry -> keyword arguments of `SparseBiasMultiheadAttention`."""
    cfg = _pop_type(cfg, ATTENTION_TYPES, "attn_cfgs entry")
    cfg["batch_first"] = batch_first           # mmcv's BaseTransformerLayer sets it from the layer
    cfg.setdefault("backend", backend)
    return cfg


def attention_cfgs(attn_cfgs: Union[dict, List[dict]], num_attn: int) -> List[dict]:
    """mmcv's rule: one dict is copied for every attention; a list must name one per attention."""
    if isinstance(attn_cfgs, dict):
        return [copy.deepcopy(attn_cfgs) for _ in range(num_attn)]
    attn_cfgs = list(attn_cfgs)
    if len(attn_cfgs) != num_attn:
        raise ValueError(f"attn_cfgs holds {len(attn_cfgs)} configs but operation_order has {num_attn} attentions")
    return attn_cfgs


def ffn_kwargs(cfg: Optional[dict], embed_dims: int, feedforward_channels: Optional[int],
               ffn_dropout: Optional[float], ffn_num_fcs: Optional[int]) -> dict:
    """An mmcv ``ffn_cfgs`` dict -> keyword arguments of `FFN` (``embed_dims``, ``feedforward_channels``,
    ``ffn_drop``). The layer's ``feedforward_channels`` / ``ffn_dropout`` /
    ``ffn_num_fcs`` override it, as mmcv's deprecated-argument handling does (PETR's layer always passes
    ``ffn_dropout=0.0``)."""
    cfg = _pop_type(cfg or {}, ("FFN",), "ffn_cfgs", default="FFN")
    for name, value in (("feedforward_channels", feedforward_channels), ("ffn_drop", ffn_dropout),
                        ("num_fcs", ffn_num_fcs)):
        if value is not None:
            cfg[name] = value
    act = cfg.pop("act_cfg", dict(type="ReLU", inplace=True))
    if act.get("type") != "ReLU":
        raise ValueError(f"ffn_cfgs act_cfg {act!r} is not supported (ReLU only)")
    if cfg.pop("num_fcs", 2) != 2:
        raise ValueError("ffn_cfgs num_fcs must be 2 (mmcv's FFN as CMT uses it)")
    if not cfg.pop("add_identity", True):
        raise ValueError("ffn_cfgs add_identity=False is not supported")
    if cfg.pop("dropout_layer", None):
        raise ValueError("ffn_cfgs dropout_layer is not supported (CMT's configs leave it unset)")
    cfg.pop("init_cfg", None)
    unknown = set(cfg) - {"embed_dims", "feedforward_channels", "ffn_drop"}
    if unknown:
        raise ValueError(f"ffn_cfgs has unsupported keys {sorted(unknown)}")
    return dict(embed_dims=cfg.get("embed_dims", embed_dims),
                feedforward_channels=cfg.get("feedforward_channels", 1024), ffn_drop=cfg.get("ffn_drop", 0.0))


def check_norm_cfg(norm_cfg: Optional[dict], what: str) -> None:
    if norm_cfg is not None and norm_cfg.get("type") != "LN":
        raise ValueError(f"{what} {norm_cfg!r} is not supported (LayerNorm, type='LN', only)")


def layer_cfgs(transformerlayers: Union[dict, List[dict]], num_layers: Optional[int]) -> List[dict]:
    """mmcv's ``TransformerLayerSequence`` rule: one dict is copied ``num_layers`` times, or one per layer."""
    if isinstance(transformerlayers, dict):
        if num_layers is None:
            raise ValueError("num_layers is required with a single transformerlayers dict")
        return [_pop_type(transformerlayers, LAYER_TYPES, "transformerlayers") for _ in range(num_layers)]
    cfgs = [_pop_type(c, LAYER_TYPES, "transformerlayers entry") for c in transformerlayers]
    if num_layers is not None and len(cfgs) != num_layers:
        raise ValueError(f"transformerlayers holds {len(cfgs)} configs but num_layers is {num_layers}")
    return cfgs


def decoder_kwargs(cfg: dict, backend: str = "auto") -> dict:
    """A ``decoder=dict(type='PETRTransformerDecoder', ...)`` config -> keyword arguments of
    `PETRTransformerDecoder`."""
    cfg = _pop_type(cfg, DECODER_TYPES, "decoder")
    cfg.setdefault("backend", backend)
    cfg.setdefault("return_intermediate", False)               # mmcv's TransformerLayerSequence default
    return cfg
