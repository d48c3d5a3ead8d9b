"""Multi-head attention with a sparse local bias, with mmcv 1.x ``MultiheadAttention`` calling conventions."""
from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from einops import rearrange
from torch import nn

from .._core.inputs import AttentionInputs
from .._core.masks import module_masks
from .._core.reference import dense_attention
from ..attention import attend
from ..bias import ModalityBias, SparseBias
from ..window_attention import attend_windows
from ..windows import WindowIndex

__all__ = ["SparseBiasMultiheadAttention", "MMCV_IGNORED_KEYWORDS"]

logger = logging.getLogger("sparse_bias")

#: Extra keywords that `SparseBiasMultiheadAttention.forward`, `PETRTransformerDecoderLayer.forward` and
#: `PETRTransformerDecoder.forward` accept and ignore, as the dense modules ignore them. They are the data flow
#: that the dense versions' decoders hand on: CMT's, PETR's, StreamPETR's and MoME's transformers pass
#: ``reg_branch`` to their decoder (whose layers drop it), and mmcv 1.x's ``BaseTransformerLayer.forward`` hands
#: its ``**kwargs`` to every attention -- in Deformable-DETR-style decoders ``reference_points``,
#: ``spatial_shapes`` and ``level_start_index``, which mmcv's ``MultiheadAttention`` ignores. Any other
#: unexpected keyword is a ``TypeError`` naming it (a misspelt ``attention_bias`` or ``local_window`` would
#: otherwise change the result silently). StreamPETR's ``temp_memory`` / ``temp_pos`` are deliberately not
#: here: its decoder layer *uses* them (the temporal memory joins the self-attention keys), so dropping them
#: would change the result.
MMCV_IGNORED_KEYWORDS = ("reg_branch", "reference_points", "spatial_shapes", "level_start_index")


def _suggest(name: str, accepted: Sequence[str]) -> Optional[str]:
    """The accepted keyword closest to ``name`` (difflib ratio, plus a bonus for the same last ``_`` word, so
    ``bias`` -> ``attention_bias`` and ``attention_mask`` -> ``attn_mask``), or None when none is close."""
    low = name.lower()
    scored = [(difflib.SequenceMatcher(None, low, c).ratio() + 0.2 * (low.split("_")[-1] == c.split("_")[-1]), c)
              for c in accepted]
    best = max(scored, default=(0.0, None))
    return best[1] if best[0] >= 0.6 else None


def check_forward_keywords(owner: str, kwargs: dict, named: Sequence[str]) -> None:
    """Raise a ``TypeError`` naming ``owner`` and every keyword in ``kwargs`` that is not one of
    `MMCV_IGNORED_KEYWORDS`, with a "did you mean" over ``named`` (the owner's own keywords) and those."""
    unexpected = [k for k in kwargs if k not in MMCV_IGNORED_KEYWORDS]
    if not unexpected:
        return
    accepted = tuple(named) + MMCV_IGNORED_KEYWORDS
    parts = []
    for k in unexpected:
        hint = _suggest(k, accepted)
        parts.append(repr(k) + (f" (did you mean {hint!r}?)" if hint else ""))
    plural = "s" if len(parts) > 1 else ""
    raise TypeError(f"{owner}() got unexpected keyword argument{plural} {', '.join(parts)}; it takes "
                    f"{', '.join(named)}, and accepts and ignores {', '.join(MMCV_IGNORED_KEYWORDS)} as the dense "
                    f"mmcv modules do")


