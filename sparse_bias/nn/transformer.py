"""CMT / PETR decoder modules (mmcv 1.x calling conventions, no mmcv dependency)."""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..bias import SparseBias
from ..windows import WindowIndex
from . import mmcv_cfg
from .attention import SparseBiasMultiheadAttention, check_forward_keywords

__all__ = ["FFN", "PETRTransformerDecoderLayer", "PETRTransformerDecoder", "CmtTransformer"]

DEFAULT_ORDER = ("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")


#: attention masks of a layer: one for all attentions, or one per attention (a dense mask or a `WindowIndex`)
Masks = Union[Tensor, WindowIndex, Sequence[Union[Tensor, WindowIndex, None]], None]

class FFN(nn.Module):
    """mmcv's FFN: ``identity + (Linear -> ReLU -> Dropout -> Linear -> Dropout)(x)``; shapes ``[..., C]``.

    Laid out as mmcv lays it out (``layers.0.0`` the first Linear, ``layers.1`` the second), so mmcv
    checkpoints load unchanged.
    """

    def __init__(self, embed_dims: int = 256, feedforward_channels: int = 1024, ffn_drop: float = 0.0):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims), nn.Dropout(ffn_drop))

    def forward(self, x: Tensor, identity: Optional[Tensor] = None) -> Tensor:
        return (x if identity is None else identity) + self.layers(x)


