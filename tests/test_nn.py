"""The nn modules: mmcv calling conventions, sparse == dense bias through every module, config entry point."""
import logging

import pytest
import torch
from helpers import profile_names, random_positions

import sparse_bias as sb
from sparse_bias.nn import (MLPWeightGenerator, AttentionBiasGenerator, CmtTransformer, PETRTransformerDecoder,
                            PETRTransformerDecoderLayer, SparseBiasMultiheadAttention)

import reference

LAYOUT = sb.KeyLayout(bev_shape=(6, 7), cam_shape=(2, 3, 4))        # 42 + 24 = 66 keys
C, H = 16, 4


def scene(batch=2, queries=5, seed=0, per_head=False, layout=LAYOUT):
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(layout, batch, queries, 2, gen)
    tail = (H,) if per_head else ()
    lw = torch.rand((batch, queries) + tail, generator=gen, dtype=torch.float64) * 2 - 1
    cw = torch.rand((batch, queries) + tail, generator=gen, dtype=torch.float64) * 2 - 1
    return bev_pos, cam_pos, lw, cw


def grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), tensors, allow_unused=True)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---- SparseBiasMultiheadAttention ------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_without_bias_equals_torch_multihead_attention(batch_first):
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H, batch_first=batch_first).double().eval()
    q, k = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(9, 2, C, dtype=torch.float64)
    qp, kp = torch.randn_like(q), torch.randn_like(k)
    attn_mask = torch.zeros(5, 9, dtype=torch.bool)
    attn_mask[1, :3] = True                                  # nn.MultiheadAttention convention: True = blocked
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, -2:] = True
    ref = mha.attn(q + qp, k + kp, k, attn_mask=attn_mask, key_padding_mask=kpm)[0] + q
    t = (lambda x: x.transpose(0, 1)) if batch_first else (lambda x: x)
    out = mha(t(q), t(k), t(k), query_pos=t(qp), key_pos=t(kp), attn_mask=attn_mask, key_padding_mask=kpm)
    close(t(out), ref)


def test_mha_defaults_and_key_pos_fallback():
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, pos = torch.randn(6, 2, C, dtype=torch.float64), torch.randn(6, 2, C, dtype=torch.float64)
    # key = value = query, identity = query, key_pos = query_pos (same shape)
    close(mha(x, query_pos=pos), mha.attn(x + pos, x + pos, x)[0] + x)
    identity = torch.randn_like(x)
    close(mha(x, x, x, identity), mha.attn(x, x, x)[0] + identity)
    with pytest.warns(UserWarning, match="position encoding of key is missing"):
        mha(x, torch.randn(3, 2, C, dtype=torch.float64), query_pos=pos)


def test_mha_legacy_dropout_keyword():
    with pytest.warns(DeprecationWarning, match="deprecated"):
        mha = SparseBiasMultiheadAttention(C, H, dropout=0.2)
    assert mha.attn_drop == 0.2 and isinstance(mha.dropout_layer, torch.nn.Dropout) and mha.dropout_layer.p == 0.2
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        SparseBiasMultiheadAttention(C, H, bogus=1)
    with pytest.raises(ValueError, match="divisible"):
        SparseBiasMultiheadAttention(10, 3)


def test_mha_loads_mmcv_style_state_dict():
    ref = torch.nn.MultiheadAttention(C, H)
    mha = SparseBiasMultiheadAttention(C, H)
    mha.load_state_dict({f"attn.{k}": v for k, v in ref.state_dict().items()})
    assert torch.equal(mha.attn.in_proj_weight, ref.in_proj_weight)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_sparse_and_dense_bias_agree(per_head, batch_first):
    torch.manual_seed(1)
    mha = SparseBiasMultiheadAttention(C, H, batch_first=batch_first).double()
    bev_pos, cam_pos, lw, cw = scene(per_head=per_head)
    win = sb.local_windows(LAYOUT, bev_pos, cam_pos, 3, 3)
    shape = (2, 5, C) if batch_first else (5, 2, C)
    kshape = (2, 66, C) if batch_first else (66, 2, C)
    q = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    k = torch.randn(kshape, dtype=torch.float64, requires_grad=True)
    results = []
    for dense in (False, True):
        lwr, cwr = lw.clone().requires_grad_(), cw.clone().requires_grad_()
        bias = sb.window_bias(win, lwr, cwr)
        dense_bias = bias.to_dense()                    # [B, Q, K] / [B, H, Q, K]; the module's layout for 3-D
        if dense_bias.dim() == 3 and not batch_first:
            dense_bias = dense_bias.transpose(0, 1)
        out = mha(q, k, k, attention_bias=dense_bias if dense else bias)
        results.append([out] + list(grads(out, [q, k, lwr, cwr] + list(mha.parameters()))))
    for a, b in zip(*results):
        close(a, b)