class SparseBiasMultiheadAttention(nn.Module):
    """Drop-in for mmcv's ``MultiheadAttention`` that also takes an ``attention_bias``.

    Parameters live in ``self.attn``, an ``nn.MultiheadAttention`` used only as a parameter container, so
    state dicts of mmcv's ``MultiheadAttention`` (``attn.in_proj_weight``, ``attn.out_proj.weight``, ...)
    load unchanged. The attention itself runs through `sparse_bias.sparse_bias_attention`.

    Args:
        embed_dims: ``C``.
        num_heads: ``H`` (``C`` must be divisible by it).
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        dropout_layer: mmcv-style config of the dropout on the residual branch: ``dict(type="Dropout",
            drop_prob=p)`` or ``dict(type="DropPath", drop_prob=p)`` (None = identity).
        batch_first: ``[B, N, C]`` tensors instead of mmcv's default ``[N, B, C]``.
        backend: backend of `sparse_bias_attention`.
        **kwargs: only ``dropout``, mmcv's legacy keyword (deprecated there): used as both ``attn_drop`` and
            the ``dropout_layer`` drop probability, with a warning, as mmcv does.
    """

    def __init__(self, embed_dims: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 dropout_layer: Optional[dict] = None, batch_first: bool = False, backend: str = "auto",
                 init_cfg=None, **kwargs):
        super().__init__()
        if "dropout" in kwargs:
            warnings.warn("The arguments `dropout` in MultiheadAttention has been deprecated, now you can "
                          "separately set `attn_drop`(float), proj_drop(float), and `dropout_layer`(dict) ",
                          DeprecationWarning)
            attn_drop = kwargs["dropout"]
            dropout_layer = dict(dropout_layer or dict(type="Dropout", drop_prob=0.0), drop_prob=kwargs.pop("dropout"))
        if kwargs:
            raise TypeError(f"SparseBiasMultiheadAttention got unexpected keyword arguments {sorted(kwargs)}")
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        self.embed_dims, self.num_heads, self.batch_first, self.backend = embed_dims, num_heads, batch_first, backend
        self.attn_drop = float(attn_drop)
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dropout_layer = _build_dropout(dropout_layer)

    def forward(self, query: Tensor, key: Optional[Tensor] = None, value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None, query_pos: Optional[Tensor] = None, key_pos: Optional[Tensor] = None,
                attn_mask: Union[Tensor, WindowIndex, None] = None, key_padding_mask: Optional[Tensor] = None,
                attention_bias: Union[SparseBias, Tensor, None] = None, local_window: Optional[WindowIndex] = None,
                **kwargs) -> Tensor:
        """mmcv's ``MultiheadAttention.forward`` plus ``attention_bias``.

        Args:
            query: ``[Q, B, C]`` (``[B, Q, C]`` with ``batch_first``).
            key: ``[K, B, C]``, defaults to ``query``.
            value: ``[K, B, C]``, defaults to ``key``.
            identity: residual added to the output (default ``query``, before ``query_pos``).
            query_pos: positional encoding added to the query.
            key_pos: positional encoding added to the key (not the value); falls back to ``query_pos``
                when their shapes match (mmcv's rule).
            attn_mask: mmcv's and ``nn.MultiheadAttention``'s convention: ``[Q, K]`` or ``[B * H, Q, K]``, bool
                (True = blocked), uint8 (nonzero = blocked) or an additive float mask (0 = keep, ``-inf`` =
                blocked) -- the opposite bool convention of `sparse_bias.sparse_bias_attention`'s ``attn_mask``.
                A `WindowIndex` here is taken as ``local_window`` (so ``attn_masks=[win]`` of a PETR
                decoder layer turns a LAM layer's dense mask into window attention).
            key_padding_mask: ``[B, K]`` as ``nn.MultiheadAttention`` takes it: bool (True = ignore), uint8
                (nonzero = ignore) or an additive float mask. CMT's all-zero float mask equals no mask.
                For both masks, a float mask holding 1.0 and otherwise only 0.0 is a `ValueError`, and a mask
                blocking every key of every query a ``UserWarning`` (the attention output would be zeros, the
                result ``identity + out_proj.bias``); the messages name the argument and this convention
                (docs/masks.md, also for when the values are read).
            attention_bias: a `SparseBias` / `ModalityBias` (layout-free; its sequence-first view
                ``bias.transpose(0, 1)``, as CMTTEST's ``CmtTransformer`` makes it, is taken unless ``batch_first``),
                a dense tensor in the module's sequence layout -- ``[Q, B, K]`` (as the dense version and CMTTEST
                hand it over) or ``[B, Q, K]`` with ``batch_first`` -- or ``[B, H, Q, K]`` per head, or None. With
                ``local_window``: a `SparseBias` on that index, or None. Built by mmcv's ``BaseTransformerLayer``
                as its self-attention (``operation_name == "self_attn"``), the module ignores ``attention_bias``
                and ``local_window``: that layer hands its keywords to every attention, and the bias is the
                cross-attention's (CMTTEST's ``PETRMultiheadAttention`` ignores it in self-attention too).
            local_window: a `WindowIndex` for ``[B, Q]`` queries over the ``K`` keys: a local attention
                mask. Each query attends only to its window keys (`sparse_bias.window_attention`, exact, no
                dense mask); a query without window keys gets a zero attention output.

            **kwargs: only `MMCV_IGNORED_KEYWORDS` (accepted and ignored, as the dense modules ignore them) and
                mmcv's deprecated ``residual`` (= ``identity``, with a ``DeprecationWarning``); any other
                keyword is a ``TypeError`` naming it, with a "did you mean" for a near miss.

        Returns:
            ``[Q, B, C]`` (``[B, Q, C]`` with ``batch_first``): ``identity + dropout(proj(attention))``.
        """
        if kwargs:
            identity = self._check_kwargs(kwargs, identity)
        if getattr(self, "operation_name", None) == "self_attn":
            # mmcv's BaseTransformerLayer hands its **kwargs (CMTTEST: attention_bias) to every attention and marks
            # each with its operation_name; the bias is the cross-attention's, as CMTTEST's PETRMultiheadAttention
            # applies it only there
            attention_bias = local_window = None
        attention_bias = self._bias_layout(attention_bias)
        if key is None:
            key = query
        if value is None:
            value = key
        if identity is None:
            identity = query
        _check_inputs(query, key, value, self.embed_dims, self.batch_first)
        if key_pos is None and query_pos is not None:
            if query_pos.shape == key.shape:
                key_pos = query_pos
            else:
                warnings.warn(f"position encoding of key is missing in {self.__class__.__name__}.")
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        layout = "b n (h d)" if self.batch_first else "n b (h d)"
        heads = self.num_heads
        w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
        c = self.embed_dims
        q = nn.functional.linear(query, w[:c], None if bias is None else bias[:c])
        k = nn.functional.linear(key, w[c:2 * c], None if bias is None else bias[c:2 * c])
        v = nn.functional.linear(value, w[2 * c:], None if bias is None else bias[2 * c:])
        q, k, v = (rearrange(t, f"{layout} -> b h n d", h=heads) for t in (q, k, v))
        dropout_p = self.attn_drop if self.training else 0.0
        if isinstance(attn_mask, WindowIndex):
            if local_window is not None and local_window is not attn_mask:
                raise ValueError("attn_mask is a WindowIndex and local_window is another one; pass one local mask")
            local_window, attn_mask = attn_mask, None
        if local_window is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask and local_window were both given: the local window is the attention "
                                 "mask (pass one of them)")
            if attention_bias is not None and not isinstance(attention_bias, SparseBias):
                raise TypeError(f"with local_window, attention_bias must be a SparseBias on that window index or "
                                f"None, got {type(attention_bias).__name__}")
            out = attend_windows(AttentionInputs.of("window", q, k, v, attention_bias, local_window,
                                                    key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                                    conventions=module_masks(type(self).__name__)), self.backend)
        else:
            if isinstance(attention_bias, torch.Tensor):
                attention_bias = self._dense_bias(attention_bias, q.shape[0], heads, q.shape[2], k.shape[2])
            mask = _convert_attn_mask(attn_mask, q.shape[0], heads, q.shape[2], k.shape[2])
            out = attend(AttentionInputs.of("correction", q, k, v, attention_bias, key_padding_mask=key_padding_mask,
                                            attn_mask=mask, dropout_p=dropout_p,
                                            conventions=module_masks(type(self).__name__)), self.backend)
            if isinstance(attention_bias, SparseBias) and attention_bias.debug:
                _debug_check(q, k, v, attention_bias, key_padding_mask, mask, out)
        out = self.attn.out_proj(rearrange(out, f"b h n d -> {layout}"))
        return identity + self.dropout_layer(self.proj_drop(out))

    def _check_kwargs(self, kwargs, identity):
        """`forward`'s extra keywords: mmcv's deprecated ``residual`` becomes ``identity`` (as mmcv's
        ``deprecated_api_warning`` does), `MMCV_IGNORED_KEYWORDS` are ignored, anything else raises."""
        name = f"{type(self).__name__}.forward"
        if "residual" in kwargs:
            if identity is not None:
                raise TypeError(f"{name}() got both 'residual' and 'identity'; 'residual' is mmcv's deprecated "
                                "name of 'identity': pass only identity")
            warnings.warn(f"'residual' is deprecated in {name}() (as in mmcv's MultiheadAttention), please use "
                          "'identity' instead", DeprecationWarning, stacklevel=3)
            kwargs = dict(kwargs)
            identity = kwargs.pop("residual")
        check_forward_keywords(name, kwargs, _FORWARD_KEYWORDS)
        return identity

    def _bias_layout(self, bias):
        """A `SparseBias` / `ModalityBias` batch-first: the sequence-first view (``bias.transpose(0, 1)``, as
        CMTTEST's transformer hands a dense bias over) is taken where a dense ``[Q, B, K]`` is, i.e. unless
        ``batch_first``; a plain bias is layout-free."""
        if not isinstance(bias, (SparseBias, ModalityBias)) or not bias.seq_first:
            return bias
        if self.batch_first:
            raise ValueError(f"attention_bias is the sequence-first view {list(bias.shape)} (bias.transpose(0, 1)) "
                             "but this attention has batch_first=True: pass the bias untransposed")
        return bias.transpose(0, 1)

    def _dense_bias(self, bias, batch, heads, nq, nk):
        """A dense bias in the module's layout (``[Q, B, K]``, or ``[B, Q, K]`` with batch_first; ``[B, H, Q, K]``
        either way) as ``[B, Q, K]`` / ``[B, H, Q, K]``."""
        want = (batch, nq, nk) if self.batch_first else (nq, batch, nk)
        other = (nq, batch, nk) if self.batch_first else (batch, nq, nk)
        if bias.dim() == 4 and tuple(bias.shape) in ((batch, heads, nq, nk), (batch, 1, nq, nk)):
            return bias
        if bias.dim() == 3 and tuple(bias.shape) == want:
            return bias if self.batch_first else bias.transpose(0, 1)
        layout = "[B, Q, K]" if self.batch_first else "[Q, B, K]"
        hint = ""
        if bias.dim() == 3 and tuple(bias.shape) == other:
            hint = (f"; it fits {'[Q, B, K]' if self.batch_first else '[B, Q, K]'}: pass attention_bias.transpose(0, 1)"
                    f" (batch_first={self.batch_first})")
        raise ValueError(f"a dense attention_bias must be {layout} = {list(want)} (batch_first={self.batch_first}) "
                         f"or [B, H, Q, K] = {[batch, heads, nq, nk]}, got {tuple(bias.shape)}{hint}")


