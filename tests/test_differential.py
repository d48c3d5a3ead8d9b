"""Differential test of every public attention entry point against an independent float64 reference.

`sparse_bias_attention` (bias: `SparseBias`, `ModalityBias`, a dense tensor or None) and `window_attention`
(bias: `SparseBias` or None), on every backend, are compared -- forward and the gradients of q, k, v, the bias
values and the weights / scale behind `window_bias` -- with the references of tests/reference.py, from first
principles:

* the dense bias and the window mask are built straight from ``win.indptr`` / ``win.key`` and the values
  (never ``to_dense()``, ``to_dense_mask()``, ``dense_bias_attention`` or any library attention function);
  the `window_bias` values are recomputed from the weights (``w * scale * profile(dy, dx)``);
* ``softmax(q k^T * scale + bias + masks) v`` in float64, with the convention that a query row whose scores
  are all ``-inf`` (every key padded / masked, an empty window, K = 0) gives output 0 and zero gradients;
* dropout multiplies the probabilities by ``dropout_mask(seed, [B, H, Q, K], p) / (1 - p)`` -- the hash that
  specifies which entries drop.

Inputs come in the memory layouts the ops promise to take (design.md 4b): q / k / v / grad_out transposed
(``[B, N, H, D]`` permuted, the nn modules' layout), viewed from a ``[B, C, N]`` feature map (last-dim stride N),
sliced (last-dim stride 2), expanded over heads, or contiguous. Gradients are taken w.r.t. the contiguous leaf
each view is built from.

Cases are generated from fixed seeds (deterministic); a test id names the entry point, the backend and the case
(sizes, layout, windows, bias, masks, dropout, memory layouts). The default run holds a few hundred cases; the
``slow`` variants (``--slow`` or ``SPARSE_BIAS_SLOW=1``) run thousands. Triton cases run under the Triton
interpreter in a subprocess (as tests/test_triton.py does), or directly on CUDA.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import pytest
import torch

import sparse_bias as sb
from sparse_bias.backends import backend_names
from sparse_bias.backends.triton import TRITON_AVAILABLE

import reference
from helpers import profile_names, pytest_under_the_interpreter

# every registered backend that runs on CPU tensors (Triton is tested in its interpreter subprocess below)
SBA_BACKENDS = ("auto",) + tuple(n for n in backend_names("correction") if n != "triton") + ("dense",)
WIN_BACKENDS = ("auto",) + tuple(n for n in backend_names("window") if n != "triton") + ("dense",)
LAYOUT_KINDS = ("contig", "perm", "feat", "slice", "expand")
DIMS = (1, 3, 8, 24, 33, 64)
INF = float("inf")

# Tolerances, relative to the largest magnitude of the reference tensor (plus a tiny absolute floor so that an
# all-zero reference -- e.g. the gradients of fully masked rows -- admits only round-off-sized noise).
# float64: the kernels run float64 on the CPU; sums of <= a few hundred terms lose ~1e-14 relative.
RTOL64, ATOL64 = 1e-9, 1e-12
# float32: eps = 1.2e-7. A row sums at most K <= 336 products (scores: D <= 64 terms; output / dk / dv: <= K or
# <= Q*H terms), so the worst-case rounding of such a sum is ~ n * eps <= 4e-5 of its magnitude, and an error
# delta in a score changes the probabilities by ~delta relative (|scores| <= ~15 here, exp's own rounding ~ |s| eps
# ~ 2e-6). 2e-4 covers both with a 5x margin over the linear bound; the float32 dense computation itself (the
# library's "dense" backend) stays below 2e-5 on these cases. Gradients that are sums over many entries and cancel
# to ~0 get an absolute floor of 8x the drift of this file's reference run in float32 (`float32_floors`).
RTOL32, ATOL32 = 2e-4, 1e-5

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------------------
# case specifications (pure Python, generated at collection time)


@dataclass(frozen=True)
class Spec:
    entry: str                       # "sba" (sparse_bias_attention) or "win" (window_attention)
    seed: int
    dtype: str                       # "f64" | "f32"
    B: int
    H: int
    Q: int
    D: int
    bev: Optional[Tuple[int, int]]
    cam: Optional[Tuple[int, int, int]]
    slots: int                       # camera slots per query: 0 = cam_pos [B, Q, 3], else [B, Q, M, 3]
    p_missing: float                 # probability of a missing window (row < 0 / view < 0)
    bev_window: object               # odd int / 0, or "adapt" (LongTensor [B, Q] of odd sizes or 0)
    cam_window: object
    bias: str                        # "sparse" | "modality" | "dense" | "none"
    per_head: bool
    profile: str                     # a name in sparse_bias.profiles.PROFILES
    sigma: object                    # None | float | (bev, cam)
    wscale: float                    # spread of the window weights ([-wscale, wscale])
    bscale: object                   # window_bias scale: a float, or "t" = a 0-d tensor that requires grad
    dense_shape: str                 # dense bias: "BQK" | "BHQK" | "B1QK"
    kpm: str                         # "none" | "random" | "pad_batch" | "pad_cam" | "pad_bev" | "float" | "u8"
    attn_mask: str                   # "none" | "bool" | "bool_rows" | "float"
    am_shape: str                    # "QK" | "B1QK" | "BHQK" | "1HQK" | "HQK"
    dropout: float
    scale: Optional[float]           # softmax scale (None = 1/sqrt(D))
    lq: str
    lk: str
    lv: str
    lg: str

    @property
    def layout(self):
        return sb.KeyLayout(bev_shape=self.bev, cam_shape=self.cam)

    @property
    def K(self):
        return self.layout.num_keys

    @property
    def name(self) -> str:
        parts = [f"s{self.seed}", self.dtype, f"B{self.B}H{self.H}Q{self.Q}D{self.D}"]
        if self.bev:
            parts.append(f"bev{self.bev[0]}x{self.bev[1]}")
        if self.cam:
            parts.append(f"cam{self.cam[0]}x{self.cam[1]}x{self.cam[2]}" + (f"m{self.slots}" if self.slots else ""))
        parts.append(f"win{self.bev_window}.{self.cam_window}")
        if self.bias == "sparse":
            parts.append("sparse" + (".perhead" if self.per_head else ".shared") + ("." + self.profile[:5]))
        elif self.bias == "modality":
            parts.append("modality" + (".perhead" if self.per_head else ".shared"))
        elif self.bias == "dense":
            parts.append("dense." + self.dense_shape)
        else:
            parts.append("nobias")
        if self.kpm != "none":
            parts.append("kpm." + self.kpm)
        if self.attn_mask != "none":
            parts.append(f"am.{self.attn_mask}.{self.am_shape}")
        if self.dropout:
            parts.append(f"drop{self.dropout}")
        parts.append(f"q.{self.lq}-k.{self.lk}-v.{self.lv}-g.{self.lg}")
        return "-".join(parts)


def gen_spec(entry: str, seed: int, dtype: str = "f64", small: bool = True) -> Spec:
    """A random case; ``small`` keeps most sizes small (the default run)."""
    r = random.Random(f"{entry}/{dtype}/{seed}/{small}")
    shape_kind = r.choice(["both", "both", "both", "bev", "cam", "tiny"])
    bev = cam = None
    if shape_kind in ("both", "bev"):
        bev = (r.randint(1, 12), r.randint(1, 12))
    if shape_kind in ("both", "cam"):
        cam = (r.randint(1, 4), r.randint(1, 6), r.randint(1, 8))
    if shape_kind == "tiny":                                           # 1x1 grids
        bev, cam = r.choice([((1, 1), (1, 1, 1)), ((1, 1), None), (None, (1, 1, 1)), ((1, 1), (2, 1, 1))])
    if small:
        nq = r.choice([0] + [r.randint(1, 8)] * 6 + [r.randint(9, 50)] * 3)
        dim = r.choice([1, 3, 8, 8, 24, 33, 64] if r.random() < 0.8 else DIMS)
    else:
        nq = r.choice([0, r.randint(1, 8), r.randint(1, 20), r.randint(9, 50)])
        dim = r.choice(DIMS)

    def window():
        if r.random() < 0.2:
            return "adapt"
        return r.choice([0, 1, 1, 3, 3, 5, 5, 7, 9, 15, 25])

    if entry == "sba":
        bias_kinds = ["sparse"] * 4 + ["modality"] * 2 + ["dense"] * 2 + ["none"] * 2
    else:
        bias_kinds = ["sparse"] * 3 + ["none"]
    kpm = r.choice(["none", "none", "random", "pad_batch", "pad_cam", "pad_bev", "float", "u8"])
    attn_mask = r.choice(["none", "none", "none", "bool", "bool_rows", "float"]) if entry == "sba" else "none"
    per_head = r.random() < 0.5
    return Spec(
        entry=entry, seed=seed, dtype=dtype, B=r.randint(1, 3), H=r.randint(1, 4), Q=nq, D=dim, bev=bev, cam=cam,
        slots=r.choice([0, 1, 2, 3]) if cam else 0, p_missing=r.choice([0.0, 0.2, 0.5]),
        bev_window=window(), cam_window=window(), bias=r.choice(bias_kinds), per_head=per_head,
        profile=r.choice(profile_names()),
        sigma=r.choice([None, None, 0.7, (1.5, 0.6)]), wscale=r.choice([1.0, 1.0, 3.0, 6.0]),
        bscale=r.choice([1.0, 1.7, "t"]), dense_shape=r.choice(["BQK", "BHQK", "B1QK"]),
        kpm=kpm, attn_mask=attn_mask, am_shape=r.choice(["QK", "B1QK", "BHQK", "1HQK", "HQK"]),
        dropout=r.choice([0.0, 0.0, 0.1]), scale=r.choice([None, None, None, 0.3]),
        lq=r.choice(LAYOUT_KINDS), lk=r.choice(LAYOUT_KINDS), lv=r.choice(LAYOUT_KINDS), lg=r.choice(LAYOUT_KINDS))


# ---------------------------------------------------------------------------------------------------------------
# memory layouts: a contiguous leaf and the [B, H, N, D] view built from it


def leaf_shape(kind, b, h, n, d):
    return {"contig": (b, h, n, d), "perm": (b, n, h, d), "feat": (b, h * d, n), "slice": (b, h, n, 2 * d),
            "expand": (b, 1, n, d)}[kind]


def as_view(kind, leaf, b, h, n, d):
    if kind == "contig":
        return leaf
    if kind == "perm":                                  # the projection's [B, N, H, D], permuted
        return leaf.permute(0, 2, 1, 3)
    if kind == "feat":                                  # a [B, C, N] feature map: last-dim stride N
        return leaf.view(b, h, d, n).transpose(-1, -2)
    if kind == "slice":                                 # every other element of a bigger last dim: stride 2
        return leaf[..., ::2]
    if kind == "expand":                                # one tensor shared by all heads
        return leaf.expand(b, h, n, d)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------------------
# building the inputs of a case (float64 masters, cast per run)


class Data:
    """The inputs of one case (attributes set by `build`)."""


def positions(spec, gen):
    lay = spec.layout
    bev_pos = cam_pos = None
    B, Q = spec.B, spec.Q
    if lay.bev_shape is not None:
        h, w = lay.bev_shape
        bev_pos = torch.stack([torch.randint(0, h, (B, Q), generator=gen),
                               torch.randint(0, w, (B, Q), generator=gen)], -1)
        bev_pos[torch.rand(B, Q, generator=gen) < spec.p_missing] = -1
    if lay.cam_shape is not None:
        v, hc, wc = lay.cam_shape
        m = min(max(spec.slots, 1), v)
        views = torch.rand(B, Q, v, generator=gen).argsort(-1)[..., :m]           # distinct views per query
        cam_pos = torch.stack([views, torch.randint(0, hc, (B, Q, m), generator=gen),
                               torch.randint(0, wc, (B, Q, m), generator=gen)], -1)
        cam_pos[torch.rand(B, Q, m, generator=gen) < spec.p_missing] = -1
        if spec.slots == 0:
            cam_pos = cam_pos[:, :, 0]                                             # [B, Q, 3]
    return bev_pos, cam_pos


def window_size(size, spec, gen):
    if size == "adapt":
        choices = torch.tensor([0, 1, 3, 5, 7, 9, 15])
        return choices[torch.randint(0, len(choices), (spec.B, spec.Q), generator=gen)]
    return size


def key_padding(spec, gen):
    B, K, lay = spec.B, spec.K, spec.layout
    if spec.kpm == "none":
        return None
    kpm = torch.rand(B, K, generator=gen) < 0.2
    if spec.kpm == "pad_batch":
        kpm[int(torch.randint(0, B, (1,), generator=gen))] = True                 # a fully padded batch element
    elif spec.kpm == "pad_cam":
        kpm[:, lay.num_bev_keys:] = True                                           # every camera key padded
    elif spec.kpm == "pad_bev":
        kpm[:, :lay.num_bev_keys] = True                                           # every BEV key padded
    elif spec.kpm == "float":                                                      # additive: 0, -inf, finite
        vals = torch.where(torch.rand(B, K, generator=gen) < 0.3, -0.8 * torch.rand(B, K, generator=gen),
                           torch.zeros(B, K, dtype=torch.float32))
        return vals.double().masked_fill(kpm, -INF)
    elif spec.kpm == "u8":
        return kpm.to(torch.uint8)
    return kpm


def attention_mask(spec, gen):
    B, H, Q, K = spec.B, spec.H, spec.Q, spec.K
    if spec.attn_mask == "none":
        return None
    full = {"QK": (1, 1, Q, K), "B1QK": (B, 1, Q, K), "BHQK": (B, H, Q, K), "1HQK": (1, H, Q, K),
            "HQK": (1, H, Q, K)}[spec.am_shape]
    if spec.attn_mask in ("bool", "bool_rows"):
        m = torch.rand(full, generator=gen) < 0.8                                  # True = attend
        if spec.attn_mask == "bool_rows" and Q:
            m[..., torch.rand(Q, generator=gen) < 0.3, :] = False                 # fully masked rows
    else:
        m = (0.7 * torch.randn(full, generator=gen, dtype=torch.float64)).masked_fill(
            torch.rand(full, generator=gen) < 0.1, -INF)
    if spec.am_shape == "QK":
        m = m[0, 0]
    elif spec.am_shape == "HQK":
        m = m[0]
    return m


_DATA: Dict[Spec, Data] = {}


def build(spec: Spec) -> Data:
    if spec in _DATA:
        return _DATA[spec]
    gen = torch.Generator().manual_seed(1000 + spec.seed * 7919 + (spec.entry == "win") * 17 + (spec.dtype == "f32"))
    d = Data()
    B, H, Q, D, K = spec.B, spec.H, spec.Q, spec.D, spec.K
    d.bev_pos, d.cam_pos = positions(spec, gen)
    d.bev_window = window_size(spec.bev_window, spec, gen) if d.bev_pos is not None else 0
    d.cam_window = window_size(spec.cam_window, spec, gen) if d.cam_pos is not None else 0
    d.win = sb.local_windows(spec.layout, d.bev_pos, d.cam_pos, d.bev_window, d.cam_window)

    def rnd(shape, s=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * s

    d.q = rnd(leaf_shape(spec.lq, B, H, Q, D))
    d.k = rnd(leaf_shape(spec.lk, B, H, K, D))
    d.v = rnd(leaf_shape(spec.lv, B, H, K, D))
    d.g = rnd(leaf_shape(spec.lg, B, H, Q, D))
    tail = (H,) if spec.per_head else ()
    d.wb = (spec.wscale * (2 * torch.rand((B, Q) + tail, generator=gen, dtype=torch.float64) - 1)
            if d.bev_pos is not None else None)
    d.wc = (spec.wscale * (2 * torch.rand((B, Q) + tail, generator=gen, dtype=torch.float64) - 1)
            if d.cam_pos is not None else None)
    d.bscale = torch.tensor(1.3, dtype=torch.float64) if spec.bscale == "t" else spec.bscale
    nmod = int(spec.layout.num_bev_keys > 0) + int(spec.layout.num_cam_keys > 0)
    d.modality = spec.wscale * (2 * torch.rand((B, Q, nmod) + tail, generator=gen, dtype=torch.float64) - 1)
    dshape = {"BQK": (B, Q, K), "BHQK": (B, H, Q, K), "B1QK": (B, 1, Q, K)}[spec.dense_shape]
    d.dense = rnd(dshape, spec.wscale)
    d.kpm = key_padding(spec, gen)
    d.attn_mask = attention_mask(spec, gen)
    d.seed = 1234 + spec.seed if spec.seed % 3 else (1 << 40) + spec.seed          # some seeds above 2^32
    _DATA[spec] = d
    return d


# ---------------------------------------------------------------------------------------------------------------
# one evaluation: library or reference, output and every gradient


def _leaf(t, dtype, device="cpu"):
    return None if t is None else t.detach().clone().to(device=device, dtype=dtype).requires_grad_()


def evaluate(spec: Spec, d: Data, backend: Optional[str], dtype=None, device="cpu"):
    """``{name: tensor}`` (on the CPU): output and gradients; ``backend`` None = the reference (float64 unless
    ``dtype`` says otherwise, CPU)."""
    ref = backend is None
    device = "cpu" if ref else device
    dtype = dtype or (torch.float64 if ref or spec.dtype == "f64" else torch.float32)
    B, H, Q, D, K = spec.B, spec.H, spec.Q, spec.D, spec.K
    # the library's inputs are rounded to dtype; the reference takes those rounded values in float64
    cast = (lambda t: t if t is None else t.to(torch.float32).double()) if (ref and spec.dtype == "f32") else (
        lambda t: t)
    qL, kL, vL = (_leaf(cast(t), dtype, device) for t in (d.q, d.k, d.v))
    q = as_view(spec.lq, qL, B, H, Q, D)
    k = as_view(spec.lk, kL, B, H, K, D)
    v = as_view(spec.lv, vL, B, H, K, D)
    g = as_view(spec.lg, cast(d.g).to(device=device, dtype=dtype), B, H, Q, D)
    win = d.win.to(device)
    names, inputs = ["dq", "dk", "dv"], [qL, kL, vL]
    extra = {}
    bias_obj = dense_bias = None
    if spec.bias == "sparse":
        wb, wc = _leaf(cast(d.wb), dtype, device), _leaf(cast(d.wc), dtype, device)
        sc = _leaf(cast(d.bscale), dtype, device) if isinstance(d.bscale, torch.Tensor) else d.bscale
        if ref:
            values = reference.window_values(d.win, wb, wc, sc, spec.profile, spec.sigma, d.bev_window,
                                             d.cam_window)
            dense_bias = reference.dense_from_entries(d.win, values)
        else:
            bias_obj = sb.window_bias(win, wb, wc, scale=sc, profile=spec.profile, sigma=spec.sigma)
            values = bias_obj.values
        extra["values"] = values
        for name, t in (("dvalues", values), ("dwb", wb), ("dwc", wc), ("dscale", sc)):
            if isinstance(t, torch.Tensor):
                names.append(name)
                inputs.append(t)
    elif spec.bias == "modality":
        mv = _leaf(cast(d.modality), dtype, device)
        if ref:
            dense_bias = reference.modality_dense(spec.layout, mv)
        else:
            bias_obj = sb.ModalityBias(spec.layout, mv)
        names.append("dmodality")
        inputs.append(mv)
    elif spec.bias == "dense":
        db = _leaf(cast(d.dense), dtype, device)
        if ref:
            dense_bias = db if db.dim() == 4 else db.unsqueeze(1)
        else:
            bias_obj = db
        names.append("ddense")
        inputs.append(db)
    kpm, am = d.kpm, d.attn_mask          # float masks: rounded to dtype for the library, and the reference alike
    kpm = kpm if kpm is None or not kpm.is_floating_point() else cast(kpm).to(dtype)
    am = am if am is None or not am.is_floating_point() else cast(am).to(dtype)
    kpm, am = (None if t is None else t.to(device) for t in (kpm, am))
    if ref:
        window = reference.window_mask(d.win) if spec.entry == "win" else None
        out = reference.attention(q, k, v, dense_bias, kpm, am, window, spec.dropout, d.seed, spec.scale)
        dead = reference.fully_masked_rows(q, k, dense_bias, kpm, am, window, spec.scale)
    else:
        kw = dict(key_padding_mask=kpm, dropout_p=spec.dropout, dropout_seed=d.seed, scale=spec.scale,
                  backend=backend)
        if spec.entry == "sba":
            out = sb.sparse_bias_attention(q, k, v, bias_obj, attn_mask=am, **kw)
        else:
            out = sb.window_attention(q, k, v, win, bias=bias_obj, **kw)
        dead = None
        assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
        assert tuple(out.shape) == (B, H, Q, D), f"output shape {tuple(out.shape)}"
    grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
    res = {"out": out.detach().cpu()}
    if "values" in extra:
        res["values"] = extra["values"].detach().cpu()
    for name, t, gr in zip(names, inputs, grads):
        res[name] = (torch.zeros_like(t) if gr is None else gr).cpu()
    if ref:
        res["_dead"] = dead
    return res


_REF: Dict[Spec, dict] = {}


def reference_results(spec: Spec) -> dict:
    """The reference's output and gradients of ``spec`` (`evaluate` with no backend), cached."""
    if spec not in _REF:
        res = evaluate(spec, build(spec), None)
        for name, t in res.items():
            if name != "_dead":
                assert torch.isfinite(t).all(), f"reference {name} is not finite ({spec.name})"
        _REF[spec] = res
    return _REF[spec]


