"""The dense versions' ``attention_bias_config`` entry point (the dense version's and CMTTEST's keys)."""
from __future__ import annotations

from typing import Optional

from ..layout import KeyLayout
from .generators import AttentionBiasGenerator

__all__ = ["build_attention_bias"]

#: The dense version's keys (its configuration interface).
ORIGIN_KEYS = {"enable", "window_size", "bias_scale", "use_local_bias", "fp16", "debug_mode"}
#: CMTTEST's ``AttentionBiasGenerator`` arguments (``CMTTEST/bias/attention_bias_generator.py``) besides those.
CMTTEST_KEYS = {"type", "bev_feature_shape", "pers_feature_shape", "learnable_scale", "min_scale", "max_scale",
                "init_cfg"}
#: This library's generator options.
OWN_KEYS = {"profile", "sigma", "scale_range", "warmup_steps", "dense", "bias_clamp"}
#: Keys that mark a config as CMTTEST's (its defaults and its final clamp then apply).
CMTTEST_MARKERS = {"type", "learnable_scale", "min_scale", "max_scale"}

_KEYS = ORIGIN_KEYS | CMTTEST_KEYS | OWN_KEYS


def build_attention_bias(cfg: Optional[dict]) -> Optional[AttentionBiasGenerator]:
    """Build an `sparse_bias.nn.AttentionBiasGenerator` from a dense version's ``attention_bias_config``.

    Every key of both dense versions keeps its meaning:

    - the dense version: ``enable`` (False = no bias: returns None), ``window_size`` (odd; one size for BEV and
      camera), ``bias_scale`` (default 1.0), ``use_local_bias`` (False = one bias per modality over all its
      keys, a `sparse_bias.ModalityBias`), ``fp16`` (half-precision values), ``debug_mode`` (the attention
      checks a sample of queries against the dense reference; see `sparse_bias.nn.AttentionBiasGenerator`);
    - CMTTEST (``CMTTEST/bias/attention_bias_generator.py``): ``type`` (must be ``"AttentionBiasGenerator"``),
      ``bev_feature_shape`` ``(H, W)``, ``pers_feature_shape`` ``(V, Hc, Wc)`` (default CMT's ``(180, 180)`` /
      ``(6, 40, 100)``), ``learnable_scale``, ``min_scale`` / ``max_scale`` (the learnable scale's clamp,
      default 0.5 / 5.0), ``init_cfg`` (accepted, unused).

    A config with any of CMTTEST's ``type``, ``learnable_scale``, ``min_scale``, ``max_scale`` is built as
    CMTTEST builds it: ``bias_scale`` defaults to 2.5 and the final bias is clamped to
    ``+-min(5, max_scale)`` (``bias_clamp``), so the output equals CMTTEST's dense tensor. Otherwise the origin
    design's semantics apply (no final clamp). This library's own options (``profile``, ``sigma``,
    ``scale_range``, ``warmup_steps``, ``dense``, ``bias_clamp``) may be added to either. Unknown keys raise a
    ``ValueError`` naming them; an even ``window_size`` raises one naming the odd sizes around it.

    Returns:
        None when ``cfg`` is None or ``enable`` is False, else the generator.

    Example:
        >>> import sparse_bias as sb
        >>> gen = sb.build_attention_bias(dict(type="AttentionBiasGenerator", bev_feature_shape=(180, 180),
        ...                                    pers_feature_shape=(6, 40, 100), window_size=15, bias_scale=2.5,
        ...                                    learnable_scale=True, min_scale=0.5, max_scale=5.0,
        ...                                    use_local_bias=True, fp16=True))
        >>> gen.layout.num_keys, gen.bias_clamp, gen.scale_range
        (56400, 5.0, (0.5, 5.0))
    """

    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise TypeError(f"attention_bias_config must be a dict or None, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ValueError(f"attention_bias_config has unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    cfg = dict(cfg)
    cmttest = bool(CMTTEST_MARKERS & set(cfg))
    kind = cfg.pop("type", "AttentionBiasGenerator")
    if kind != "AttentionBiasGenerator":
        raise ValueError(f"attention_bias_config type must be 'AttentionBiasGenerator', got {kind!r}")
    cfg.pop("init_cfg", None)
    if not cfg.pop("enable", True):
        return None
    layout = KeyLayout(bev_shape=tuple(cfg.pop("bev_feature_shape", (180, 180))),
                       cam_shape=tuple(cfg.pop("pers_feature_shape", (6, 40, 100))))
    if cmttest:
        cfg.setdefault("bias_scale", 2.5)
        cfg.setdefault("min_scale", 0.5)
        cfg.setdefault("max_scale", 5.0)
        cfg.setdefault("bias_clamp", min(5.0, float(cfg["max_scale"])))
    return AttentionBiasGenerator(layout, window_size=cfg.pop("window_size", 15),
                                  bias_scale=cfg.pop("bias_scale", 1.0), use_local_bias=cfg.pop("use_local_bias", True),
                                  fp16=cfg.pop("fp16", False), debug=cfg.pop("debug_mode", False), **cfg)