def test_mha_dropout_in_training_only():
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H, attn_drop=0.5)
    x = torch.randn(4, 2, C)
    bev_pos, cam_pos, lw, cw = scene(queries=4)
    bias = sb.window_bias(sb.local_windows(LAYOUT, bev_pos, cam_pos, 3, 3), lw.float(), cw.float())
    kv = torch.randn(66, 2, C)
    mha.eval()
    torch.testing.assert_close(mha(x, kv, kv, attention_bias=bias), mha(x, kv, kv, attention_bias=bias))
    mha.train()
    assert not torch.allclose(mha(x, kv, kv, attention_bias=bias), mha(x, kv, kv, attention_bias=bias))


def test_mha_debug_mode_logs_the_check(caplog):
    mha = SparseBiasMultiheadAttention(C, H).double()
    gen = AttentionBiasGenerator(LAYOUT, window_size=3, debug=True)
    bev_pos, cam_pos, lw, cw = scene()
    bias = gen(lw, cw, bev_pos, cam_pos)
    x, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(66, 2, C, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="sparse_bias"):
        mha(x, kv, kv, attention_bias=bias)
    assert "max |sparse - dense|" in caplog.text and "values min" in caplog.text
    err = float(caplog.text.split("max |sparse - dense| = ")[1].split()[0])
    assert err < 1e-12


# ---- generators ------------------------------------------------------------------------------------

def check_generator_dense_mode(profile, per_head):
    """AttentionBiasGenerator with ``profile``: its dense mode gives its sparse bias's ``to_dense()``, which is
    window_bias's."""
    bev_pos, cam_pos, lw, cw = scene(per_head=per_head)
    kwargs = dict(window_size=(3, 5), bias_scale=0.7, profile=profile)
    sparse = AttentionBiasGenerator(LAYOUT, **kwargs)(lw, cw, bev_pos, cam_pos)
    dense = AttentionBiasGenerator(LAYOUT, dense=True, **kwargs)(lw, cw, bev_pos, cam_pos)
    assert isinstance(sparse, sb.SparseBias)
    close(dense, sparse.to_dense())
    expected = sb.window_bias(sb.local_windows(LAYOUT, bev_pos, cam_pos, 3, 5), lw, cw, scale=0.7, profile=profile)
    close(dense, expected.to_dense())


@pytest.mark.parametrize("profile", profile_names())
@pytest.mark.parametrize("per_head", [False, True])
def test_generator_dense_mode_equals_to_dense(profile, per_head):
    check_generator_dense_mode(profile, per_head)


def test_generator_accepts_flat_bev_indices_and_per_query_sizes():
    bev_pos, cam_pos, lw, cw = scene()
    flat = torch.where(bev_pos[..., 0] >= 0, bev_pos[..., 0] * 7 + bev_pos[..., 1], -1)
    gen = AttentionBiasGenerator(LAYOUT, window_size=3)
    close(gen(lw, cw, flat, cam_pos).to_dense(), gen(lw, cw, bev_pos, cam_pos).to_dense())
    sizes = torch.tensor([[1, 3, 5, 0, 3], [3, 3, 1, 1, 5]])
    got = gen(lw, cw, bev_pos, cam_pos, window_size=(sizes, 3)).to_dense()
    close(got, sb.window_bias(sb.local_windows(LAYOUT, bev_pos, cam_pos, sizes, 3), lw, cw).to_dense())


def test_generator_learnable_clamped_scale_and_warmup():
    bev_pos, cam_pos, lw, cw = scene()
    gen = AttentionBiasGenerator(LAYOUT, window_size=3, bias_scale=2.0, learnable_scale=True, scale_range=(0.0, 3.0))
    bias = gen(lw.float(), cw.float(), bev_pos, cam_pos)
    bias.values.sum().backward()
    assert gen.bias_scale.grad is not None and gen.bias_scale.grad != 0
    with torch.no_grad():
        gen.bias_scale.fill_(9.0)
        assert float(gen.scale()) == 3.0                                   # clamped
    warm = AttentionBiasGenerator(LAYOUT, window_size=3, bias_scale=1.0, warmup_steps=4).train()
    scales = []
    for _ in range(6):
        b = warm(lw, cw, bev_pos, cam_pos)
        scales.append(float((b.values / sb.window_bias(b.index, lw, cw).values).nanmean()))
    assert scales == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    warm.eval()
    assert int(warm.step) == 6 and float(warm.scale()) == 1.0