def compare(got: dict, want: dict, rtol: float, atol: float, label: str, q_layout: str = "contig",
            atol_by_name: Optional[dict] = None) -> None:
    """Every tensor of ``want`` against ``got``: max error <= rtol * max|want| + atol (NaN / inf fail)."""
    dead = want.get("_dead")
    lines = []
    for name, w in want.items():
        if name == "_dead":
            continue
        gt = got.get(name)
        if gt is None:
            lines.append(f"  {name}: missing")
            continue
        if tuple(gt.shape) != tuple(w.shape):
            lines.append(f"  {name}: shape {tuple(gt.shape)} != {tuple(w.shape)}")
            continue
        if w.numel() == 0:
            continue
        err = (gt.double() - w).abs()
        nonfinite = int((~torch.isfinite(gt)).sum())
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, INF))
        size = float(w.abs().max())
        tol = rtol * size + max(atol, (atol_by_name or {}).get(name, 0.0))
        worst = float(err.max())
        if not worst <= tol:
            idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(torch.nan_to_num(err, posinf=1e300)),
                                                            err.shape))
            where = f"at {list(idx)}"
            if (name == "out" or (name == "dq" and q_layout == "contig")) and dead is not None and dead.numel():
                if bool(dead[idx[:3]]):                                            # [B, H, Q, D]-indexed
                    where += " (a fully masked row)"
            lines.append(f"  {name}: max err {worst:.3g} {where}, ref max {size:.3g}, tol {tol:.3g}, "
                         f"rel {worst / max(size, 1e-300):.3g}, non-finite {nonfinite}")
    if lines:
        raise AssertionError(label + "\n" + "\n".join(lines))


