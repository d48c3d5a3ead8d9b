"""Mask arguments: each entry point's convention against the reference (tests/reference.py), a 0/1 float mask
refused, a mask that blocks every key warned about, CMT's all-zero float key padding mask accepted (docs/masks.md)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparse_bias as sb
from sparse_bias._core import masks as _validation
from sparse_bias.nn import PETRTransformerDecoderLayer, SparseBiasMultiheadAttention

import reference

LAYOUT = sb.KeyLayout(bev_shape=(5, 6), cam_shape=(2, 3, 4))       # 30 + 24 = 54 keys
B, H, Q, D, C = 2, 3, 6, 8, 12
K = LAYOUT.num_keys
DT = torch.float64

#: the texts that say which convention an argument follows
ATTEND, BLOCKED, IGNORE = "True = attend", "True = blocked", "True = ignore"
ADDITIVE = "0 keeps a pair, -inf blocks it"


def scene(seed=0):
    g = torch.Generator().manual_seed(seed)
    bev = torch.stack([torch.randint(0, 5, (B, Q), generator=g), torch.randint(0, 6, (B, Q), generator=g)], -1)
    cam = torch.stack([torch.randint(0, 2, (B, Q), generator=g), torch.randint(0, 3, (B, Q), generator=g),
                       torch.randint(0, 4, (B, Q), generator=g)], -1)[:, :, None]
    win = sb.local_windows(LAYOUT, bev, cam, 3, 3)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=DT) for n in (Q, K, K))
    bias = sb.window_bias(win, torch.randn(B, Q, generator=g, dtype=DT), torch.randn(B, Q, generator=g, dtype=DT))
    return win, q, k, v, bias


def zero_one(shape, seed=1):
    m = (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.3).to(DT)
    m.view(-1)[0] = 1.0
    return m


# ---- the functional ops: one call per entry point ---------------------------------------------------------------

def call_functional(entry, key_padding_mask=None, attn_mask=None, seed=0):
    win, q, k, v, bias = scene(seed)
    if entry == "sparse_bias_attention":
        return sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    if entry == "sparse_bias_attention(bias=None)":
        return sb.sparse_bias_attention(q, k, v, None, key_padding_mask=key_padding_mask, attn_mask=attn_mask)
    if entry == "sparse_bias_attention(backend=dense)":
        return sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                        backend="dense")
    if entry == "dense_bias_attention":
        return sb.dense_bias_attention(q, k, v, bias.to_dense(), key_padding_mask=key_padding_mask,
                                       attn_mask=attn_mask)
    assert entry == "window_attention" and attn_mask is None
    return sb.window_attention(q, k, v, win, bias, key_padding_mask=key_padding_mask)


FUNCTIONAL = ["sparse_bias_attention", "sparse_bias_attention(bias=None)", "sparse_bias_attention(backend=dense)",
              "dense_bias_attention"]
OWNER = {e: e.split("(")[0] for e in FUNCTIONAL + ["window_attention"]}


@pytest.mark.parametrize("entry", FUNCTIONAL + ["window_attention"])
@pytest.mark.parametrize("arg", ["key_padding_mask", "attn_mask"])
@pytest.mark.parametrize("kind", ["random", "all ones"])
def test_zero_one_float_mask_is_an_error_in_the_functional_ops(entry, arg, kind):
    if entry == "window_attention" and arg == "attn_mask":
        pytest.skip("window_attention takes no attn_mask (the window is its mask)")
    shape = (B, K) if arg == "key_padding_mask" else (Q, K)
    mask = zero_one(shape) if kind == "random" else torch.ones(shape, dtype=torch.float32)
    with pytest.raises(ValueError) as info:
        call_functional(entry, **{arg: mask})
    msg = str(info.value)
    assert msg.startswith(f"{arg} is a float mask holding only 0.0 and 1.0"), msg
    assert ADDITIVE in msg and f"{OWNER[entry]}'s {arg} is bool with " in msg
    assert (IGNORE if arg == "key_padding_mask" else ATTEND) in msg, msg
    assert f"{arg}.bool()" in msg and f"{arg} == 0" in msg


@pytest.mark.parametrize("entry", FUNCTIONAL + ["window_attention"])
@pytest.mark.parametrize("arg, mask", [
    ("key_padding_mask", torch.ones(B, K, dtype=torch.bool)),
    ("key_padding_mask", torch.full((B, K), -math.inf, dtype=DT)),
    ("attn_mask", torch.zeros(Q, K, dtype=torch.bool)),
    ("attn_mask", torch.full((B, H, Q, K), -math.inf, dtype=torch.float32)),
], ids=["kpm-bool", "kpm-float", "attn-bool", "attn-float"])
def test_a_mask_blocking_every_key_warns_in_the_functional_ops(entry, arg, mask):
    if entry == "window_attention" and arg == "attn_mask":
        pytest.skip("window_attention takes no attn_mask")
    with pytest.warns(UserWarning, match=f"^{arg} blocks every key of every query of this call") as rec:
        out = call_functional(entry, **{arg: mask})
    msg = str(rec[0].message)
    assert (IGNORE if arg == "key_padding_mask" else ATTEND) in msg and f"{OWNER[entry]}'s {arg}" in msg
    if mask.dtype == torch.bool:
        assert f"pass ~{arg}" in msg
    assert rec[0].filename == __file__                       # the warning points at the caller's line
    assert torch.equal(out, torch.zeros_like(out))           # fully masked rows: zeros, as documented


@pytest.mark.parametrize("entry", FUNCTIONAL)
def test_two_masks_blocking_every_key_together_warn_naming_both(entry):
    kpm = torch.zeros(B, K, dtype=torch.bool)
    kpm[:, :20] = True
    attn = torch.zeros(Q, K, dtype=torch.bool)
    attn[:, :20] = True                                      # attends only to the padded keys
    with pytest.warns(UserWarning, match="^key_padding_mask and attn_mask together block every key") as rec:
        out = call_functional(entry, key_padding_mask=kpm, attn_mask=attn)
    msg = str(rec[0].message)
    assert IGNORE in msg and ATTEND in msg
    assert torch.equal(out, torch.zeros_like(out))


def test_a_partly_masked_call_does_not_warn():
    kpm = torch.ones(B, K, dtype=torch.bool)
    kpm[0, 3] = False                                        # one key of one sample left: not every key blocked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = call_functional("sparse_bias_attention", key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0


@pytest.mark.parametrize("mask", [torch.tensor([0.0, 0.5]), torch.tensor([0.0, 1.0, -math.inf]),
                                  torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.0, 1.0])],
                         ids=["half", "with-inf", "one-two", "minus-one"])
def test_other_float_masks_are_additive_masks(mask):
    """Only 0/1 float masks are refused: anything else is a valid additive mask (a bias), checked as one."""
    win, q, k, v, bias = scene()
    am = mask.to(DT).repeat(K)[:K].expand(Q, K)
    out = sb.sparse_bias_attention(q, k, v, bias, attn_mask=am)
    torch.testing.assert_close(out, reference.attention(q, k, v, bias.to_dense().unsqueeze(1) + am), rtol=1e-10,
                               atol=1e-10)


# ---- CMT's all-zero float key padding mask ------------------------------------------------------------------

@pytest.mark.parametrize("entry", FUNCTIONAL + ["window_attention"])
def test_all_zero_float_key_padding_mask_equals_no_mask(entry):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = call_functional(entry, key_padding_mask=torch.zeros(B, K, dtype=torch.float32))
    torch.testing.assert_close(got, call_functional(entry), rtol=1e-12, atol=1e-12)


def test_cmt_zero_key_padding_mask_through_the_decoder_layer():
    """CmtTransformer's call: ``key_padding_mask=memory.new_zeros(bs, K)`` in every decoder layer."""
    torch.manual_seed(0)
    layer = PETRTransformerDecoderLayer(C, H, 24, operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn",
                                                                   "norm")).double().eval()
    query, memory = torch.randn(Q, B, C, dtype=DT), torch.randn(K, B, C, dtype=DT)
    _, _, _, _, bias = scene()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer(query, memory, memory, key_padding_mask=memory.new_zeros(B, K), attention_bias=bias)
    torch.testing.assert_close(got, layer(query, memory, memory, attention_bias=bias), rtol=1e-12, atol=1e-12)