def test_generator_fp16_and_global_mode():
    bev_pos, cam_pos, lw, cw = scene()
    gen = AttentionBiasGenerator(LAYOUT, window_size=3, fp16=True)
    assert gen(lw, cw, bev_pos, cam_pos).values.dtype == torch.float16
    glob = AttentionBiasGenerator(LAYOUT, bias_scale=0.5, use_local_bias=False)(lw, cw, bev_pos, cam_pos)
    assert isinstance(glob, sb.ModalityBias)
    dense = glob.to_dense()
    close(dense[..., :42], (0.5 * lw).unsqueeze(-1).expand(-1, -1, 42))
    close(dense[..., 42:], (0.5 * cw).unsqueeze(-1).expand(-1, -1, 24))


@pytest.mark.parametrize("activation, init", [("sigmoid", 0.5), ("sigmoid", 0.2), ("tanh", 0.3)])
@pytest.mark.parametrize("num_heads", [None, 4])
def test_aqr_weight_generator(activation, init, num_heads):
    torch.manual_seed(0)
    aqr = MLPWeightGenerator(C, num_heads=num_heads, activation=activation, init_weight=init)
    lw, cw = aqr(torch.randn(7, 3, C))
    shape = (3, 7) if num_heads is None else (3, 7, num_heads)
    assert lw.shape == cw.shape == shape
    assert float((lw.detach() - init).abs().max()) < 0.05 and float((cw.detach() - init).abs().max()) < 0.05
    lw_bf, _ = MLPWeightGenerator(C, batch_first=True)(torch.randn(3, 7, C))
    assert lw_bf.shape == (3, 7)
    with pytest.raises(ValueError, match="init_weight"):
        MLPWeightGenerator(C, activation="tanh", init_weight=1.5)


# ---- ModalityBias (use_local_bias=False) ---------------------------------------------------------------