def skip_unrunnable(entry, backend, spec, d):
    if backend == "fused" and not sb.extension_available():
        pytest.skip("the compiled extension sparse_bias._C is not built")
    if backend in ("auto", "dense"):
        return
    dtype = torch.float64 if spec.dtype == "f64" else torch.float32
    q = torch.zeros(spec.B, spec.H, spec.Q, spec.D, dtype=dtype)
    try:
        if entry == "win":
            sb.select_window_backend(q, backend)
        else:
            bias = None
            if spec.bias == "sparse":
                bias = sb.SparseBias(d.win, torch.zeros(d.win.nnz, dtype=dtype))
            elif spec.bias == "modality":
                bias = sb.ModalityBias(spec.layout, d.modality.to(dtype))
            elif spec.bias == "dense":
                bias = d.dense.to(dtype)
            sb.select_backend(q, bias, backend)
    except RuntimeError as exc:
        pytest.skip(f"backend {backend!r} cannot run: {exc}")


def check_case(spec: Spec, backend: str) -> None:
    d = build(spec)
    skip_unrunnable(spec.entry, backend, spec, d)
    want = reference_results(spec)
    got = evaluate(spec, d, backend)
    entry = "sparse_bias_attention" if spec.entry == "sba" else "window_attention"
    rtol, atol = (RTOL64, ATOL64) if spec.dtype == "f64" else (RTOL32, ATOL32)
    compare(got, want, rtol, atol, f"{entry} backend={backend} case={spec.name}", spec.lq, float32_floors(spec, want))