class PETRTransformerDecoderLayer(nn.Module):
    """PETR / CMT decoder layer: ``operation_order`` over self-attention, cross-attention, FFN and norms.

    The ``attention_bias`` reaches only the cross-attention. Tensors are sequence-first ``[N, B, C]``
    unless ``batch_first``.

    Args:
        embed_dims: ``C``.
        num_heads: ``H``.
        feedforward_channels: the FFN width.
        dropout: attention dropout and residual dropout of the attentions (mmcv's ``dropout=0.1``).
        ffn_drop: FFN dropout. PETR's decoder layer passes ``ffn_dropout=0.0`` to mmcv, which overrides the
            config's ``ffn_drop``: CMT trains with 0, the default here.
        operation_order: mmcv's tuple of ``"self_attn"``, ``"cross_attn"``, ``"norm"``, ``"ffn"``; a
            leading ``"norm"`` makes it pre-norm.
        backend: backend of `sparse_bias.sparse_bias_attention`.
        attn_cfgs: mmcv's attention configs (one dict for all, or one per attention); types
            ``MultiheadAttention``, ``PETRMultiheadAttention``, ``PETRMultiheadFlashAttention`` all become
            `SparseBiasMultiheadAttention`. Given, they define ``embed_dims`` and the heads.
        ffn_cfgs: mmcv's FFN config (``type="FFN"``, ReLU, two layers).
        ffn_dropout: PETR's layer argument: overrides ``ffn_cfgs["ffn_drop"]`` (PETR passes 0.0).
        ffn_num_fcs: PETR's layer argument (2).
        with_cp: gradient checkpointing of the layer in training (PETR's default when built from a config).
        norm_cfg: ``dict(type="LN")`` (the only norm supported).
        act_cfg: ``dict(type="ReLU", inplace=True)`` (the only activation supported).
        init_cfg: accepted for mmcv compatibility, unused.

    Built from an unchanged CMT config (``attn_cfgs``, ``ffn_cfgs``, ``feedforward_channels``,
    ``operation_order``, ``with_cp``), it has the dense version's structure and state-dict names
    (``attentions.{i}.attn.*``, ``ffns.0.layers.{0.0,1}.*``, ``norms.{i}.*``).
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, feedforward_channels: int = 1024,
                 dropout: float = 0.1, operation_order: Sequence[str] = DEFAULT_ORDER, batch_first: bool = False,
                 backend: str = "auto", ffn_drop: float = 0.0, *, attn_cfgs: Union[dict, List[dict], None] = None,
                 ffn_cfgs: Optional[dict] = None, ffn_dropout: Optional[float] = None,
                 ffn_num_fcs: Optional[int] = None, with_cp: Optional[bool] = None, norm_cfg: Optional[dict] = None,
                 act_cfg: Optional[dict] = None, init_cfg=None):
        super().__init__()
        if operation_order is None:
            raise ValueError("operation_order is required")
        bad = set(operation_order) - {"self_attn", "cross_attn", "norm", "ffn"}
        if bad:
            raise ValueError(f"operation_order holds unknown operations {sorted(bad)}")
        mmcv_cfg.check_norm_cfg(norm_cfg, "norm_cfg")
        if act_cfg is not None and act_cfg.get("type") != "ReLU":
            raise ValueError(f"act_cfg {act_cfg!r} is not supported (ReLU only)")
        self.operation_order, self.batch_first = tuple(operation_order), batch_first
        self.pre_norm = self.operation_order[0] == "norm"
        self.with_cp = bool(attn_cfgs is not None if with_cp is None else with_cp)
        n_attn = sum(op in ("self_attn", "cross_attn") for op in operation_order)
        if attn_cfgs is not None:                                   # built from an mmcv config
            self.attentions = nn.ModuleList(
                SparseBiasMultiheadAttention(**mmcv_cfg.attention_kwargs(c, batch_first, backend))
                for c in mmcv_cfg.attention_cfgs(attn_cfgs, n_attn))
            embed_dims = self.attentions[0].embed_dims if n_attn else embed_dims
            ffn_dropout = 0.0 if ffn_dropout is None else ffn_dropout   # PETR's layer default
            self.ffns = nn.ModuleList(
                FFN(**mmcv_cfg.ffn_kwargs(ffn_cfgs, embed_dims, feedforward_channels, ffn_dropout, ffn_num_fcs))
                for _ in range(self.operation_order.count("ffn")))
        else:
            self.attentions = nn.ModuleList(
                SparseBiasMultiheadAttention(embed_dims, num_heads, attn_drop=dropout,
                                             dropout_layer=dict(type="Dropout", drop_prob=dropout),
                                             batch_first=batch_first, backend=backend) for _ in range(n_attn))
            self.ffns = nn.ModuleList(
                FFN(**mmcv_cfg.ffn_kwargs(ffn_cfgs, embed_dims, feedforward_channels,
                                          ffn_drop if ffn_dropout is None else ffn_dropout, ffn_num_fcs))
                for _ in range(self.operation_order.count("ffn")))
        self.embed_dims = embed_dims
        self.norms = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(self.operation_order.count("norm")))

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None, key_pos: Optional[Tensor] = None, attn_masks: Masks = None,
                query_key_padding_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                attention_bias: Union[SparseBias, Tensor, None] = None, local_window: Optional[WindowIndex] = None,
                **kwargs) -> Tensor:
        """Shapes: query ``[Q, B, C]``, key/value ``[K, B, C]`` (batch-first when asked); ``attn_masks`` a list
        with one mask per attention (or one for all); returns ``[Q, B, C]``.

        ``local_window`` (a `sparse_bias.WindowIndex`) makes the cross-attention a local-mask (LAM)
        window attention; a ``WindowIndex`` in ``attn_masks`` at the cross-attention's place does the same.
        A dense ``attention_bias`` is in the attention's layout (``[Q, B, K]`` unless ``batch_first``).

        ``**kwargs``: only `sparse_bias.nn.attention.MMCV_IGNORED_KEYWORDS` (``reg_branch``, which CMT's
        transformer passes and its layer drops, ...), accepted and ignored as the dense modules ignore them;
        any other keyword is a ``TypeError`` naming it, with a "did you mean" for a near miss.
        """
        if kwargs:
            check_forward_keywords(f"{type(self).__name__}.forward", kwargs, _LAYER_KEYWORDS)
        extras = dict(query_pos=query_pos, key_pos=key_pos, attn_masks=attn_masks,
                      query_key_padding_mask=query_key_padding_mask, key_padding_mask=key_padding_mask,
                      attention_bias=attention_bias, local_window=local_window)
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, query, key, value, extras, use_reentrant=False)
        return self._forward(query, key, value, extras)

    def _forward(self, query, key, value, extras):
        """The layer's operations; ``extras`` holds the keyword arguments of `forward` besides q / k / v."""
        query_pos, key_pos, attn_masks = extras["query_pos"], extras["key_pos"], extras["attn_masks"]
        query_key_padding_mask, key_padding_mask = extras["query_key_padding_mask"], extras["key_padding_mask"]
        attention_bias, local_window = extras["attention_bias"], extras["local_window"]
        n_attn = len(self.attentions)
        if attn_masks is None or isinstance(attn_masks, (torch.Tensor, WindowIndex)):
            attn_masks = [attn_masks] * n_attn
        elif len(attn_masks) != n_attn:
            raise ValueError(f"attn_masks must hold {n_attn} masks (one per attention), got {len(attn_masks)}")
        norm_i = attn_i = ffn_i = 0
        identity = query
        for op in self.operation_order:
            if op == "self_attn":
                query = self.attentions[attn_i](query, query, query, identity if self.pre_norm else None,
                                                query_pos=query_pos, key_pos=query_pos, attn_mask=attn_masks[attn_i],
                                                key_padding_mask=query_key_padding_mask)
                attn_i += 1
                identity = query
            elif op == "norm":
                query = self.norms[norm_i](query)
                norm_i += 1
            elif op == "cross_attn":
                query = self.attentions[attn_i](query, key, value, identity if self.pre_norm else None,
                                                query_pos=query_pos, key_pos=key_pos, attn_mask=attn_masks[attn_i],
                                                key_padding_mask=key_padding_mask, attention_bias=attention_bias,
                                                local_window=local_window)
                attn_i += 1
                identity = query
            else:
                query = self.ffns[ffn_i](query, identity if self.pre_norm else None)
                ffn_i += 1
        return query