@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_modality_bias_attention_matches_dense_reference(per_head, with_mask):
    gen = torch.Generator().manual_seed(3)
    tail = (H,) if per_head else ()
    values = (torch.randn((2, 5, 2) + tail, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    q = torch.randn(2, H, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, H, 66, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, H, 66, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    kpm = None
    if with_mask:
        kpm = torch.zeros(2, 66, dtype=torch.bool)
        kpm[0, 40:50] = True
    bias = sb.ModalityBias(LAYOUT, values)
    out = sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=kpm)
    ref = reference.sparse_bias_attention(q, k, v, bias, key_padding_mask=kpm)
    for a, b in zip([out] + list(grads(out, [q, k, v, values])), [ref] + list(grads(ref, [q, k, v, values]))):
        close(a, b)
    drop = dict(dropout_p=0.3, dropout_seed=5, key_padding_mask=kpm)
    close(sb.sparse_bias_attention(q, k, v, bias, **drop), reference.sparse_bias_attention(q, k, v, bias, **drop))


# ---- decoder ----------------------------------------------------------------------------------------

def cmt_inputs(batch=2, queries=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(batch, C, 6, 7, **f64)
    x_img = torch.randn(batch * 2, C, 3, 4, **f64)
    query_embed = torch.randn(batch, queries, C, **f64)
    bev_pos_embed = torch.randn(42, C, **f64)
    rv_pos_embed = torch.randn(batch * 2, 3, 4, C, **f64)
    return x, x_img, query_embed, bev_pos_embed, rv_pos_embed


def test_cmt_transformer_memory_order_and_shapes():
    torch.manual_seed(0)
    model = CmtTransformer(C, H, num_layers=3, feedforward_channels=32, dropout=0.0).double().eval()
    x, x_img, qe, bpe, rpe = cmt_inputs()
    out_dec, memory = model(x, x_img, qe, bpe, rpe)
    assert out_dec.shape == (3, 2, 5, C) and memory.shape == (2, 66, C)
    _, view, row, col = LAYOUT.decode(torch.arange(66))
    for key in (0, 13, 41, 42, 50, 65):
        b = 1
        want = x[b, :, row[key], col[key]] if key < 42 else x_img[b * 2 + view[key], :, row[key], col[key]]
        assert torch.equal(memory[b, key], want)


@pytest.mark.parametrize("per_head", [False, True])
def test_cmt_transformer_sparse_equals_dense_bias(per_head):
    torch.manual_seed(0)
    model = CmtTransformer(C, H, num_layers=2, feedforward_channels=32, dropout=0.0).double()
    inputs = [t.requires_grad_() for t in cmt_inputs()]
    bev_pos, cam_pos, lw, cw = scene(per_head=per_head)
    gen = AttentionBiasGenerator(LAYOUT, window_size=3)
    dn_mask = torch.zeros(5, 5, dtype=torch.bool)
    dn_mask[:2, 2:] = True                                                  # a denoising-style self-attn mask
    results = []
    for dense in (False, True):
        gen.dense = dense
        lwr, cwr = lw.clone().requires_grad_(), cw.clone().requires_grad_()
        out, _ = model(*inputs, attn_masks=dn_mask, attention_bias=gen(lwr, cwr, bev_pos, cam_pos))
        results.append([out] + list(grads(out, inputs + [lwr, cwr] + list(model.parameters()))))
    for a, b in zip(*results):
        close(a, b, 1e-9)


def test_bias_reaches_only_the_cross_attention(monkeypatch):
    layer = PETRTransformerDecoderLayer(C, H, 32, dropout=0.0)
    seen = []
    for i, attn in enumerate(layer.attentions):
        original = attn.forward
        monkeypatch.setattr(attn, "forward", lambda *a, _o=original, _i=i, **kw: seen.append(
            (_i, kw.get("attention_bias") is not None)) or _o(*a, **kw))
    bev_pos, cam_pos, lw, cw = scene()
    bias = AttentionBiasGenerator(LAYOUT, window_size=3)(lw.float(), cw.float(), bev_pos, cam_pos)
    layer(torch.randn(5, 2, C), torch.randn(66, 2, C), torch.randn(66, 2, C), attention_bias=bias)
    assert seen == [(0, False), (1, True)]


def test_decoder_return_intermediate_and_post_norm():
    dec = PETRTransformerDecoder(3, return_intermediate=False, embed_dims=C, num_heads=H, feedforward_channels=32)
    out = dec(torch.randn(5, 2, C), torch.randn(66, 2, C), torch.randn(66, 2, C))
    assert out.shape == (1, 5, 2, C)
    with pytest.raises(ValueError, match="unknown operations"):
        PETRTransformerDecoderLayer(C, H, 32, operation_order=("self_attn", "mlp"))


# ---- config entry point -------------------------------------------------------------------------------

def test_build_attention_bias():
    assert sb.build_attention_bias(None) is None
    assert sb.build_attention_bias(dict(enable=False, window_size=15)) is None
    gen = sb.build_attention_bias(dict(enable=True, window_size=15, bias_scale=1.0, use_local_bias=True, fp16=True,
                                       debug_mode=False))
    assert isinstance(gen, AttentionBiasGenerator) and gen.fp16 and gen.layout.num_keys == 56400
    small = sb.build_attention_bias(dict(enable=True, window_size=5, bev_feature_shape=(128, 128),
                                         pers_feature_shape=(6, 20, 50), debug_mode=True))
    assert small.layout.num_keys == 22384 and small.debug and small.window_size == (5, 5)
    with pytest.raises(ValueError, match=r"unknown keys \['windw_size'\]"):
        sb.build_attention_bias(dict(enable=True, windw_size=15))
    with pytest.raises(TypeError, match="must be a dict"):
        sb.build_attention_bias([("enable", True)])


def test_config_global_bias_matches_dense_reference():
    gen = sb.build_attention_bias(dict(enable=True, bias_scale=0.8, use_local_bias=False, fp16=False,
                                       bev_feature_shape=(6, 7), pers_feature_shape=(2, 3, 4)))
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double()
    bev_pos, cam_pos, lw, cw = scene()
    x, kv = torch.randn(5, 2, C, dtype=torch.float64), torch.randn(66, 2, C, dtype=torch.float64)
    bias = gen(lw, cw, bev_pos, cam_pos)
    assert isinstance(bias, sb.ModalityBias)
    close(mha(x, kv, kv, attention_bias=bias), mha(x, kv, kv, attention_bias=bias.to_dense().transpose(0, 1)))