_DRIFT: Dict[Spec, dict] = {}


def float32_floors(spec: Spec, want: dict) -> dict:
    """float32 cases: per-tensor absolute floors of 8x the drift of the reference itself run in float32.

    Gradients that are sums over many window entries (``d scale`` over all ``nnz * H`` entries, the weights over
    a window, shared values over heads) keep the float32 rounding of their terms when those cancel -- an error
    relative to sum|terms|, not to the (near-zero) result: seen 1.3e-5 for ``d scale`` = 1.2e-3. The same
    computation in float32 shows that rounding; a backend may be a few times worse, hence 8x."""
    if spec.dtype == "f64":
        return {}
    if spec not in _DRIFT:
        naive = evaluate(spec, build(spec), None, dtype=torch.float32)
        _DRIFT[spec] = {n: 8 * float((naive[n].double() - w).abs().nan_to_num(posinf=0.0).max())
                        for n, w in want.items() if n != "_dead" and w.numel()}
    return _DRIFT[spec]


# ---------------------------------------------------------------------------------------------------------------
# the default run: a few hundred (case, backend) pairs


N_SBA_64, N_SBA_32, N_WIN_64, N_WIN_32 = 32, 6, 22, 5

SBA_CASES = [gen_spec("sba", i) for i in range(N_SBA_64)] + [gen_spec("sba", i, "f32") for i in range(N_SBA_32)]
WIN_CASES = [gen_spec("win", i) for i in range(N_WIN_64)] + [gen_spec("win", i, "f32") for i in range(N_WIN_32)]


