"""Drop-in for the dense versions: CMTTEST's generator output, checkpoints, nn.MultiheadAttention's masks and the
sequence-first dense bias -- each checked against the dense behaviour written out here."""
import pytest
import torch

import sparse_bias as sb
from sparse_bias.nn import AttentionBiasGenerator, SparseBiasMultiheadAttention

BEV, PERS = (9, 10), (3, 5, 6)
NK = 90 + 90
C, H = 16, 4

#: exactly CMTTEST's keys (CMTTEST/projects/configs/fusion/cmt_aqr_*.py), smaller feature maps
CMTTEST_CONFIG = dict(type="AttentionBiasGenerator", bev_feature_shape=BEV, pers_feature_shape=PERS, window_size=5,
                      bias_scale=2.5, learnable_scale=True, min_scale=0.5, max_scale=5.0, use_local_bias=True,
                      fp16=True)


def cmttest_dense_bias(lw, cw, pts_bev, pts_pers, bias_scale, learnable, min_scale, max_scale, window, local=True):
    """CMTTEST's AttentionBiasGenerator as documented: each weight on its (border-clipped, same-view) window of
    the [BEV | camera] key axis, times the scale (clamped to [min_scale, max_scale] when learnable), then the
    whole bias clamped to +-min(5, max_scale). Float positions, as its AQR hands them over."""
    (hb, wb), (nv, hc, wc) = BEV, PERS
    bsz, nq = lw.shape
    rows = []
    for b in range(bsz):
        for q in range(nq):
            row = [torch.zeros(()) * lw[b, q]] * NK
            if local:
                y, x = divmod(int(pts_bev[b, q]), wb)
                view, r, c = (int(t) for t in pts_pers[b, q])
                for dy in range(-(window // 2), window // 2 + 1):
                    for dx in range(-(window // 2), window // 2 + 1):
                        if 0 <= y + dy < hb and 0 <= x + dx < wb:
                            row[(y + dy) * wb + x + dx] = lw[b, q]
                        if 0 <= r + dy < hc and 0 <= c + dx < wc:
                            row[hb * wb + view * hc * wc + (r + dy) * wc + c + dx] = cw[b, q]
            else:
                row = [lw[b, q]] * (hb * wb) + [cw[b, q]] * (nv * hc * wc)
            rows.append(torch.stack(row))
    bias = torch.stack(rows).view(bsz, nq, NK)
    scale = bias_scale.clamp(min_scale, max_scale) if learnable else bias_scale
    limit = min(5.0, max_scale)
    return (bias * scale).clamp(-limit, limit)


def positions(bsz=2, nq=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pts_bev = torch.randint(0, BEV[0] * BEV[1], (bsz, nq), generator=gen).float()     # CMTTEST: floats
    pts_pers = torch.stack([torch.randint(0, PERS[0], (bsz, nq), generator=gen),
                            torch.randint(0, PERS[1], (bsz, nq), generator=gen),
                            torch.randint(0, PERS[2], (bsz, nq), generator=gen)], -1).float()
    pts_bev[0, 0], pts_pers[0, 0] = 0.0, torch.tensor([0.0, 0.0, 0.0])               # corners
    pts_bev[1, 1], pts_pers[1, 1] = 89.0, torch.tensor([2.0, 4.0, 5.0])
    lw = 6 * torch.rand(bsz, nq, generator=gen) - 3                                     # weights in [-3, 3]
    cw = 6 * torch.rand(bsz, nq, generator=gen) - 3
    return pts_bev, pts_pers, lw, cw


# ---- the generator: CMTTEST's numbers -------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:bias_scale .* is outside the learnable range")
@pytest.mark.parametrize("overrides", [{}, dict(learnable_scale=False, bias_scale=8.0), dict(bias_scale=0.2),
                                       dict(max_scale=3.0, bias_scale=4.0), dict(use_local_bias=False),
                                       dict(fp16=False, window_size=3)])
def test_cmttest_config_reproduces_cmttest_output_and_gradients(overrides):
    cfg = dict(CMTTEST_CONFIG, **overrides)
    gen = sb.build_attention_bias(cfg)
    pts_bev, pts_pers, lw, cw = positions()
    lw1, cw1, lw2, cw2 = (t.clone().requires_grad_() for t in (lw, cw, lw, cw))
    got = gen(lw1, cw1, pts_bev_indices=pts_bev, pts_pers_indices=pts_pers)
    got_dense = got.to_dense()
    scale_ref = torch.tensor(float(cfg["bias_scale"]), requires_grad=True)
    want = cmttest_dense_bias(lw2, cw2, pts_bev, pts_pers, scale_ref, cfg["learnable_scale"], cfg["min_scale"],
                              cfg["max_scale"], cfg["window_size"], cfg["use_local_bias"])
    if cfg["fp16"]:
        assert got_dense.dtype == torch.float16
        want = want.half()
    torch.testing.assert_close(got_dense, want, rtol=0, atol=0)
    g = torch.randn(want.shape)
    grads = torch.autograd.grad(got_dense.float(), [lw1, cw1], g, retain_graph=True)
    want_grads = torch.autograd.grad(want.float(), [lw2, cw2], g, retain_graph=True)
    tol = 2e-3 if cfg["fp16"] else 1e-6          # half-precision gradients: summed in another order
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    if cfg["learnable_scale"]:
        ds, = torch.autograd.grad(got_dense.float().sum(), gen.bias_scale)
        ds_ref, = torch.autograd.grad(want.float().sum(), scale_ref)
        torch.testing.assert_close(ds.float(), ds_ref, rtol=1e-5, atol=1e-5)


def test_final_clamp_is_an_option_with_zero_gradient_where_it_clips():
    pts_bev, pts_pers, lw, cw = positions()
    gen = AttentionBiasGenerator(bev_feature_shape=BEV, pers_feature_shape=PERS, window_size=3, bias_scale=2.0,
                                 bias_clamp=1.5)
    lw = lw.requires_grad_()
    bias = gen(lw, cw, pts_bev, pts_pers)
    assert float(bias.values.detach().abs().max()) == 1.5
    grad, = torch.autograd.grad(bias.values.sum(), lw)
    clipped = (2.0 * lw.detach()).abs() > 1.5
    assert (grad[clipped] == 0).all() and (grad[~clipped] != 0).all()
    assert sb.build_attention_bias(dict(enable=True, bias_scale=8.0)).bias_clamp is None      # the dense version


def test_even_window_size_names_the_odd_sizes_around_it():
    with pytest.raises(ValueError, match="window_size must be odd .* got 8: use 7 or 9"):
        sb.build_attention_bias(dict(CMTTEST_CONFIG, window_size=8))
    with pytest.raises(ValueError, match=r"unknown keys \['min_scal'\]"):
        sb.build_attention_bias(dict(CMTTEST_CONFIG, min_scal=0.5))
    with pytest.raises(ValueError, match="type must be 'AttentionBiasGenerator', got 'Foo'"):
        sb.build_attention_bias(dict(CMTTEST_CONFIG, type="Foo"))
    with pytest.raises(ValueError, match="non-integer"):
        sb.build_attention_bias(CMTTEST_CONFIG)(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([[1.5]]),
                                                torch.zeros(1, 1, 3))


def test_every_origin_and_cmttest_key_is_accepted():
    origin = dict(enable=True, window_size=15, bias_scale=1.0, use_local_bias=True, fp16=True, debug_mode=True)
    gen = sb.build_attention_bias(origin)
    assert gen.fp16 and gen.debug and gen.bias_clamp is None and float(gen.bias_scale) == 1.0
    both = dict(origin, **CMTTEST_CONFIG, init_cfg=None)
    gen = sb.build_attention_bias(both)
    assert gen.bias_clamp == 5.0 and gen.scale_range == (0.5, 5.0) and gen.learnable_scale
    assert sb.build_attention_bias(dict(both, enable=False)) is None
    assert float(sb.build_attention_bias(dict(type="AttentionBiasGenerator")).bias_scale) == 2.5   # CMTTEST's default


# ---- checkpoints ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("learnable", [True, False])
def test_cmttest_generator_checkpoint_loads_strictly(learnable):
    w = 5
    offsets = torch.arange(-(w // 2), w // 2 + 1)
    y, x = torch.meshgrid(offsets, offsets, indexing="ij")
    ckpt = {"bias_scale": torch.tensor(3.25), "y_offsets": y.reshape(-1), "x_offsets": x.reshape(-1),
            "window_offsets_bev": (y * BEV[1] + x).reshape(-1), "window_offsets_pers": (y * PERS[2] + x).reshape(-1)}
    gen = sb.build_attention_bias(dict(CMTTEST_CONFIG, learnable_scale=learnable, fp16=False))
    result = gen.load_state_dict(ckpt, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert float(gen.bias_scale.detach()) == 3.25 and int(gen.step) == 0
    pts_bev, pts_pers, lw, cw = positions()
    want = cmttest_dense_bias(lw, cw, pts_bev, pts_pers, torch.tensor(3.25), learnable, 0.5, 5.0, w)
    torch.testing.assert_close(gen(lw, cw, pts_bev, pts_pers).to_dense(), want, rtol=0, atol=0)
    gen.load_state_dict(dict(ckpt, step=torch.tensor(7)), strict=True)            # this library's own checkpoints
    assert int(gen.step) == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cmt_attention_checkpoints_load_strictly_and_match(dtype):
    """CMT's PETRMultiheadFlashAttention and mmcv's MultiheadAttention: ``attn.in_proj_*``, ``attn.out_proj.*``."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(C, H).double()
    ckpt = {f"attn.{k}": v.to(dtype) for k, v in ref.state_dict().items()}
    assert set(ckpt) == {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    mha.load_state_dict(ckpt, strict=True)
    ref.load_state_dict({k[5:]: v for k, v in ckpt.items()})
    q, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    torch.testing.assert_close(mha(q, kv, kv), ref(q, kv, kv)[0] + q, rtol=1e-10, atol=1e-10)


# ---- nn.MultiheadAttention's masks and the sequence-first dense bias ---------------------------------------

def mha_pair(batch_first=False):
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H, batch_first=batch_first).double().eval()
    return mha, mha.attn          # the module and torch's MHA on the very same parameters


@pytest.mark.parametrize("kind", ["float_zero", "float", "uint8", "bool"])
def test_key_padding_masks_as_torch_takes_them(kind):
    mha, ref = mha_pair()
    q, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    masked = torch.zeros(2, 9, dtype=torch.bool)
    masked[0, -3:] = masked[1, :2] = True
    kpm = {"float_zero": torch.zeros(2, 9, dtype=torch.float64),                  # CMT: memory.new_zeros(bs, K)
           "float": torch.randn(2, 9, dtype=torch.float64).masked_fill(masked, float("-inf")),
           "uint8": masked.to(torch.uint8), "bool": masked}[kind]
    ref_kpm = kpm.bool() if kind == "uint8" else kpm
    torch.testing.assert_close(mha(q, kv, kv, key_padding_mask=kpm),
                               ref(q, kv, kv, key_padding_mask=ref_kpm)[0] + q, rtol=1e-10, atol=1e-10)


def test_zero_float_key_padding_mask_is_no_mask():
    """CMT passes ``memory.new_zeros(bs, K)``: applied as an (all-zero) additive mask, the same result as none. (It
    is no longer dropped: telling it from a real mask would read device values, a host sync per call.)"""
    mha, _ = mha_pair()
    q, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    torch.testing.assert_close(mha(q, kv, kv, key_padding_mask=torch.zeros(2, 9)), mha(q, kv, kv), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("kind", ["bool", "uint8", "float"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_attn_masks_as_torch_takes_them(kind, ndim):
    mha, ref = mha_pair()
    q, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    shape = (5, 9) if ndim == 2 else (2 * H, 5, 9)
    blocked = torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.3
    blocked[..., 0] = False
    mask = {"bool": blocked, "uint8": blocked.to(torch.uint8),
            "float": torch.randn(shape, dtype=torch.float64).masked_fill(blocked, float("-inf"))}[kind]
    ref_mask = mask.bool() if kind == "uint8" else mask
    torch.testing.assert_close(mha(q, kv, kv, attn_mask=mask), ref(q, kv, kv, attn_mask=ref_mask)[0] + q,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("nq", [5, 2])                        # 2 == B: a transposed bias would go unnoticed
def test_dense_bias_in_the_modules_sequence_layout(batch_first, nq):
    """The dense version / CMTTEST: the bias [Q, B, K] is added to the scores of every head (as CMTTEST's
    PETRMultiheadAttention adds it to the float attn_mask [B * H, Q, K])."""
    mha, ref = mha_pair(batch_first)
    q, kv = torch.randn(nq, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    bias = torch.randn(nq, 2, 9, dtype=torch.float64)                             # [Q, B, K]
    additive = bias.transpose(0, 1).unsqueeze(1).expand(-1, H, -1, -1).reshape(2 * H, nq, 9)
    want = ref(q, kv, kv, attn_mask=additive)[0] + q
    t = (lambda x: x.transpose(0, 1)) if batch_first else (lambda x: x)
    got = mha(t(q), t(kv), t(kv), attention_bias=t(bias))
    torch.testing.assert_close(t(got), want, rtol=1e-10, atol=1e-10)
    if nq != 2:
        with pytest.raises(ValueError, match=r"pass attention_bias.transpose\(0, 1\)"):
            mha(t(q), t(kv), t(kv), attention_bias=bias.transpose(0, 1) if not batch_first else bias)


def test_decoder_and_transformer_take_batch_first_bias():
    torch.manual_seed(0)
    dec = sb.nn.PETRTransformerDecoder(2, embed_dims=C, num_heads=H, feedforward_channels=32).double().eval()
    q, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    bias = torch.randn(2, 5, 9, dtype=torch.float64)                               # [B, Q, K] at decoder level
    out = dec(q, kv, kv, attention_bias=bias)
    layer_out = dec.layers[0](q, kv, kv, attention_bias=bias.transpose(0, 1))       # [Q, B, K] at layer level
    torch.testing.assert_close(dec.post_norm(layer_out), out[0])