#: the keywords `SparseBiasMultiheadAttention.forward` names (for the "did you mean")
_FORWARD_KEYWORDS = tuple(p for p in inspect.signature(SparseBiasMultiheadAttention.forward).parameters
                          if p not in ("self", "kwargs"))


def _check_inputs(query, key, value, embed_dims, batch_first):
    """Shape errors in the module's terms: which of query / key / value, the layout ``batch_first`` expects,
    and the transpose when the other layout fits."""
    layout = "[B, N, C]" if batch_first else "[N, B, C]"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor {layout} (batch_first={batch_first}), got {type(t).__name__}")
        if t.dim() != 3 or t.shape[-1] != embed_dims:
            raise ValueError(f"{name} must be {layout} with C = embed_dims = {embed_dims} (batch_first={batch_first}), "
                             f"got shape {tuple(t.shape)}")
    b_axis = 0 if batch_first else 1
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape {layout}, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    if query.shape[b_axis] != key.shape[b_axis]:
        hint = ""
        o = 1 - b_axis
        if query.shape[o] == key.shape[o] or query.shape[b_axis] == key.shape[o] or query.shape[o] == key.shape[b_axis]:
            flag = "batch_first=True" if not batch_first else "batch_first=False"
            hint = (f"; if your tensors are {'[B, N, C]' if not batch_first else '[N, B, C]'}, build the module with "
                    f"{flag} or pass query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)")
        raise ValueError(f"query and key disagree on the batch size: with batch_first={batch_first} the layout is "
                         f"{layout}, so query {tuple(query.shape)} has B = {query.shape[b_axis]} and key "
                         f"{tuple(key.shape)} has B = {key.shape[b_axis]}{hint}")