# ---- the modules (mmcv's convention) --------------------------------------------------------------------------

def module_call(attn_mask=None, key_padding_mask=None, local=False, seed=0):
    torch.manual_seed(seed)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    query, memory = torch.randn(Q, B, C, dtype=DT), torch.randn(K, B, C, dtype=DT)
    win, _, _, _, _ = scene(seed)
    extra = dict(local_window=win) if local else {}
    return mha, query, memory, mha(query, memory, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                   **extra)


def test_the_module_blocking_every_key_warns_and_says_what_it_returns():
    """mmcv's convention, True = blocked: an all-True mask is not an identity + out_proj.bias answer in silence."""
    with pytest.warns(UserWarning, match="^attn_mask blocks every key of every query of this call") as rec:
        mha, query, _, out = module_call(attn_mask=torch.ones(Q, K, dtype=torch.bool))
    msg = str(rec[0].message)
    assert "SparseBiasMultiheadAttention's attn_mask is bool with True = blocked" in msg
    assert "identity + out_proj.bias" in msg and "pass ~attn_mask" in msg
    assert rec[0].filename == __file__
    torch.testing.assert_close(out, query + mha.attn.out_proj.bias, rtol=0, atol=0)


@pytest.mark.parametrize("local", [False, True], ids=["dense", "local_window"])
@pytest.mark.parametrize("mask", [torch.ones(B, K, dtype=torch.bool), torch.ones(B, K, dtype=torch.uint8),
                                  torch.full((B, K), -math.inf)], ids=["bool", "uint8", "float"])