#: the keywords `PETRTransformerDecoderLayer.forward` names, after ``query`` (for the "did you mean")
_LAYER_KEYWORDS = tuple(p for p in inspect.signature(PETRTransformerDecoderLayer.forward).parameters
                        if p not in ("self", "query", "kwargs"))
_LAYER_KEYWORDS_SET = frozenset(_LAYER_KEYWORDS)


class PETRTransformerDecoder(nn.Module):
    """A stack of `PETRTransformerDecoderLayer` with an optional post-norm.

    Args:
        num_layers: number of layers.
        return_intermediate: return every layer's (post-normed) output stacked ``[L, Q, B, C]``; otherwise
            the last one as ``[1, Q, B, C]``.
        post_norm: apply a final LayerNorm.
        transformerlayers: mmcv's layer config (one dict copied ``num_layers`` times, or one per layer), as
            CMT's config gives it; replaces ``layer_kwargs``.
        post_norm_cfg: PETR's ``dict(type="LN")`` or None (overrides ``post_norm`` when given).
        init_cfg: accepted for mmcv compatibility, unused.
        **layer_kwargs: passed to every `PETRTransformerDecoderLayer`.
    """

    _UNSET = object()

    def __init__(self, num_layers: Optional[int] = 6, return_intermediate: bool = True, post_norm: bool = True, *,
                 transformerlayers: Union[dict, List[dict], None] = None, post_norm_cfg=_UNSET, init_cfg=None,
                 **layer_kwargs):
        super().__init__()
        if transformerlayers is not None:
            backend = layer_kwargs.pop("backend", "auto")
            if layer_kwargs:
                raise TypeError(f"PETRTransformerDecoder got unexpected keyword arguments {sorted(layer_kwargs)}")
            cfgs = mmcv_cfg.layer_cfgs(transformerlayers, num_layers)
            self.layers = nn.ModuleList(PETRTransformerDecoderLayer(**dict(dict(backend=backend), **c)) for c in cfgs)
        else:
            self.layers = nn.ModuleList(PETRTransformerDecoderLayer(**layer_kwargs) for _ in range(num_layers))
        if post_norm_cfg is not PETRTransformerDecoder._UNSET:
            mmcv_cfg.check_norm_cfg(post_norm_cfg, "post_norm_cfg")
            post_norm = post_norm_cfg is not None
        embed_dims = self.layers[0].embed_dims if len(self.layers) else layer_kwargs.get("embed_dims", 256)
        self.post_norm = nn.LayerNorm(embed_dims) if post_norm else None
        self.return_intermediate = return_intermediate

    def forward(self, query: Tensor, *args, **kwargs) -> Tensor:
        """Shapes as `PETRTransformerDecoderLayer`, except a dense ``attention_bias``: ``[B, Q, K]`` here
        (the dense version's decoder level), handed to the layers in their sequence layout (``[Q, B, K]``
        unless ``batch_first``), as CMTTEST's decoder does. Keywords are the layer's: any other than
        `sparse_bias.nn.attention.MMCV_IGNORED_KEYWORDS` is a ``TypeError`` naming the decoder."""
        others = {k: v for k, v in kwargs.items() if k not in _LAYER_KEYWORDS_SET}   # (dynamo 2.4 traces no keys() - set)
        if others:
            check_forward_keywords(f"{type(self).__name__}.forward", others, _LAYER_KEYWORDS)
        bias = kwargs.get("attention_bias")
        if isinstance(bias, torch.Tensor) and bias.dim() == 3 and self.layers and not self.layers[0].batch_first:
            kwargs["attention_bias"] = bias.transpose(0, 1)
        outputs = []
        for layer in self.layers:
            query = layer(query, *args, **kwargs)
            if self.return_intermediate:
                outputs.append(self.post_norm(query) if self.post_norm is not None else query)
        if not self.return_intermediate:
            outputs.append(self.post_norm(query) if self.post_norm is not None else query)
        return torch.stack(outputs)