def _convert_attn_mask(attn_mask, batch, heads, nq, nk):
    """nn.MultiheadAttention mask (bool True = blocked, uint8 nonzero = blocked, or float; ``[Q, K]`` or
    ``[B*H, Q, K]``) to the SDPA convention used by `sparse_bias_attention` (bool True = attend)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor, a WindowIndex or None, got {type(attn_mask).__name__}")
    if not (attn_mask.dtype in (torch.bool, torch.uint8) or attn_mask.is_floating_point()):
        raise TypeError(f"attn_mask must be bool (True = blocked, mmcv's and nn.MultiheadAttention's convention), "
                        f"uint8 (nonzero = blocked) or an additive float mask (0 = keep, -inf = blocked), "
                        f"got {attn_mask.dtype}")
    if tuple(attn_mask.shape) not in ((nq, nk), (batch * heads, nq, nk)):
        raise ValueError(f"attn_mask must be [Q, K] = [{nq}, {nk}] or [B * H, Q, K] = [{batch * heads}, {nq}, {nk}] "
                         f"(nn.MultiheadAttention's layout), got shape {tuple(attn_mask.shape)}")
    if attn_mask.dim() == 3:
        attn_mask = attn_mask.view(batch, heads, nq, nk)
    if attn_mask.dtype == torch.uint8:
        attn_mask = attn_mask.bool()
    return ~attn_mask if attn_mask.dtype == torch.bool else attn_mask


def _build_dropout(cfg):
    if not cfg:
        return nn.Identity()
    cfg = dict(cfg)
    kind, p = cfg.pop("type", "Dropout"), float(cfg.pop("drop_prob", 0.0))
    if kind == "Dropout":
        return nn.Dropout(p) if p > 0 else nn.Identity()
    if kind == "DropPath":
        return DropPath(p) if p > 0 else nn.Identity()
    raise ValueError(f"dropout_layer type must be 'Dropout' or 'DropPath', got {kind!r}")


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (mmcv's ``DropPath``), batch dimension found by position."""

    def __init__(self, drop_prob: float = 0.1):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


