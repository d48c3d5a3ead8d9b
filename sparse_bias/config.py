"""The origin design's ``attention_bias_config`` entry point."""
from __future__ import annotations

from typing import Optional

from .layout import KeyLayout

__all__ = ["build_attention_bias"]

_KEYS = {"enable", "window_size", "bias_scale", "use_local_bias", "fp16", "debug_mode", "bev_feature_shape",
         "pers_feature_shape", "type", "profile", "sigma", "learnable_scale", "scale_range", "warmup_steps", "dense"}


def build_attention_bias(cfg: Optional[dict]):
    """Build an :class:`sparse_bias.nn.AttentionBiasGenerator` from ``attention_bias_config``.

    Args:
        cfg: ``dict(enable=True, window_size=15, bias_scale=1.0, use_local_bias=True, fp16=True,
            debug_mode=False)`` as in the origin design, optionally with ``bev_feature_shape`` /
            ``pers_feature_shape`` (default CMT's ``(180, 180)`` / ``(6, 40, 100)``) and the generator's own
            options (``profile``, ``sigma``, ``learnable_scale``, ``scale_range``, ``warmup_steps``, ``dense``).

    Returns:
        None when ``cfg`` is None or ``enable`` is False, else the generator. ``use_local_bias=False`` gives a
        global per-modality bias (:class:`sparse_bias.ModalityBias`, exact, never ``[B, Q, K]``);
        ``fp16=True`` keeps bias values in half precision; ``debug_mode=True`` makes the attention check its
        result on a sample of queries against the dense reference and log the error and bias statistics.

    Example::

        >>> gen = build_attention_bias(dict(enable=True, window_size=15, bias_scale=1.0, use_local_bias=True,
        ...                                 fp16=False, debug_mode=False))
        >>> gen.layout.num_keys
        56400
    """
    from .nn.generators import AttentionBiasGenerator

    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise TypeError(f"attention_bias_config must be a dict or None, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise ValueError(f"attention_bias_config has unknown keys {unknown}; allowed: {sorted(_KEYS)}")
    cfg = dict(cfg)
    if cfg.pop("type", "AttentionBiasGenerator") != "AttentionBiasGenerator":
        raise ValueError("attention_bias_config type must be 'AttentionBiasGenerator'")
    if not cfg.pop("enable", True):
        return None
    layout = KeyLayout(bev_shape=tuple(cfg.pop("bev_feature_shape", (180, 180))),
                       cam_shape=tuple(cfg.pop("pers_feature_shape", (6, 40, 100))))
    return AttentionBiasGenerator(layout, window_size=cfg.pop("window_size", 15),
                                  bias_scale=cfg.pop("bias_scale", 1.0), use_local_bias=cfg.pop("use_local_bias", True),
                                  fp16=cfg.pop("fp16", False), debug=cfg.pop("debug_mode", False), **cfg)