@pytest.mark.parametrize("spec", SBA_CASES, ids=lambda s: s.name)
@pytest.mark.parametrize("backend", SBA_BACKENDS)
def test_sparse_bias_attention(backend, spec):
    check_case(spec, backend)


@pytest.mark.parametrize("spec", WIN_CASES, ids=lambda s: s.name)
@pytest.mark.parametrize("backend", WIN_BACKENDS)
def test_window_attention(backend, spec):
    check_case(spec, backend)


# ---------------------------------------------------------------------------------------------------------------
# the slow variant: thousands of cases, larger shapes too (--slow or SPARSE_BIAS_SLOW=1)

SLOW_BLOCKS, SLOW_PER_BLOCK = 10, 100


def run_block(entry, backend, block):
    failures, skipped, ran = [], 0, 0
    for i in range(block * SLOW_PER_BLOCK, (block + 1) * SLOW_PER_BLOCK):
        spec = gen_spec(entry, 10_000 + i, "f32" if i % 5 == 4 else "f64", small=False)
        try:
            check_case(spec, backend)
            ran += 1
        except pytest.skip.Exception:
            skipped += 1
        except AssertionError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - an exception in the op is a failure of that case
            failures.append(f"case={spec.name}: raised {type(exc).__name__}: {exc}")
        _DATA.pop(spec, None)
        _REF.pop(spec, None)
        _DRIFT.pop(spec, None)
    if skipped and not ran and not failures:
        pytest.skip(f"backend {backend!r} cannot run here")
    if failures:
        raise AssertionError(f"{len(failures)} of {SLOW_PER_BLOCK} cases failed:\n" + "\n".join(failures[:8]))


@pytest.mark.slow
@pytest.mark.parametrize("block", range(SLOW_BLOCKS))
@pytest.mark.parametrize("backend", SBA_BACKENDS)
def test_sparse_bias_attention_slow(backend, block):
    run_block("sba", backend, block)


@pytest.mark.slow
@pytest.mark.parametrize("block", range(SLOW_BLOCKS))
@pytest.mark.parametrize("backend", WIN_BACKENDS)
def test_window_attention_slow(backend, block):
    run_block("win", backend, block)


# ---------------------------------------------------------------------------------------------------------------
# sanity of the reference's own ingredients: window_bias values equal the recomputed ones