class CmtTransformer(nn.Module):
    """CMT's transformer: BEV and camera features flattened into one memory, then the PETR decoder.

    Built from arguments, or from CMT's config: ``CmtTransformer(decoder=dict(type="PETRTransformerDecoder",
    transformerlayers=dict(type="PETRTransformerDecoderLayer", attn_cfgs=[...], ...), ...))``.

    Memory key order: BEV ``h * W + w`` first, then camera ``v * Hc * Wc + h * Wc + w`` -- the
    `sparse_bias.KeyLayout` order, so a bias from `AttentionBiasGenerator` lines up.

    ``forward(x, x_img, query_embed, bev_pos_embed, rv_pos_embed, attn_masks=None, attention_bias=None)``:

    - ``x`` ``[B, C, H, W]`` BEV features; ``x_img`` ``[B * V, C, Hc, Wc]`` camera features (either may be
      None for a single-modality model);
    - ``query_embed`` ``[B, Q, C]``; ``bev_pos_embed`` ``[H * W, C]`` (or ``[B, H * W, C]``);
      ``rv_pos_embed`` ``[B * V, Hc, Wc, C]``;
    - ``attn_masks``: the self-attention mask (e.g. the denoising mask), ``[Q, Q]`` bool, True = blocked;
    - ``attention_bias``: for the cross-attention only.

    Returns ``(out_dec [num_layers, B, Q, C], memory [B, K, C])``.
    """

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_layers: int = 6,
                 feedforward_channels: int = 1024, dropout: float = 0.1, backend: str = "auto",
                 return_intermediate: bool = True, *, decoder: Optional[dict] = None, encoder: Optional[dict] = None,
                 init_cfg=None, cross: bool = False):
        super().__init__()
        if encoder is not None or cross:
            raise ValueError("CmtTransformer has no encoder (encoder=None, cross=False, as CMT's configs set them)")
        if decoder is not None:                 # CMT's config: decoder=dict(type="PETRTransformerDecoder", ...)
            self.decoder = PETRTransformerDecoder(**mmcv_cfg.decoder_kwargs(decoder, backend))
            embed_dims = self.decoder.layers[0].embed_dims
        else:
            self.decoder = PETRTransformerDecoder(num_layers, return_intermediate=return_intermediate,
                                                  embed_dims=embed_dims, num_heads=num_heads,
                                                  feedforward_channels=feedforward_channels, dropout=dropout,
                                                  backend=backend)
        self.embed_dims = embed_dims
        self.init_weights()

    def init_weights(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @staticmethod
    def flatten_memory(x, x_img, bev_pos_embed, rv_pos_embed, batch_size: int):
        """``(memory [K, B, C], pos [K, B, C])``: BEV cells then camera cells, in `sparse_bias.KeyLayout`
        order, from ``x [B, C, H, W]``, ``x_img [B * V, C, Hc, Wc]`` (either may be None),
        ``bev_pos_embed [H * W, C]`` or ``[B, H * W, C]`` and ``rv_pos_embed [B * V, Hc, Wc, C]``."""
        memory, pos = [], []
        _check_memory_inputs(x, x_img, bev_pos_embed, rv_pos_embed, batch_size)
        if x is not None:
            memory.append(rearrange(x, "b c h w -> (h w) b c"))
            bev = bev_pos_embed if bev_pos_embed.dim() == 3 else bev_pos_embed.unsqueeze(0).expand(batch_size, -1, -1)
            pos.append(rearrange(bev, "b n c -> n b c"))
        if x_img is not None:
            memory.append(rearrange(x_img, "(b v) c h w -> (v h w) b c", b=batch_size))
            pos.append(rearrange(rv_pos_embed, "(b v) h w c -> (v h w) b c", b=batch_size))
        return torch.cat(memory, dim=0), torch.cat(pos, dim=0)

    def forward(self, x: Tensor, x_img: Tensor, query_embed: Tensor, bev_pos_embed: Tensor, rv_pos_embed: Tensor,
                attn_masks: Masks = None, attention_bias: Union[SparseBias, Tensor, None] = None,
                reg_branch: Optional[object] = None) -> Tuple[Tensor, Tensor]:
        memory, pos = self.flatten_memory(x, x_img, bev_pos_embed, rv_pos_embed, query_embed.shape[0])  # [K, B, C]
        query_pos = query_embed.transpose(0, 1)                                           # [Q, B, C]
        target = torch.zeros_like(query_pos)
        out_dec = self.decoder(target, memory, memory, query_pos=query_pos, key_pos=pos,
                               attn_masks=[attn_masks, None], attention_bias=attention_bias)
        return out_dec.transpose(1, 2), memory.transpose(0, 1)


def _check_memory_inputs(x, x_img, bev_pos_embed, rv_pos_embed, batch_size):
    """The shapes of CmtTransformer's memory inputs, with errors naming the argument and the expected layout."""
    def shape(t):
        return None if t is None else tuple(t.shape)
    if x is not None:
        if x.dim() != 4 or x.shape[0] != batch_size:
            raise ValueError(f"x (the BEV features) must be [B, C, H, W] with B = {batch_size} (query_embed's batch), "
                             f"got {shape(x)}")
        _, c, h, w = x.shape
        ok = bev_pos_embed is not None and (tuple(bev_pos_embed.shape) == (h * w, c)
                                           or tuple(bev_pos_embed.shape) == (batch_size, h * w, c))
        if not ok:
            raise ValueError(f"bev_pos_embed must be [H * W, C] = [{h * w}, {c}] or [B, H * W, C] = "
                             f"[{batch_size}, {h * w}, {c}] for x {shape(x)}, got {shape(bev_pos_embed)}")
    if x_img is not None:
        if x_img.dim() != 4 or x_img.shape[0] % batch_size:
            raise ValueError(f"x_img (the camera features) must be [B * V, C, Hc, Wc] with B = {batch_size}, got "
                             f"{shape(x_img)}")
        bv, c, h, w = x_img.shape
        if rv_pos_embed is None or tuple(rv_pos_embed.shape) != (bv, h, w, c):
            hint = ""
            if rv_pos_embed is not None and tuple(rv_pos_embed.shape) == (bv, c, h, w):
                hint = " (it is channels-first: pass rv_pos_embed.permute(0, 2, 3, 1))"
            raise ValueError(f"rv_pos_embed must be [B * V, Hc, Wc, C] = [{bv}, {h}, {w}, {c}] for x_img "
                             f"{shape(x_img)}, got {shape(rv_pos_embed)}{hint}")