def _debug_check(q, k, v, bias, key_padding_mask, mask, out, samples: int = 8):
    """Debug mode: the result on a sample of queries against the dense reference, and bias statistics."""
    with torch.no_grad():
        nq = q.shape[2]
        rows = torch.linspace(0, nq - 1, min(samples, nq), device=q.device).long().unique()
        sub_mask = None
        if mask is not None:
            m = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
            sub_mask = m[:, :, rows] if m.shape[2] > 1 else m
        sub = AttentionInputs.of("dense", q[:, :, rows], k, v, bias.to_dense(rows), key_padding_mask=key_padding_mask,
                                 attn_mask=sub_mask)                  # its masks' values were checked by the call
        ref = dense_attention(sub.q, sub.k, sub.v, sub.bias, sub.call)
        err = float((out[:, :, rows].float() - ref.float()).abs().max()) if rows.numel() else 0.0
        vals = bias.values.detach().float()
        stats = (float(vals.min()), float(vals.mean()), float(vals.max())) if vals.numel() else (0.0, 0.0, 0.0)
        logger.info("sparse_bias debug: max |sparse - dense| = %.3e on %d sampled queries; bias nnz = %d "
                    "(%.1f keys per query), values min %.4f mean %.4f max %.4f", err, rows.numel(),
                    bias.index.nnz, bias.index.nnz / max(bias.index.num_rows, 1), *stats)
        tol = DEBUG_TOLERANCE.get(q.dtype, 1e-4) * max(float(ref.float().abs().max()), 1.0) if rows.numel() else 0.0
        if not err <= tol:
            warnings.warn(f"sparse_bias debug_mode: the sparse attention differs from the dense reference by "
                          f"{err:.3e} (tolerance {tol:.1e}, {q.dtype}) on {rows.numel()} sampled queries -- please "
                          "report this with `python -m sparse_bias.tools.selftest`", RuntimeWarning, stacklevel=3)
    return err


#: debug_mode: largest |sparse - dense| on the sampled queries (relative to the output's size) before a warning
DEBUG_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
