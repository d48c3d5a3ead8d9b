"""One call from a detection head: project once, run the AQR, build the local bias."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..bias import SparseBias
from .config import build_attention_bias
from .aqr import CMT_PC_RANGE, AQROutput, AQRWeightGenerator

__all__ = ["AQRAttentionBias"]


class AQRAttentionBias(nn.Module):
    """The dense version's CmtHead integration: AQR weights and the local attention bias from one projection.

    Per forward: the reference points are projected once (`AQRWeightGenerator.project`); the AQR runs its
    LAM decoder layer as window attention over the memory; the `AttentionBiasGenerator` built from
    ``attention_bias_config`` spreads the weights over its own windows around the same cells. The result is
    what ``CmtTransformer(..., attention_bias=...)`` takes.

    Args:
        attention_bias_config: the dense version's / CMTTEST's ``attention_bias_config`` dict
            (see `sparse_bias.build_attention_bias`); must be enabled. Its feature shapes define the layout.
        aqr_config: keyword arguments of `AQRWeightGenerator` (``embed_dims``, ``num_heads``,
            ``window_sizes``, ``use_type_embed``, ...; ``layout`` comes from the bias config).
        pc_range: the range the reference points are normalised over (unless ``aqr_config`` names one).

    Shapes (``forward``): ``query_embed [Q, B, C]``, ``memory`` and ``pos_embed [K, B, C]`` (as
    `CmtTransformer.flatten_memory` gives them; batch-first with ``aqr_config["batch_first"]``),
    ``ref_points [B, Q, 3]`` in [0, 1], ``lidar2img [B, V, 4, 4]``, ``img_shape = (height, width)``.
    Returns a `sparse_bias.SparseBias` (or what the bias config asks for: a dense tensor with
    ``dense=True``, a `sparse_bias.ModalityBias` with ``use_local_bias=False``); with
    ``return_weights=True`` also the `AQROutput`.

    Example:
        >>> import torch, sparse_bias as sb
        >>> head = sb.nn.AQRAttentionBias(dict(window_size=3, bev_feature_shape=(8, 8), pers_feature_shape=(2, 4, 6)),
        ...                              dict(embed_dims=16, window_sizes=[3, 3]))
        >>> K = 8 * 8 + 2 * 4 * 6
        >>> memory, pos = torch.randn(K, 2, 16), torch.randn(K, 2, 16)
        >>> lidar2img = torch.eye(4).repeat(2, 2, 1, 1)
        >>> bias = head(torch.randn(5, 2, 16), memory, pos, torch.rand(2, 5, 3), lidar2img, (32, 48))
        >>> bias.shape
        torch.Size([2, 5, 112])
    """

    def __init__(self, attention_bias_config: dict, aqr_config: Optional[dict] = None,
                 pc_range: Sequence[float] = CMT_PC_RANGE):
        super().__init__()
        generator = build_attention_bias(attention_bias_config)
        if generator is None:
            raise ValueError("attention_bias_config is disabled (enable=False): there is no bias to build")
        aqr_config = dict(aqr_config or {})
        kind = aqr_config.pop("type", "AQRWeightGenerator")
        if kind != "AQRWeightGenerator":
            raise ValueError(f"aqr_config type must be 'AQRWeightGenerator', got {kind!r}")
        for name, attr in (("bev_feature_shape", "bev_shape"), ("pers_feature_shape", "cam_shape")):
            shape = aqr_config.pop(name, None)                      # the layout comes from the bias config
            if shape is not None and tuple(shape) != getattr(generator.layout, attr):
                raise ValueError(f"aqr_config {name}={tuple(shape)} disagrees with attention_bias_config's layout "
                                 f"{generator.layout!r}")
        if "layout" in aqr_config:
            raise ValueError("aqr_config must not set layout: it comes from attention_bias_config's feature shapes")
        aqr_config.setdefault("pc_range", pc_range)
        self.bias_generator = generator
        self.aqr = AQRWeightGenerator(layout=generator.layout, **aqr_config)

    def forward(self, query_embed: torch.Tensor, memory: torch.Tensor, pos_embed: torch.Tensor,
                ref_points: torch.Tensor, lidar2img: Optional[torch.Tensor] = None,
                img_shape: Optional[Sequence[int]] = None, key_padding_mask: Optional[torch.Tensor] = None,
                return_weights: bool = False) -> Union[SparseBias, Tuple[SparseBias, AQROutput]]:
        aqr: AQROutput = self.aqr(query_embed, memory, pos_embed, ref_points, lidar2img, img_shape,
                                  key_padding_mask=key_padding_mask)
        proj = aqr.projection
        bias = self.bias_generator(aqr.lidar_weights, aqr.camera_weights, proj.bev_pos, proj.cam_pos)
        return (bias, aqr) if return_weights else bias