def test_the_module_key_padding_mask_blocking_every_key_warns(local, mask):
    with pytest.warns(UserWarning, match="^key_padding_mask blocks every key") as rec:
        module_call(key_padding_mask=mask, local=local)
    assert "SparseBiasMultiheadAttention's key_padding_mask is bool with True = ignore" in str(rec[0].message)


@pytest.mark.parametrize("mask", [torch.ones(B * H, Q, K, dtype=torch.uint8), torch.full((Q, K), -math.inf)],
                         ids=["uint8", "float"])
def test_the_module_attn_mask_blocking_every_key_warns(mask):
    with pytest.warns(UserWarning, match="^attn_mask blocks every key") as rec:
        module_call(attn_mask=mask)
    assert BLOCKED in str(rec[0].message)


@pytest.mark.parametrize("arg", ["attn_mask", "key_padding_mask"])
@pytest.mark.parametrize("local", [False, True], ids=["dense", "local_window"])
def test_zero_one_float_mask_is_an_error_in_the_module(arg, local):
    if local and arg == "attn_mask":
        pytest.skip("with local_window the window is the attention mask")
    mask = zero_one((B, K) if arg == "key_padding_mask" else (Q, K))
    with pytest.raises(ValueError) as info:
        module_call(**{arg: mask}, local=local)
    msg = str(info.value)
    assert msg.startswith(f"{arg} is a float mask holding only 0.0 and 1.0") and ADDITIVE in msg
    assert f"SparseBiasMultiheadAttention's {arg} is bool with " + (IGNORE if arg == "key_padding_mask" else BLOCKED) \
        in msg, msg
    if arg == "attn_mask":
        assert "if 1.0 marks blocked pairs, pass attn_mask.bool()" in msg.lower()


def test_the_module_refuses_an_integer_attn_mask_naming_its_convention():
    with pytest.raises(TypeError, match="attn_mask must be bool \\(True = blocked, mmcv's"):
        module_call(attn_mask=torch.ones(Q, K, dtype=torch.int64))


def test_the_decoder_layer_reports_the_self_attention_mask():
    """CmtTransformer's attn_masks (the self-attention's denoising mask, True = blocked), all blocked."""
    layer = PETRTransformerDecoderLayer(C, H, 24, operation_order=("self_attn", "norm", "cross_attn", "norm",
                                                                   "ffn", "norm")).double().eval()
    query, memory = torch.randn(Q, B, C, dtype=DT), torch.randn(K, B, C, dtype=DT)
    with pytest.warns(UserWarning, match="^attn_mask blocks every key") as rec:
        layer(query, memory, memory, attn_masks=[torch.ones(Q, Q, dtype=torch.bool), None])
    assert BLOCKED in str(rec[0].message) and rec[0].filename == __file__