@pytest.mark.parametrize("spec", [s for s in SBA_CASES + WIN_CASES if s.bias == "sparse"][:12], ids=lambda s: s.name)
def test_window_bias_values_match_recomputation(spec):
    d = build(spec)
    sc = d.bscale
    got = sb.window_bias(d.win, d.wb, d.wc, scale=sc, profile=spec.profile, sigma=spec.sigma).values
    want = reference.window_values(d.win, d.wb, d.wc, sc, spec.profile, spec.sigma, d.bev_window, d.cam_window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# named regressions

REG_LAYOUT = sb.KeyLayout(bev_shape=(5, 6), cam_shape=(2, 3, 4))      # K = 30 + 24 = 54


def reg_spec(**kw) -> Spec:
    base = dict(entry="sba", seed=0, dtype="f64", B=2, H=2, Q=5, D=8, bev=(5, 6), cam=(2, 3, 4), slots=2,
                p_missing=0.0, bev_window=3, cam_window=3, bias="sparse", per_head=True, profile="flat", sigma=None,
                wscale=1.0, bscale=1.0, dense_shape="BQK", kpm="none", attn_mask="none", am_shape="BHQK",
                dropout=0.0, scale=None, lq="contig", lk="contig", lv="contig", lg="contig")
    base.update(kw)
    return Spec(**base)


def check_profile_case(entry, profile, sigma):
    """A fixed case of ``entry`` ("sba" / "win") with a `window_bias` of ``profile`` (per-head weights, a scale
    that takes a gradient, adaptive BEV windows), backend auto, against the reference."""
    spec = reg_spec(entry=entry, seed=107, profile=profile, sigma=sigma, bev_window="adapt", cam_window=5,
                    bscale="t", kpm="random")
    try:
        check_case(spec, "auto")
    finally:
        _DATA.pop(spec, None)
        _REF.pop(spec, None)


@pytest.mark.parametrize("sigma", [None, (1.5, 0.6)])
@pytest.mark.parametrize("profile", profile_names())
@pytest.mark.parametrize("entry", ["sba", "win"])
def test_every_registered_profile(entry, profile, sigma):
    """Each registered profile on a fixed case (the random cases draw the profile too)."""
    check_profile_case(entry, profile, sigma)


@pytest.mark.parametrize("bias", ["none", "sparse"])
def test_regression_featmap_k_auto(bias):
    """k viewed from a [B, C, K] feature map (last-dim stride K), q permuted from [B, Q, H, D]; backend auto."""
    spec = reg_spec(seed=101, bias=bias, lk="feat", lq="perm")
    check_case(spec, "auto")


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_regression_modality_bias_padded_camera_modality(dropout):
    """Every camera key padded: the camera modality contributes nothing (its lse is -inf); no NaN gradients."""
    spec = reg_spec(seed=102, bias="modality", kpm="pad_cam", dropout=dropout, lq="perm")
    d = build(spec)
    got = evaluate(spec, d, "auto")
    bad = [f"{name}: {int((~torch.isfinite(t)).sum())} non-finite entries" for name, t in got.items()
           if not torch.isfinite(t).all()]
    if bad:
        raise AssertionError(f"ModalityBias, all camera keys padded, dropout {dropout}: " + "; ".join(bad))
    compare(got, reference_results(spec), RTOL64, ATOL64,
            f"ModalityBias, all camera keys padded, dropout {dropout}")


@pytest.mark.parametrize("backend", WIN_BACKENDS)
@pytest.mark.parametrize("kv", ["slice", "feat"])
def test_regression_window_attention_backward_strided_kv(kv, backend):
    """window_attention's backward with k / v strided in the last dimension (stride 2, or a [B, C, K] map)."""
    spec = reg_spec(entry="win", seed=103, lk=kv, lv=kv, lg="perm")
    check_case(spec, backend)


def masked_rows_case(entry, bias, dropout):
    """Queries fully masked in several ways: batch 1 fully padded; (sba) an all-False bool attn_mask row at
    query 0 of batch 0; (win) query 1 of batch 0 has no window and query 2's window keys are all padded."""
    B, H, Q, D, lay = 2, 2, 4, 8, REG_LAYOUT
    K = lay.num_keys
    gen = torch.Generator().manual_seed(104)
    bev = torch.tensor([[[1, 1], [-1, -1], [4, 5], [2, 3]]] * B)
    cam = torch.tensor([[[0, 1, 1], [-1, 0, 0], [1, 2, 3], [1, 0, 0]]] * B)
    win = sb.local_windows(lay, bev, cam, 3, 3)
    kpm = torch.zeros(B, K, dtype=torch.bool)
    kpm[1] = True
    rows = reference.entry_rows(win)
    kpm[0, win.key[rows == 2]] = True                     # every window key of (b=0, q=2) padded
    am = torch.ones(B, H, Q, K, dtype=torch.bool)
    am[0, :, 0] = False
    dead = torch.zeros(B, H, Q, dtype=torch.bool)
    dead[1] = True
    if entry == "sba":
        dead[0, :, 0] = True
    else:
        dead[0, :, 1] = dead[0, :, 2] = True
    q, k, v, g = (torch.randn(B, H, n, D, generator=gen, dtype=torch.float64) for n in (Q, K, K, Q))
    wb, wc = (torch.rand(B, Q, H, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(2))
    mod = torch.rand(B, Q, 2, generator=gen, dtype=torch.float64)
    dense = torch.randn(B, Q, K, generator=gen, dtype=torch.float64)
    return dict(win=win, kpm=kpm, am=am if entry == "sba" else None, dead=dead, q=q, k=k, v=v, g=g, wb=wb, wc=wc,
                mod=mod, dense=dense, seed=77)


def run_masked(entry, bias, backend, dropout, c, ref):
    win = c["win"]
    B, H, Q, D = c["q"].shape
    K = c["k"].shape[2]
    q, k, v = (c[n].clone().requires_grad_() for n in "qkv")
    inputs, names, dense_bias, bias_obj = [q, k, v], ["dq", "dk", "dv"], None, None
    if bias == "sparse":
        wb, wc = c["wb"].clone().requires_grad_(), c["wc"].clone().requires_grad_()
        if ref:
            values = reference.window_values(win, wb, wc, 1.0, "flat", None, 3, 3)
            dense_bias = reference.dense_from_entries(win, values)
        else:
            bias_obj = sb.window_bias(win, wb, wc)
            values = bias_obj.values
        inputs += [values, wb, wc]
        names += ["dvalues", "dwb", "dwc"]
    elif bias == "modality":
        mv = c["mod"].clone().requires_grad_()
        dense_bias = reference.modality_dense(REG_LAYOUT, mv) if ref else None
        bias_obj = None if ref else sb.ModalityBias(REG_LAYOUT, mv)
        inputs.append(mv)
        names.append("dmodality")
    elif bias == "dense":
        db = c["dense"].clone().requires_grad_()
        dense_bias, bias_obj = (db.unsqueeze(1), None) if ref else (None, db)
        inputs.append(db)
        names.append("ddense")
    if ref:
        window = reference.window_mask(win) if entry == "win" else None
        out = reference.attention(q, k, v, dense_bias, c["kpm"], c["am"], window, dropout, c["seed"])
    elif entry == "sba":
        out = sb.sparse_bias_attention(q, k, v, bias_obj, key_padding_mask=c["kpm"], attn_mask=c["am"],
                                       dropout_p=dropout, dropout_seed=c["seed"], backend=backend)
    else:
        out = sb.window_attention(q, k, v, win, bias=bias_obj, key_padding_mask=c["kpm"], dropout_p=dropout,
                                  dropout_seed=c["seed"], backend=backend)
    grads = torch.autograd.grad(out, inputs, c["g"], allow_unused=True)
    res = {"out": out.detach()}
    res.update({n: torch.zeros_like(t) if gr is None else gr for n, t, gr in zip(names, inputs, grads)})
    return res


MASKED_PARAMS = ([("sba", b, be) for b in ("sparse", "modality", "dense", "none") for be in SBA_BACKENDS]
                 + [("win", b, be) for b in ("sparse", "none") for be in WIN_BACKENDS])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("entry,bias,backend", MASKED_PARAMS, ids=lambda x: str(x))
def test_regression_fully_masked_queries(entry, bias, backend, dropout):
    """Fully masked query rows: output exactly 0, zero gradients (q rows; bias values / weights of those
    rows); every other number equals the reference."""
    if backend == "fused" and not sb.extension_available():
        pytest.skip("the compiled extension sparse_bias._C is not built")
    c = masked_rows_case(entry, bias, dropout)
    try:
        if entry == "win":
            sb.select_window_backend(c["q"], backend)
        elif bias == "sparse":
            sb.select_backend(c["q"], sb.SparseBias(c["win"], torch.zeros(c["win"].nnz, dtype=torch.float64)), backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    got = run_masked(entry, bias, backend, dropout, c, ref=False)
    dead = c["dead"]
    problems = []
    for name, t in got.items():
        if not torch.isfinite(t).all():
            problems.append(f"{name}: {int((~torch.isfinite(t)).sum())} non-finite entries")
    if not torch.equal(got["out"][dead], torch.zeros_like(got["out"][dead])):
        problems.append(f"out: fully masked rows not 0 (max |out| {float(got['out'][dead].abs().max()):.3g})")
    if not torch.equal(got["dq"][dead], torch.zeros_like(got["dq"][dead])):
        problems.append(f"dq: fully masked rows not 0 (max {float(got['dq'][dead].abs().max()):.3g})")
    if "dwb" in got:
        dead_q = dead.any(1)                                                    # [B, Q]
        for n in ("dwb", "dwc"):
            if not torch.equal(got[n][dead_q], torch.zeros_like(got[n][dead_q])):
                problems.append(f"{n}: weights of fully masked rows get a gradient")
    label = f"{entry} bias={bias} backend={backend} dropout={dropout}"
    if problems:
        raise AssertionError(label + "\n  " + "\n  ".join(problems))
    compare(got, run_masked(entry, bias, backend, dropout, c, ref=True), RTOL64, ATOL64, label)


def _no_keys(bias, backend):
    """K = 0: every row is fully masked -> output 0, zero gradients. Returns a problem string or ''."""
    gen = torch.Generator().manual_seed(105)
    q = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.zeros(2, 2, 0, 4, dtype=torch.float64, requires_grad=True)
    v = torch.zeros(2, 2, 0, 4, dtype=torch.float64, requires_grad=True)
    db = torch.zeros(2, 3, 0, dtype=torch.float64, requires_grad=True) if bias == "dense" else None
    out = sb.sparse_bias_attention(q, k, v, db, backend=backend)
    if tuple(out.shape) != (2, 2, 3, 4):
        return f"output shape {tuple(out.shape)}"
    if not torch.equal(out, torch.zeros_like(out)):
        return f"output is not 0 (max |out| {float(out.abs().max()):.3g})"
    (dq,) = torch.autograd.grad(out, [q], torch.randn(out.shape, generator=gen, dtype=torch.float64),
                                allow_unused=True)
    if dq is not None and not torch.equal(dq, torch.zeros_like(dq)):
        return f"dq is not 0 (max {float(dq.abs().max()):.3g})"
    return ""


NO_KEYS_CASES = [(bias, backend) for bias in ("none", "dense") for backend in SBA_BACKENDS]


def _run_no_keys_cases(first=0):
    """Entry point of the subprocess of `test_regression_no_keys`: one line per case, printed before it runs."""
    for i in range(first, len(NO_KEYS_CASES)):
        bias, backend = NO_KEYS_CASES[i]
        print(f"START {i}", flush=True)
        try:
            problem = _no_keys(bias, backend)
        except Exception as exc:  # noqa: BLE001 - reported per case
            problem = f"raised {type(exc).__name__}: {exc}"
        print(f"RESULT {i} {problem}", flush=True)


def test_regression_no_keys():
    """K = 0 (k, v [B, H, 0, D]; bias None or a dense [B, Q, 0]) on every backend: output 0, zero gradients. Run in
    a subprocess (restarted after the case that killed it): a kernel dividing by K dies of SIGFPE, not an exception."""
    here = os.path.dirname(os.path.abspath(__file__))
    bad, first = [], 0
    while first < len(NO_KEYS_CASES):
        code = f"import sys; sys.path.insert(0, {here!r}); import test_differential as T; T._run_no_keys_cases({first})"
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        started = first
        for line in res.stdout.splitlines():
            tag, _, rest = line.partition(" ")
            i, _, problem = rest.partition(" ")
            if tag == "START":
                started = int(i)
            elif tag == "RESULT" and problem:
                bias, backend = NO_KEYS_CASES[int(i)]
                bad.append(f"bias={bias} backend={backend}: {problem}")
        if res.returncode == 0:
            break
        bias, backend = NO_KEYS_CASES[started]
        err = [ln for ln in res.stderr.splitlines() if ln.strip()]
        bad.append(f"bias={bias} backend={backend}: the process died (exit {res.returncode}) {err[0] if err else ''}")
        first = started + 1
    if bad:
        raise AssertionError("K = 0:\n  " + "\n  ".join(bad))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backend", SBA_BACKENDS)
def test_regression_exact_rows_with_a_fully_masked_head(backend, dropout):
    """A query whose normaliser 1 + S falls below the exact-row threshold in one head (bias -2 on a window that
    holds all its mass) while another head of the same query is fully masked by a per-head attn_mask: the
    dense recomputation of that query's rows must keep the masked head at 0 (found by the slow run: NaN)."""
    if backend == "fused" and not sb.extension_available():
        pytest.skip("the compiled extension sparse_bias._C is not built")
    lay = sb.KeyLayout(bev_shape=(1, 2))
    win = sb.local_windows(lay, torch.tensor([[[0, 0], [0, 1]]]), None, bev_window=3)   # every key in the window
    gen = torch.Generator().manual_seed(106)
    leaves = [torch.randn(1, 2, n, 3, generator=gen, dtype=torch.float64) for n in (2, 2, 2)]
    w = torch.tensor([[-2.0, 0.5]], dtype=torch.float64)
    am = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    am[0, 1, 0] = False                                                  # head 1 of query 0: fully masked
    g = torch.randn(1, 2, 2, 3, generator=gen, dtype=torch.float64)

    def run(ref):
        q, k, v, ww = (t.clone().requires_grad_() for t in leaves + [w])
        if ref:
            values = reference.window_values(win, ww, None, 1.0, "flat", None, 3, 0)
            out = reference.attention(q, k, v, reference.dense_from_entries(win, values), None, am, None, dropout, 9)
        else:
            bias = sb.window_bias(win, ww, None)
            values = bias.values
            out = sb.sparse_bias_attention(q, k, v, bias, attn_mask=am, dropout_p=dropout, dropout_seed=9,
                                           backend=backend)
        grads = torch.autograd.grad(out, [q, k, v, values, ww], g, allow_unused=True)
        return dict(zip(["out", "dq", "dk", "dv", "dvalues", "dwb"], [out.detach()] + [
            torch.zeros(1) if x is None else x for x in grads]))

    compare(run(False), run(True), RTOL64, ATOL64, f"exact rows + fully masked head, backend={backend}, "
                                                    f"dropout={dropout}")


# ---------------------------------------------------------------------------------------------------------------
# Triton: tiny float32 cases, q in the permuted [B, Q, H, D] layout, backend "triton" (interpreter or CUDA)

TRITON_ACTIVE = TRITON_AVAILABLE and (INTERPRETED or torch.cuda.is_available())


def triton_specs():
    out = []
    for i in range(10):
        entry = "sba" if i < 6 else "win"
        s = gen_spec(entry, 500 + i, "f32")
        s = replace(s, bias="sparse" if entry == "sba" else ("sparse", "none")[i % 2], lq="perm", B=min(s.B, 2), H=min(s.H, 2), Q=max(1, min(s.Q, 6)),
                    D=(3, 8, 33)[i % 3], bev=s.bev or (4, 5), cam=s.cam if i % 2 else (2, 3, 4),
                    attn_mask="none", kpm=("none", "random", "pad_cam")[i % 3], dropout=(0.0, 0.1)[i % 2])
        out.append(s)
    return out


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted cases in a subprocess")
def test_triton_under_the_interpreter():
    pytest_under_the_interpreter(__file__, "-k", "triton_case")


@pytest.mark.skipif(not TRITON_ACTIVE, reason="runs in the interpreter subprocess of "
                                              "test_triton_under_the_interpreter (or on CUDA)")
@pytest.mark.parametrize("spec", triton_specs(), ids=lambda s: s.name)
def test_triton_case(spec):
    d = build(spec)
    device = "cpu" if INTERPRETED else "cuda"
    q = torch.zeros(spec.B, spec.H, spec.Q, spec.D, dtype=torch.float32, device=device)
    if spec.entry == "sba":
        name, why = sb.select_backend(q, sb.SparseBias(d.win.to(device), torch.zeros(d.win.nnz, device=device)),
                                      "triton")
    else:
        name, why = sb.select_window_backend(q, "triton")
    assert name == "triton", why
    got = evaluate(spec, d, "triton", device=device)
    want = reference_results(spec)
    entry = "sparse_bias_attention" if spec.entry == "sba" else "window_attention"
    compare(got, want, RTOL32, ATOL32, f"{entry} backend=triton case={spec.name}", spec.lq,
            float32_floors(spec, want))
