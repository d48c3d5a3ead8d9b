"""Modules producing the bias: the attention-bias generator of the dense version and a light MLP weight head.

The AQR weight generator of the MoME / CMTTEST pipelines (a LAM decoder layer over the memory) is
`sparse_bias.nn.AQRWeightGenerator` in `sparse_bias.nn.aqr`.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from einops import rearrange
from torch import nn

from ..bias import ModalityBias, SparseBias, window_bias
from ..layout import KeyLayout
from ..windows import local_windows

__all__ = ["AttentionBiasGenerator", "MLPWeightGenerator"]

CMT_BEV_SHAPE = (180, 180)
CMT_PERS_SHAPE = (6, 40, 100)


class MLPWeightGenerator(nn.Module):
    """Per-query, per-modality weights from the query features alone (a light stand-in for AQR).

    It never looks at the memory: the AQR of the MoME / CMTTEST pipelines is
    `sparse_bias.nn.AQRWeightGenerator`. A two-layer MLP maps each query feature to a LiDAR and a camera weight (one per head with
    ``num_heads``), squashed by a sigmoid (range [0, 1]) or tanh ([-1, 1]). The last layer starts with
    small weights and a bias that puts every initial weight at ``init_weight``.

    Args:
        embed_dims: ``C``.
        hidden_dims: width of the hidden layer (default ``C // 2``).
        num_heads: None for weights shared by heads, else ``H`` per-head weights.
        activation: ``"sigmoid"`` or ``"tanh"``.
        init_weight: the initial weight (inside the activation's range).
        batch_first: input ``[B, Q, C]`` instead of ``[Q, B, C]``.

    Shapes: ``forward(query [Q, B, C]) -> (lidar_weights, camera_weights)``, each ``[B, Q]`` or
    ``[B, Q, H]``.
    """

    def __init__(self, embed_dims: int = 256, hidden_dims: Optional[int] = None, num_heads: Optional[int] = None,
                 activation: str = "sigmoid", init_weight: float = 0.5, batch_first: bool = False):
        super().__init__()
        if activation not in ("sigmoid", "tanh"):
            raise ValueError(f"activation must be 'sigmoid' or 'tanh', got {activation!r}")
        lo, hi = (0.0, 1.0) if activation == "sigmoid" else (-1.0, 1.0)
        if not lo < init_weight < hi:
            raise ValueError(f"init_weight must lie inside ({lo}, {hi}) for {activation}, got {init_weight}")
        self.num_heads, self.activation, self.batch_first = num_heads, activation, batch_first
        hidden = hidden_dims or max(embed_dims // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(embed_dims, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, 2 * (num_heads or 1)))
        last = self.mlp[-1]
        nn.init.normal_(last.weight, std=0.01)
        start = math.log(init_weight / (1 - init_weight)) if activation == "sigmoid" else math.atanh(init_weight)
        nn.init.constant_(last.bias, start)

    def forward(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if query.dim() != 3:
            raise ValueError(f"query must be [Q, B, C] (or [B, Q, C] with batch_first), got {tuple(query.shape)}")
        x = query if self.batch_first else query.transpose(0, 1)                      # [B, Q, C]
        out = self.mlp(x)
        out = torch.sigmoid(out) if self.activation == "sigmoid" else torch.tanh(out)
        if self.num_heads is None:
            return out[..., 0], out[..., 1]
        out = rearrange(out, "b q (m h) -> m b q h", m=2)
        return out[0], out[1]


class AttentionBiasGenerator(nn.Module):
    """The dense versions' ``AttentionBiasGenerator`` (the dense version's and CMTTEST's), producing a `SparseBias`.

    ``forward(lidar_weights, camera_weights, bev_pos, cam_pos)`` spreads each query's weights over its
    local windows: ``bias = weight * scale`` (``"flat"``) or ``* exp(-(dy^2 + dx^2) / (2 sigma^2))``
    (``"gaussian"``), then clamps it to ``[-bias_clamp, bias_clamp]`` when ``bias_clamp`` is set.

    Args:
        layout: the `KeyLayout` (default: built from ``bev_feature_shape`` / ``pers_feature_shape``).
        window_size: odd int for both modalities, or a ``(bev, cam)`` pair; ``forward(window_size=...)``
            takes per-query LongTensors ``[B, Q]`` (or a pair of them) instead.
        bias_scale: the scale; with ``learnable_scale`` a parameter clamped to ``[min_scale, max_scale]``
            (a fixed scale is used as given, as CMTTEST does).
        learnable_scale: make ``bias_scale`` a parameter.
        scale_range: ``(min, max)`` of the learnable scale (``min_scale`` / ``max_scale`` override it).
        profile: ``"flat"`` or ``"gaussian"`` (see `sparse_bias.window_bias`).
        sigma: Gaussian width (see `sparse_bias.window_bias`).
        warmup_steps: ramp the scale linearly from 0 over this many training forwards (0 = off), the
            dense version's mitigation for early training instability. The step count is a buffer.
        dense: return the dense ``[B, Q, K]`` (``[B, H, Q, K]`` for per-head weights) tensor, reproducing the
            dense version exactly.
        fp16: keep bias values in float16 (cast after the clamp, as CMTTEST).
        use_local_bias: False = one bias per modality over all its keys (a `ModalityBias`).
        debug: mark the bias so that `SparseBiasMultiheadAttention` checks its result against the dense
            reference on a sample of queries and logs the error and bias statistics.
        bev_feature_shape: the dense versions' way to give the layout: ``(H, W)``.
        pers_feature_shape: and ``(V, Hc, Wc)``.
        min_scale: CMTTEST's lower bound of the learnable scale.
        max_scale: CMTTEST's upper bound of the learnable scale.
        bias_clamp: clamp the final bias values to ``[-bias_clamp, bias_clamp]`` (None = no clamp). CMTTEST
            clamps to ``min(5, max_scale)``; `sparse_bias.build_attention_bias` sets that for its
            configs. Gradients are zero where the clamp clips (``torch.clamp``).

    Shapes: weights ``[B, Q]`` or ``[B, Q, H]``; ``bev_pos`` ``[B, Q, 2]`` cells or ``[B, Q]`` flat BEV indices
    (the dense versions' ``pts_bev_indices``, negative = none); ``cam_pos`` ``[B, Q, 3]`` or ``[B, Q, M, 3]``
    (``pts_pers_indices``). Positions may be integer tensors or float tensors holding whole numbers (as
    CMTTEST's projection produces them). ``pts_bev_indices=`` / ``pts_pers_indices=`` are accepted as keyword
    aliases of ``bev_pos`` / ``cam_pos``.

    State dicts: ``bias_scale`` and ``step``. A CMTTEST checkpoint loads with ``strict=True``: its derived
    buffers (``y_offsets``, ``x_offsets``, ``window_offsets_bev``, ``window_offsets_pers``) are accepted and
    ignored, and a missing ``step`` keeps the module's own.
    """

    #: CMTTEST's buffers derived from the window size: accepted in state dicts, not stored.
    DERIVED_BUFFERS = ("y_offsets", "x_offsets", "window_offsets_bev", "window_offsets_pers")

    def __init__(self, layout: Optional[KeyLayout] = None, window_size: Union[int, Sequence[int]] = 15,
                 bias_scale: float = 1.0, learnable_scale: bool = False, scale_range: Tuple[float, float] = (0.0, 10.0),
                 profile: str = "flat", sigma=None, warmup_steps: int = 0, dense: bool = False, fp16: bool = False,
                 use_local_bias: bool = True, debug: bool = False, bev_feature_shape=None, pers_feature_shape=None,
                 min_scale: Optional[float] = None, max_scale: Optional[float] = None,
                 bias_clamp: Optional[float] = None):
        super().__init__()
        if layout is None:
            layout = KeyLayout(bev_shape=tuple(bev_feature_shape or CMT_BEV_SHAPE),
                               cam_shape=tuple(pers_feature_shape or CMT_PERS_SHAPE))
        if not isinstance(layout, KeyLayout):
            raise TypeError(f"layout must be a KeyLayout or None, got {type(layout).__name__}")
        self.layout = layout
        self.window_size = _window_pair(window_size)
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        lo, hi = (float(x) for x in scale_range)
        lo = lo if min_scale is None else float(min_scale)
        hi = hi if max_scale is None else float(max_scale)
        if not lo <= hi:
            raise ValueError(f"min_scale must be <= max_scale, got [{lo}, {hi}]")
        if learnable_scale and not lo <= bias_scale <= hi:     # CMTTEST accepts it; the clamp then pins the scale
            warnings.warn(f"bias_scale {bias_scale} is outside the learnable range [{lo}, {hi}]: the clamped scale is "
                          f"{min(max(bias_scale, lo), hi)} and receives no gradient until the parameter re-enters "
                          "the range", UserWarning, stacklevel=2)
        if bias_clamp is not None and not float(bias_clamp) > 0:
            raise ValueError(f"bias_clamp must be a positive float or None, got {bias_clamp!r}")
        self.scale_range, self.learnable_scale = (lo, hi), learnable_scale
        self.bias_clamp = None if bias_clamp is None else float(bias_clamp)
        scale = torch.tensor(float(bias_scale), dtype=torch.float64)     # cast to the weights' dtype when used
        if learnable_scale:
            self.bias_scale = nn.Parameter(scale)
        else:
            self.register_buffer("bias_scale", scale)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.profile, self.sigma, self.warmup_steps = profile, sigma, warmup_steps
        self.dense, self.fp16, self.use_local_bias, self.debug = dense, fp16, use_local_bias, debug

    def scale(self) -> torch.Tensor:
        """The effective scale: the learnable scale clamped to ``scale_range``, times the warm-up ramp."""
        s = self.bias_scale.clamp(*self.scale_range) if self.learnable_scale else self.bias_scale
        if self.warmup_steps:
            s = s * min(1.0, float(self.step) / self.warmup_steps)
        return s

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in self.DERIVED_BUFFERS:                       # CMTTEST's derived buffers: recomputed, not loaded
            state_dict.pop(prefix + name, None)
        state_dict.setdefault(prefix + "step", self.step.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _clamp(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.bias_clamp is None else values.clamp(-self.bias_clamp, self.bias_clamp)

    def forward(self, lidar_weights: Optional[torch.Tensor], camera_weights: Optional[torch.Tensor],
                bev_pos: Optional[torch.Tensor] = None, cam_pos: Optional[torch.Tensor] = None,
                window_size: Union[None, int, torch.Tensor] = None, *, pts_bev_indices: Optional[torch.Tensor] = None,
                pts_pers_indices: Optional[torch.Tensor] = None) -> Union[SparseBias, ModalityBias, torch.Tensor]:
        bev_pos = _alias("bev_pos", bev_pos, "pts_bev_indices", pts_bev_indices)
        cam_pos = _alias("cam_pos", cam_pos, "pts_pers_indices", pts_pers_indices)
        if self.training and self.warmup_steps:
            self.step += 1
        ref = lidar_weights if lidar_weights is not None else camera_weights
        scale = self.scale().to(ref.dtype if ref is not None and ref.is_floating_point() else torch.float32)
        if not self.use_local_bias:
            parts = [w for w, present in ((lidar_weights, self.layout.num_bev_keys), (camera_weights,
                                                                                      self.layout.num_cam_keys))
                     if present]
            if any(w is None for w in parts):
                raise ValueError("lidar_weights and camera_weights are required for the modalities of the layout")
            values = self._clamp(torch.stack(parts, dim=2) * scale)                          # [B, Q, M(, H)]
            bias = ModalityBias(self.layout, values.half() if self.fp16 else values)
            return bias.to_dense() if self.dense else bias
        bev_pos = _whole_numbers("bev_pos", bev_pos)
        cam_pos = _whole_numbers("cam_pos", cam_pos)
        if bev_pos is not None and bev_pos.dim() == 2 and self.layout.bev_shape is not None:
            width = self.layout.bev_shape[1]                                              # flat indices -> cells
            bev_pos = torch.stack([torch.div(bev_pos, width, rounding_mode="floor"), bev_pos % width], dim=-1)
            bev_pos = bev_pos.masked_fill(bev_pos[..., :1] < 0, -1)
        bev_window, cam_window = self.window_size if window_size is None else _window_pair(window_size)
        win = local_windows(self.layout, bev_pos if self.layout.bev_shape else None,
                            cam_pos if self.layout.cam_shape else None, bev_window=bev_window, cam_window=cam_window)
        bias = window_bias(win, lidar_weights if win.bev_pos is not None else None,
                           camera_weights if win.cam_pos is not None else None, scale=scale,
                           profile=self.profile, sigma=self.sigma)
        if self.bias_clamp is not None:
            bias = SparseBias(win, self._clamp(bias.values))
        if self.fp16:
            bias = bias.to(torch.float16)
        if self.dense:
            return bias.to_dense()
        bias.debug = self.debug
        return bias

    def extra_repr(self) -> str:
        return (f"layout={self.layout}, window_size={self.window_size}, profile={self.profile!r}, "
                f"learnable_scale={self.learnable_scale}, scale_range={self.scale_range}, "
                f"bias_clamp={self.bias_clamp}, warmup_steps={self.warmup_steps}, dense={self.dense}, "
                f"fp16={self.fp16}, use_local_bias={self.use_local_bias}")


def _alias(name, value, alias, alias_value):
    if alias_value is None:
        return value
    if value is not None:
        raise TypeError(f"got both {name} and its alias {alias}; pass one")
    return alias_value


def _whole_numbers(name: str, pos: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Float positions holding whole numbers (CMTTEST's ``floor``-ed projections) as LongTensors."""
    if pos is None or not isinstance(pos, torch.Tensor) or not pos.is_floating_point():
        return pos
    if pos.numel() and not bool((torch.isfinite(pos) & (pos == pos.round())).all()):
        raise ValueError(f"{name} is a float tensor with non-integer or non-finite values; positions are cells")
    return pos.long()


def _window_pair(window_size):
    if isinstance(window_size, (tuple, list)):
        if len(window_size) != 2:
            raise ValueError(f"window_size must be an int or a (bev, cam) pair, got {window_size!r}")
        pair = tuple(window_size)
    elif isinstance(window_size, (torch.Tensor, int)) and not isinstance(window_size, bool):
        pair = (window_size, window_size)
    else:
        raise TypeError(f"window_size must be an int, a (bev, cam) pair or a LongTensor [B, Q], got {window_size!r}")
    for size in pair:
        if isinstance(size, int) and not isinstance(size, bool) and size > 0 and size % 2 == 0:
            raise ValueError(f"window_size must be odd (a window centred on the query's cell), got {size}: "
                             f"use {size - 1} or {size + 1}")
    return pair