# ---- each convention against the reference --------------------------------------------------------------------

def masks_for_reference(seed=3):
    """Partial masks of every kind and their additive form: ``(kpm kinds, attn kinds)``; each is
    ``{name: (mask, additive [B|1, H|1, Q|1, K])}``. Sample 1 has its last keys padded; a few pairs blocked."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(B, K, dtype=torch.bool)
    pad[1, -7:] = True
    kpm_add = torch.zeros(B, K, dtype=DT).masked_fill(pad, -math.inf).view(B, 1, 1, K)
    soft = torch.randn(B, K, generator=g, dtype=DT).masked_fill(pad, -math.inf)
    kpms = {"bool": (pad, kpm_add), "uint8": (pad.to(torch.uint8), kpm_add),
            "float-inf": (kpm_add.view(B, K).float(), kpm_add), "float-soft": (soft, soft.view(B, 1, 1, K))}
    blocked = torch.rand(B, H, Q, K, generator=g) < 0.3
    blocked[..., 0] = False                                  # every row keeps a key
    add = torch.zeros(B, H, Q, K, dtype=DT).masked_fill(blocked, -math.inf)
    attns = {"bool[Q,K]": (~blocked[0, 0], add[:1, :1]), "bool[B,H,Q,K]": (~blocked, add),
             "float[B,1,Q,K]": (add[:, :1].float(), add[:, :1]),
             "soft": (torch.randn(Q, K, generator=g, dtype=DT), None)}
    attns["soft"] = (attns["soft"][0], attns["soft"][0].view(1, 1, Q, K))
    return kpms, attns


KPM_KINDS = ["bool", "uint8", "float-inf", "float-soft"]


def pairs(attn_kinds):
    """Each kind alone, and a few combinations."""
    return ([(None, None)] + [(k, None) for k in KPM_KINDS] + [(None, a) for a in attn_kinds]
            + list(zip(KPM_KINDS, attn_kinds[::-1])))


@pytest.mark.parametrize("kpm_kind, attn_kind", pairs(["bool[Q,K]", "bool[B,H,Q,K]", "float[B,1,Q,K]", "soft"]))
def test_functional_conventions_against_the_dense_reference(kpm_kind, attn_kind):
    """kpm: True/nonzero = ignore, float additive; attn_mask: True = attend (as SDPA), float additive."""
    kpms, attns = masks_for_reference()
    win, q, k, v, bias = scene()
    kpm, kpm_add = kpms[kpm_kind] if kpm_kind else (None, 0.0)
    am, am_add = attns[attn_kind] if attn_kind else (None, 0.0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    want = reference.attention(q, k, v, bias.to_dense().unsqueeze(1) + kpm_add + am_add)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for backend in ("auto", "dense"):
        got = sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=kpm, attn_mask=am, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), want_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if kpm is None and am is not None:             # SDPA itself, the convention's origin (no bias there)
        torch.testing.assert_close(sb.sparse_bias_attention(q, k, v, None, attn_mask=am),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=am if am.dtype == torch.bool
                                                                  else am.to(DT)), rtol=1e-10, atol=1e-10)
    if am is None:
        lam = sb.window_attention(q, k, v, win, bias, key_padding_mask=kpm)
        lam_want = reference.window_attention(q, k, v, win, bias.to_dense().unsqueeze(1) + kpm_add)
        torch.testing.assert_close(lam, lam_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kpm_kind, attn_kind", pairs(["bool[Q,K]", "bool[B*H,Q,K]", "uint8[Q,K]", "float[Q,K]"]))
def test_module_conventions_equal_torch_multihead_attention(kpm_kind, attn_kind):
    """The module takes mmcv's / nn.MultiheadAttention's masks (True = blocked): the same masks given to the
    nn.MultiheadAttention that holds its weights give the same answer."""
    kpms, _ = masks_for_reference()
    g = torch.Generator().manual_seed(5)
    blocked = torch.rand(B * H, Q, K, generator=g) < 0.3
    blocked[..., 0] = False
    attns = {"bool[Q,K]": blocked[0], "bool[B*H,Q,K]": blocked, "uint8[Q,K]": blocked[0].to(torch.uint8),
             "float[Q,K]": torch.randn(Q, K, generator=g, dtype=DT).masked_fill(blocked[0], -math.inf)}
    kpm = kpms[kpm_kind][0] if kpm_kind else None
    am = attns[attn_kind] if attn_kind else None
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    query, memory = torch.randn(Q, B, C, dtype=DT), torch.randn(K, B, C, dtype=DT)
    got = mha(query, memory, memory, attn_mask=am, key_padding_mask=kpm)
    t_kpm = kpm.bool() if kpm is not None and kpm.dtype == torch.uint8 else kpm
    t_am = am.bool() if am is not None and am.dtype == torch.uint8 else am
    if t_kpm is not None and t_am is not None and t_kpm.dtype != t_am.dtype:    # torch wants matching kinds
        t_kpm = torch.zeros(B, K, dtype=DT).masked_fill(t_kpm, -math.inf) if t_kpm.dtype == torch.bool else t_kpm
        t_am = torch.zeros(t_am.shape, dtype=DT).masked_fill(t_am, -math.inf) if t_am.dtype == torch.bool else t_am
    t_kpm = t_kpm.to(DT) if t_kpm is not None and t_kpm.is_floating_point() else t_kpm   # torch wants q's dtype
    want = mha.attn(query, memory, memory, attn_mask=t_am, key_padding_mask=t_kpm, need_weights=False)[0] + query
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ---- when the values are read: no host sync on the hot path --------------------------------------------------

def test_float_masks_on_the_cpu_add_no_counted_sync():
    """CPU masks are read from host memory (no device to wait for): the sync counter stays at zero, as for bool
    masks (tests/test_host_sync.py)."""
    win, q, k, v, bias = scene()
    kpm, am = torch.zeros(B, K), torch.randn(Q, K, dtype=DT)
    for _ in range(2):
        with sb.count_host_syncs() as syncs:
            sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=kpm, attn_mask=am)
            sb.window_attention(q, k, v, win, bias, key_padding_mask=kpm)
    assert syncs.total == 0, dict(syncs.ops)


def test_device_masks_are_read_once_per_argument_and_kind(monkeypatch):
    """Off the CPU, a mask's values are read on the first call per argument and kind (one host sync), then never
    again -- except under the debug switch, and never while compiling (meta tensors stand in for a device)."""
    monkeypatch.setattr(_validation, "_READ_ON_DEVICE", set())
    reads = _validation._reads_mask_values
    dev_bool = ("key_padding_mask", torch.zeros(B, K, dtype=torch.bool, device="meta"))
    dev_float = ("key_padding_mask", torch.zeros(B, K, device="meta"))
    dev_attn = ("attn_mask", torch.zeros(Q, K, dtype=torch.bool, device="meta"))
    assert reads([dev_bool]) and not reads([dev_bool]) and not reads([dev_bool])
    assert reads([dev_float]) and not reads([dev_float])
    assert reads([dev_bool, dev_attn]) and not reads([dev_attn]) and not reads([dev_bool, dev_attn])
    assert reads([("attn_mask", torch.zeros(Q, K))])                          # CPU: every call
    sb.set_debug_checks(True)
    try:
        assert reads([dev_bool])
    finally:
        sb.set_debug_checks(False)
    monkeypatch.setattr(_validation, "is_compiling", lambda: True)
    assert not reads([("attn_mask", torch.zeros(Q, K))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_masks_are_checked_on_the_first_call_then_never_synchronise(monkeypatch):
    monkeypatch.setattr(_validation, "_READ_ON_DEVICE", set())
    win, q, k, v, bias = scene()
    q, k, v, win = q.cuda(), k.cuda(), v.cuda(), win.cuda()
    bias = sb.window_bias(win, torch.rand(B, Q, dtype=DT, device="cuda"), None)
    with pytest.raises(ValueError, match="key_padding_mask is a float mask holding only 0.0 and 1.0"):
        sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=zero_one((B, K)).cuda())
    with pytest.warns(UserWarning, match="^key_padding_mask blocks every key"):
        sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=torch.ones(B, K, dtype=torch.bool, device="cuda"))
    kpm = torch.zeros(B, K, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=kpm)
        sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=torch.zeros(B, K, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
