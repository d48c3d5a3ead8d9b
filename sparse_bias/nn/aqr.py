"""AQR: per-query LiDAR / camera weights from a one-layer PETR decoder with a local attention mask (LAM).

The weight generator of MoME's ``AQR_with_LAM`` and of CMTTEST's ``AQRWeightGenerator``: zero queries
with the query embeddings as positions cross-attend to the whole memory, restricted to each query's camera
window and BEV window, then ``tanh(Linear(C, 2))`` gives a LiDAR and a camera weight in ``[-1, 1]``. Here
the mask is a `sparse_bias.WindowIndex` and the cross-attention is
`sparse_bias.window_attention` -- exact, O(nnz * D), no ``[B * heads, Q, K]`` bool tensor.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .._core.checks import check_tensor
from ..layout import KeyLayout
from ..projection import project_points
from ..windows import WindowIndex, local_windows
from . import mmcv_cfg
from .transformer import PETRTransformerDecoder

__all__ = ["AQRWeightGenerator", "AQROutput", "Projection"]

CMT_PC_RANGE = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)
LAM_ORDER = ("cross_attn", "norm", "ffn", "norm")
TYPE_EMBED_MODES = ("keys", "queries", "unused")
UNSEEN_MODES = ("corner", "none")


class Projection(NamedTuple):
    """Where the reference points landed, computed once and shared by the AQR and the bias generator.

    Attributes:
        bev_pos: LongTensor ``[B, Q, 2]`` BEV cells ``(row, col)`` (``-1`` = none).
        cam_pos: LongTensor ``[B, Q, M, 3]`` camera cells ``(view, row, col)`` (``view -1`` = unseen), or None.
        local_window: the AQR's local attention mask (`sparse_bias.WindowIndex`).
    """

    bev_pos: Optional[torch.Tensor]
    cam_pos: Optional[torch.Tensor]
    local_window: WindowIndex


class AQROutput(NamedTuple):
    """``(lidar_weights [B, Q], camera_weights [B, Q], projection)``, each weight in ``[-1, 1]``."""

    lidar_weights: torch.Tensor
    camera_weights: torch.Tensor
    projection: Projection


class AQRWeightGenerator(nn.Module):
    """AQR weights from a one-layer PETR decoder whose cross-attention is window attention (the LAM).

    Parameter names follow CMTTEST's ``AQRWeightGenerator`` (``encoder.layers.0.attentions.0.attn.*``,
    ``encoder.layers.0.norms.{0,1}.*``, ``encoder.layers.0.ffns.0.layers.{0.0,1}.*``, ``encoder.post_norm.*``,
    ``weight_predictor.*``, ``bev_type_embed``, ``rv_type_embed``), so its checkpoints load.

    Args:
        embed_dims: ``C``.
        num_heads: heads of the LAM cross-attention (4 in MoME / CMTTEST).
        feedforward_channels: FFN width.
        dropout: attention dropout and residual dropout of the cross-attention (mmcv ``dropout=0.1``).
        ffn_drop: FFN dropout (0 in PETR layers, which override the config's value).
        window_sizes: ``[camera, bev]`` window sizes (MoME's order), odd ints; default ``[15, 5]``.
        use_type_embed: create ``bev_type_embed`` / ``rv_type_embed`` (``[C]`` each).
        type_embed: where they go: ``"keys"`` (added to the memory positions of the BEV / camera keys),
            ``"queries"`` (both added to the query embedding, as MoME does) or ``"unused"`` (created but not
            used, as CMTTEST's code does). Default: ``"unused"`` when built from CMTTEST's config (an
            ``encoder_config`` is given), so its checkpoints reproduce its outputs; ``"keys"`` otherwise.
        pc_range: ``[x_min, y_min, z_min, x_max, y_max, z_max]`` the reference points are normalised over.
        layout: the `sparse_bias.KeyLayout` of the memory (default from the two feature shapes).
        bev_feature_shape: ``(H, W)`` of the BEV grid when no layout is given (CMT's ``(180, 180)``).
        pers_feature_shape: ``(V, Hc, Wc)`` of the camera features when no layout is given (``(6, 40, 100)``).
        unseen_camera: a point no camera sees: ``"corner"`` = a camera window at view 0, cell (0, 0), as MoME's
            and CMTTEST's projection does (``pts_pers`` set to 0), or ``"none"`` = no camera window. Only the
            LAM is affected: the returned projection keeps ``-1`` for unseen points.
        max_views: camera views kept per point by `project` (the LAM uses the first; a bias generator
            fed the returned projection may use all of them).
        init_bias: initial bias of ``weight_predictor`` (1.5: weights start at tanh(1.5) = 0.905).
        batch_first: ``[B, N, C]`` tensors instead of ``[N, B, C]``.
        backend: backend of `sparse_bias.window_attention`.
        encoder_config: CMTTEST's / MoME's encoder config (``dict(type="PETRTransformerDecoder", num_layers=1,
            transformerlayers=dict(type="PETRTransformerDecoderLayer", attn_cfgs=[dict(type="MultiheadAttention",
            embed_dims=256, num_heads=4, dropout=0.1)], ...))``); replaces ``num_heads``, ``feedforward_channels``,
            ``dropout`` and ``ffn_drop``.
        init_cfg: accepted for mmcv compatibility, unused.

    Shapes (``forward``): ``query_embed [Q, B, C]``, ``memory`` and ``pos_embed [K, B, C]`` (batch-first:
    ``[B, Q, C]``, ``[B, K, C]``), ``ref_points [B, Q, 3]`` normalised to [0, 1] over ``pc_range``,
    ``lidar2img [B, V, 4, 4]``, ``img_shape = (height, width)`` of the padded image.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 4, feedforward_channels: int = 1024,
                 dropout: float = 0.1, ffn_drop: float = 0.0, window_sizes: Sequence[int] = (15, 5),
                 use_type_embed: bool = True, type_embed: Optional[str] = None,
                 pc_range: Sequence[float] = CMT_PC_RANGE,
                 layout: Optional[KeyLayout] = None, bev_feature_shape=(180, 180), pers_feature_shape=(6, 40, 100),
                 unseen_camera: str = "corner", max_views: int = 1, init_bias: float = 1.5, batch_first: bool = False,
                 backend: str = "auto", encoder_config: Optional[dict] = None, init_cfg=None):
        super().__init__()
        if layout is None:
            layout = KeyLayout(bev_shape=tuple(bev_feature_shape), cam_shape=tuple(pers_feature_shape))
        if not isinstance(layout, KeyLayout):
            raise TypeError(f"layout must be a KeyLayout or None, got {type(layout).__name__}")
        if not isinstance(window_sizes, (tuple, list)) or len(window_sizes) != 2:
            raise ValueError(f"window_sizes must be [camera, bev] window sizes, got {window_sizes!r}")
        for name, size in zip(("window_sizes[0] (camera)", "window_sizes[1] (bev)"), window_sizes):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
                raise ValueError(f"{name} must be an odd positive int, got {size!r}")
        if type_embed is None:
            type_embed = "unused" if encoder_config is not None else "keys"
        if type_embed not in TYPE_EMBED_MODES:
            raise ValueError(f"type_embed must be one of {TYPE_EMBED_MODES}, got {type_embed!r}")
        if unseen_camera not in UNSEEN_MODES:
            raise ValueError(f"unseen_camera must be one of {UNSEEN_MODES}, got {unseen_camera!r}")
        self.layout, self.embed_dims, self.num_heads = layout, embed_dims, num_heads
        self.window_sizes = tuple(window_sizes)
        self.pc_range = tuple(float(x) for x in pc_range)
        self.use_type_embed, self.type_embed, self.unseen_camera = use_type_embed, type_embed, unseen_camera
        self.batch_first, self.max_views = batch_first, max_views
        if encoder_config is not None:
            self.encoder = PETRTransformerDecoder(**mmcv_cfg.decoder_kwargs(encoder_config, backend))
            if self.encoder.layers[0].operation_order[0] != "cross_attn" or len(self.encoder.layers[0].attentions) != 1:
                raise ValueError(f"encoder_config must describe LAM layers with one cross-attention "
                                 f"(operation_order {LAM_ORDER}), got {self.encoder.layers[0].operation_order}")
            self.num_heads = self.encoder.layers[0].attentions[0].num_heads
            if self.encoder.layers[0].embed_dims != embed_dims:
                raise ValueError(f"encoder_config has embed_dims {self.encoder.layers[0].embed_dims} but "
                                 f"embed_dims is {embed_dims}")
        else:
            self.encoder = PETRTransformerDecoder(num_layers=1, return_intermediate=True, post_norm=True,
                                                  embed_dims=embed_dims, num_heads=num_heads,
                                                  feedforward_channels=feedforward_channels, dropout=dropout,
                                                  ffn_drop=ffn_drop, operation_order=LAM_ORDER, backend=backend)
        self.weight_predictor = nn.Linear(embed_dims, 2)
        if use_type_embed:
            self.bev_type_embed = nn.Parameter(torch.randn(embed_dims))
            self.rv_type_embed = nn.Parameter(torch.randn(embed_dims))
        self.init_bias = init_bias
        self.init_weights()

    def init_weights(self):
        """Xavier-uniform for every matrix, ``weight_predictor.bias = init_bias`` (as CMTTEST)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.constant_(self.weight_predictor.bias, self.init_bias)

    def project(self, ref_points: torch.Tensor, lidar2img: Optional[torch.Tensor] = None,
                img_shape: Optional[Sequence[int]] = None) -> tuple:
        """``(bev_pos [B, Q, 2], cam_pos [B, Q, M, 3])`` of `sparse_bias.project_points` with
        ``M = max_views`` (the first views that see each point; ``-1`` = unseen)."""
        return project_points(ref_points, self.pc_range, self.layout, lidar2img, img_shape, max_views=self.max_views)

    def local_window(self, bev_pos: Optional[torch.Tensor], cam_pos: Optional[torch.Tensor]) -> WindowIndex:
        """The LAM as a `sparse_bias.WindowIndex`: camera window ``window_sizes[0]`` in the first view
        that sees the point (MoME keeps one view; unseen points per ``unseen_camera``), BEV ``window_sizes[1]``."""
        cam_window, bev_window = self.window_sizes
        if cam_pos is not None:
            cam_pos = cam_pos[:, :, :1] if cam_pos.dim() == 4 else cam_pos.unsqueeze(2)
            if self.unseen_camera == "corner":
                cam_pos = cam_pos.masked_fill(cam_pos[..., :1] < 0, 0)
        return local_windows(self.layout, bev_pos if self.layout.bev_shape else None,
                             cam_pos if self.layout.cam_shape else None, bev_window=bev_window, cam_window=cam_window)

    def forward(self, query_embed: torch.Tensor, memory: torch.Tensor, pos_embed: torch.Tensor,
                ref_points: Optional[torch.Tensor] = None, lidar2img: Optional[torch.Tensor] = None,
                img_shape: Optional[Sequence[int]] = None, *, bev_pos: Optional[torch.Tensor] = None,
                cam_pos: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                dense_mask: bool = False) -> AQROutput:
        """LiDAR and camera weights of every query.

        Args:
            query_embed: ``[Q, B, C]`` query positional embeddings (the decoder's queries start at zero).
            memory: ``[K, B, C]`` memory, keys in layout order (BEV, then cameras).
            pos_embed: ``[K, B, C]`` memory positions.
            ref_points: ``[B, Q, 3]`` normalised reference points (not needed when ``bev_pos``/``cam_pos`` are given).
            lidar2img: ``[B, V, 4, 4]`` lidar-to-image matrices -- or CMTTEST's ``img_metas`` (a list of one dict
                per sample with ``"lidar2img"`` (V matrices) and ``"img_shape"`` (per view ``(H, W, ...)``)), in
                which case ``img_shape`` is taken from it.
            img_shape: padded image ``(height, width)``.
            bev_pos: a projection computed elsewhere instead: BEV cells ``[B, Q, 2]``.
            cam_pos: and camera cells ``[B, Q, 3]`` or ``[B, Q, M, 3]``.
            key_padding_mask: bool ``[B, K]``, True = ignore.
            dense_mask: run the cross-attention with the dense bool LAM ``[B * heads, Q, K]`` (MoME's current
                practice; memory ``O(B * heads * Q * K)``) instead of window attention -- for comparisons.

        Returns:
            `AQROutput` ``(lidar_weights [B, Q], camera_weights [B, Q], projection)``.
        """
        query_embed, memory, pos_embed = (t if not self.batch_first else t.transpose(0, 1)
                                          for t in (query_embed, memory, pos_embed))
        for name, t in (("query_embed", query_embed), ("memory", memory), ("pos_embed", pos_embed)):
            check_tensor(name, t, ndim=(3,), floating=True)
        layout_name = "[B, N, C]" if self.batch_first else "[N, B, C]"
        nk, bsz, c = memory.shape
        if c != self.embed_dims or pos_embed.shape != memory.shape:
            raise ValueError(f"memory and pos_embed must both be {layout_name} with C = {self.embed_dims} "
                             f"(batch_first={self.batch_first}), got {tuple(memory.shape)} and {tuple(pos_embed.shape)}")
        if nk != self.layout.num_keys:
            raise ValueError(f"memory has {nk} keys but the layout has {self.layout.num_keys} ({self.layout!r})")
        if query_embed.shape[1:] != (bsz, c):
            raise ValueError(f"query_embed must be {layout_name} = [Q, {bsz}, {c}] (batch_first={self.batch_first}), "
                             f"got {tuple(query_embed.shape)}")
        if isinstance(lidar2img, (list, tuple)):
            lidar2img, img_shape = _from_img_metas(lidar2img, memory.device)
        if bev_pos is None and cam_pos is None:
            if ref_points is None:
                raise ValueError("AQRWeightGenerator needs ref_points (with lidar2img, img_shape) or bev_pos/cam_pos")
            bev_pos, cam_pos = self.project(ref_points, lidar2img, img_shape)
        win = self.local_window(bev_pos, cam_pos)
        if win.batch_size != bsz or win.num_queries != query_embed.shape[0]:
            raise ValueError(f"the projection is for [B, Q] = [{win.batch_size}, {win.num_queries}] but query_embed "
                             f"gives [{bsz}, {query_embed.shape[0]}]")
        lidar, camera = self._weights(query_embed, memory, pos_embed, win, key_padding_mask, dense_mask)
        return AQROutput(lidar, camera, Projection(bev_pos, cam_pos, win))

    def weights(self, query_embed: torch.Tensor, memory: torch.Tensor, pos_embed: torch.Tensor, win: WindowIndex,
                key_padding_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The weights of `forward` for a window index built already (``win``: `local_window`, or
        ``forward(...).projection.local_window``): ``(lidar_weights [B, Q], camera_weights [B, Q])``. Reads no device value on the host, so
        it compiles with ``torch.compile(fullgraph=True)`` (building the index, in `forward`, cannot: its size comes
        from the data). Shapes as in `forward` (``[N, B, C]``, or ``[B, N, C]`` with ``batch_first``)."""
        query_embed, memory, pos_embed = (t if not self.batch_first else t.transpose(0, 1)
                                          for t in (query_embed, memory, pos_embed))
        return self._weights(query_embed, memory, pos_embed, win, key_padding_mask, False)

    def _weights(self, query_embed, memory, pos_embed, win, key_padding_mask, dense_mask):
        nk, _, c = memory.shape
        if self.use_type_embed and self.type_embed == "keys":
            nb = self.layout.num_bev_keys
            type_pos = torch.cat([self.bev_type_embed.expand(nb, c), self.rv_type_embed.expand(nk - nb, c)])
            pos_embed = pos_embed + type_pos.unsqueeze(1)
        elif self.use_type_embed and self.type_embed == "queries":
            query_embed = query_embed + self.bev_type_embed + self.rv_type_embed
        if dense_mask:
            blocked = ~win.to_dense_mask()                                                  # [B, Q, K], True = blocked
            mask = blocked.unsqueeze(1).expand(-1, self.num_heads, -1, -1).reshape(-1, *blocked.shape[1:])
        else:
            mask = win
        target = torch.zeros_like(query_embed)
        out = self.encoder(target, memory, memory, query_pos=query_embed, key_pos=pos_embed, attn_masks=[mask],
                           key_padding_mask=key_padding_mask)[-1]                            # [Q, B, C]
        weights = torch.tanh(self.weight_predictor(out.transpose(0, 1)))                    # [B, Q, 2]
        return weights[..., 0], weights[..., 1]

    def extra_repr(self) -> str:
        return (f"window_sizes={list(self.window_sizes)} (camera, bev), type_embed={self.type_embed!r}, "
                f"unseen_camera={self.unseen_camera!r}, layout={self.layout}")


def _from_img_metas(img_metas, device):
    """``(lidar2img [B, V, 4, 4], (H, W))`` from mmdet3d's ``img_metas`` (CMTTEST's AQR call)."""
    if not img_metas or not all(isinstance(m, dict) and "lidar2img" in m and "img_shape" in m for m in img_metas):
        raise TypeError("lidar2img must be a [B, V, 4, 4] tensor or img_metas: a list of dicts with 'lidar2img' and "
                        "'img_shape'")
    mats = torch.stack([torch.stack([torch.as_tensor(m, dtype=torch.float64) for m in meta["lidar2img"]])
                        for meta in img_metas]).to(device)
    shape = img_metas[0]["img_shape"]
    shape = shape[0] if isinstance(shape[0], (tuple, list)) else shape       # per-view shapes: the first view's
    return mats, (int(shape[0]), int(shape[1]))
