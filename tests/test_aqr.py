"""Local attention mask through the modules, the AQR weight generator and the head integration."""
import pytest
import torch
from helpers import random_positions

import sparse_bias as sb
from sparse_bias.nn import (AQRAttentionBias, AQRWeightGenerator, CmtTransformer, PETRTransformerDecoderLayer,
                            SparseBiasMultiheadAttention)
from sparse_bias.tools.synthetic import synthetic_cameras

LAYOUT = sb.KeyLayout(bev_shape=(9, 10), cam_shape=(3, 6, 8))        # 90 + 144 = 234 keys
C, H = 16, 4


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def dense_lam(win, heads):
    """The dense version's mask: bool [B * heads, Q, K], True = blocked."""
    blocked = ~win.to_dense_mask()
    return blocked.unsqueeze(1).expand(-1, heads, -1, -1).reshape(-1, *blocked.shape[1:])


def mome_lam(layout, bev_pos, cam_pos, cam_window, bev_window):
    """MoME's local attention mask from its documented construction, [B, Q, K] bool (True = attend).

    Camera: flat index ``view * Hc * Wc + r * Wc + c`` plus ``dy * Wc + dx`` for ``|dy|, |dx| <= w // 2``,
    kept where the index's row and column (modulo the view) stay within ``w // 2`` of the query's; BEV: flat
    index ``r * W + c`` plus offsets, kept inside ``[0, H * W)`` with the column within ``w // 2``. A point no
    camera sees was given view 0, cell (0, 0).
    """
    (hb, wb), (nv, hc, wc) = layout.bev_shape, layout.cam_shape
    bsz, nq = bev_pos.shape[:2]
    out = torch.zeros(bsz, nq, layout.num_keys, dtype=torch.bool)
    for b in range(bsz):
        for q in range(nq):
            view, r, c = (int(x) for x in cam_pos[b, q])
            if view < 0:
                view, r, c = 0, 0, 0
            base, h = view * hc * wc + r * wc + c, cam_window // 2
            for dy in range(-h, h + 1):
                for dx in range(-h, h + 1):
                    idx = base + dy * wc + dx
                    if abs((idx % (hc * wc)) // wc - r) <= h and abs(idx % wc - c) <= h:
                        out[b, q, hb * wb + min(max(idx, 0), nv * hc * wc - 1)] = True
            r, c = (int(x) for x in bev_pos[b, q])
            base, h = r * wb + c, bev_window // 2
            for dy in range(-h, h + 1):
                for dx in range(-h, h + 1):
                    idx = base + dy * wb + dx
                    if 0 <= idx < hb * wb and abs(idx % wb - c) <= h:
                        out[b, q, idx] = True
    return out


def positions(batch=2, queries=6, seed=0, slots=1):
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(LAYOUT, batch, queries, slots, gen, p_missing=0.0)
    cam_pos[0, 1] = -1                                                  # a point no camera sees
    return bev_pos, cam_pos


def memory_inputs(batch=2, queries=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    nk = LAYOUT.num_keys
    return (torch.randn(queries, batch, C, generator=gen, dtype=dtype), torch.randn(nk, batch, C, generator=gen,
            dtype=dtype), torch.randn(nk, batch, C, generator=gen, dtype=dtype))


# ---- the module with a local attention mask ---------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_local_window_equals_the_dense_mask(batch_first, with_bias):
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H, batch_first=batch_first).double().eval()
    bev_pos, cam_pos = positions()
    win = sb.local_windows(LAYOUT, bev_pos, cam_pos, bev_window=5, cam_window=3)
    query, key, kpos = memory_inputs()
    qpos = torch.randn_like(query)
    values = torch.randn(win.nnz, dtype=torch.float64, requires_grad=True)
    bias = sb.SparseBias(win, values) if with_bias else None
    kpm = torch.zeros(2, LAYOUT.num_keys, dtype=torch.bool)
    kpm[1, 100:120] = True
    t = (lambda x: x.transpose(0, 1)) if batch_first else (lambda x: x)
    args = (t(query), t(key), t(key))
    kwargs = dict(query_pos=t(qpos), key_pos=t(kpos), key_padding_mask=kpm)
    out = mha(*args, local_window=win, attention_bias=bias, **kwargs)
    # the dense version: the bool LAM plus the dense bias in the module's layout
    dense = None if bias is None else (bias.to_dense() if batch_first else bias.to_dense().transpose(0, 1))
    ref = mha(*args, attn_mask=dense_lam(win, H), attention_bias=dense, **kwargs)
    close(out, ref)
    params = [values] + list(mha.parameters()) if with_bias else list(mha.parameters())
    g_out = torch.autograd.grad(out.square().sum(), params)
    g_ref = torch.autograd.grad(ref.square().sum(), params)
    for a, b in zip(g_out, g_ref):
        close(a, b)
    # a WindowIndex given as attn_mask is the local window (attn_masks=[win] in a decoder layer)
    close(mha(*args, attn_mask=win, attention_bias=bias, **kwargs), out)


def test_decoder_layer_takes_the_window_index_as_its_mask():
    torch.manual_seed(0)
    layer = PETRTransformerDecoderLayer(C, H, 32, operation_order=("cross_attn", "norm", "ffn", "norm")).double().eval()
    win = sb.local_windows(LAYOUT, *positions(), bev_window=5, cam_window=3)
    query, key, kpos = memory_inputs()
    target = torch.zeros_like(query)
    out = layer(target, key, key, query_pos=query, key_pos=kpos, attn_masks=[win])
    close(out, layer(target, key, key, query_pos=query, key_pos=kpos, local_window=win))
    close(out, layer(target, key, key, query_pos=query, key_pos=kpos, attn_masks=[dense_lam(win, H)]))


def test_mha_local_window_errors():
    mha = SparseBiasMultiheadAttention(C, H)
    win = sb.local_windows(LAYOUT, *positions(), bev_window=5, cam_window=3)
    query, key, _ = memory_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="attn_mask and local_window were both given"):
        mha(query, key, key, attn_mask=dense_lam(win, H), local_window=win)
    with pytest.raises(TypeError, match="attention_bias must be a SparseBias"):
        mha(query, key, key, local_window=win, attention_bias=torch.zeros(2, 6, LAYOUT.num_keys))


# ---- the LAM is a WindowIndex ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_window_index_from_mome_projection_is_mome_lam(seed):
    bev_pos, cam_pos = positions(seed=seed, queries=12)
    bev_pos[1, 0] = torch.tensor([0, 0])                                # corners and edges
    bev_pos[1, 1] = torch.tensor([8, 9])
    cam_pos[1, 2] = torch.tensor([[2, 5, 7]])
    aqr = AQRWeightGenerator(C, layout=LAYOUT, window_sizes=[5, 3])
    win = aqr.local_window(bev_pos, cam_pos)
    want = mome_lam(LAYOUT, bev_pos, cam_pos[:, :, 0], cam_window=5, bev_window=3)
    assert torch.equal(win.to_dense_mask(), want)


def test_unseen_points_none_mode_has_no_camera_window():
    bev_pos, cam_pos = positions()
    win = AQRWeightGenerator(C, layout=LAYOUT, unseen_camera="none").local_window(bev_pos, cam_pos)
    assert not win.to_dense_mask()[0, 1, LAYOUT.num_bev_keys:].any()
    win = AQRWeightGenerator(C, layout=LAYOUT).local_window(bev_pos, cam_pos)
    assert win.to_dense_mask()[0, 1, LAYOUT.num_bev_keys].item()       # view 0, cell (0, 0)


# ---- AQRWeightGenerator -------------------------------------------------------------------------------

CMTTEST_KEYS = {
    "encoder.layers.0.attentions.0.attn.in_proj_weight", "encoder.layers.0.attentions.0.attn.in_proj_bias",
    "encoder.layers.0.attentions.0.attn.out_proj.weight", "encoder.layers.0.attentions.0.attn.out_proj.bias",
    "encoder.layers.0.norms.0.weight", "encoder.layers.0.norms.0.bias",
    "encoder.layers.0.norms.1.weight", "encoder.layers.0.norms.1.bias",
    "encoder.layers.0.ffns.0.layers.0.0.weight", "encoder.layers.0.ffns.0.layers.0.0.bias",
    "encoder.layers.0.ffns.0.layers.1.weight", "encoder.layers.0.ffns.0.layers.1.bias",
    "encoder.post_norm.weight", "encoder.post_norm.bias",
    "weight_predictor.weight", "weight_predictor.bias", "bev_type_embed", "rv_type_embed",
}


def test_aqr_state_dict_has_the_dense_versions_names_and_loads_strictly():
    aqr = AQRWeightGenerator(256, layout=LAYOUT)
    assert set(aqr.state_dict()) == CMTTEST_KEYS
    shapes = {"in_proj_weight": (768, 256), "in_proj_bias": (768,), "out_proj.weight": (256, 256),
              "layers.0.0.weight": (1024, 256), "layers.0.0.bias": (1024,), "layers.1.weight": (256, 1024),
              "weight_predictor.weight": (2, 256), "weight_predictor.bias": (2,)}
    ckpt = {}
    for name in CMTTEST_KEYS:
        shape = next((s for suffix, s in shapes.items() if name.endswith(suffix)), (256,))
        ckpt[name] = torch.randn(shape)
    aqr.load_state_dict(ckpt, strict=True)
    assert torch.equal(aqr.weight_predictor.bias, ckpt["weight_predictor.bias"])


def test_aqr_init():
    aqr = AQRWeightGenerator(C, layout=LAYOUT)
    assert torch.equal(aqr.weight_predictor.bias, torch.full((2,), 1.5))
    assert aqr.encoder.layers[0].attentions[0].num_heads == 4
    assert "bev_type_embed" not in dict(AQRWeightGenerator(C, layout=LAYOUT, use_type_embed=False).named_parameters())


@pytest.mark.parametrize("type_embed", ["keys", "queries", "unused"])
def test_aqr_window_attention_equals_the_dense_lam(type_embed):
    torch.manual_seed(0)
    aqr = AQRWeightGenerator(C, layout=LAYOUT, type_embed=type_embed, window_sizes=[5, 3]).double().eval()
    query, memory, pos = memory_inputs()
    bev_pos, cam_pos = positions()
    got = aqr(query, memory, pos, bev_pos=bev_pos, cam_pos=cam_pos)
    want = aqr(query, memory, pos, bev_pos=bev_pos, cam_pos=cam_pos, dense_mask=True)
    for a, b in zip(got[:2], want[:2]):
        close(a, b)
        assert a.shape == (2, 6) and a.abs().max() <= 1
    params = [p for p in aqr.parameters()]
    loss = lambda out: (out.lidar_weights.square() + out.camera_weights).sum()        # noqa: E731
    g_got = torch.autograd.grad(loss(got), params, allow_unused=True)
    g_want = torch.autograd.grad(loss(want), params, allow_unused=True)
    for (name, _), a, b in zip(aqr.named_parameters(), g_got, g_want):
        if type_embed == "unused" and name.endswith("type_embed"):
            assert a is None and b is None
            continue
        assert a is not None and a.abs().sum() > 0, f"no gradient reaches {name}"
        close(a, b)


def test_aqr_projects_with_cameras_and_batch_first():
    torch.manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(12, 12), cam_shape=(6, 4, 10))
    aqr = AQRWeightGenerator(C, layout=layout, batch_first=True).eval()
    lidar2img = synthetic_cameras(2, img_shape=(64, 160))
    ref = torch.rand(2, 7, 3)
    query, memory, pos = torch.randn(2, 7, C), torch.randn(2, layout.num_keys, C), torch.randn(2, layout.num_keys, C)
    out = aqr(query, memory, pos, ref, lidar2img, (64, 160))
    bev_pos, cam_pos = sb.project_points(ref, aqr.pc_range, layout, lidar2img, (64, 160), max_views=1)
    assert torch.equal(out.projection.bev_pos, bev_pos) and torch.equal(out.projection.cam_pos, cam_pos)
    assert out.lidar_weights.shape == (2, 7)
    again = aqr(query, memory, pos, bev_pos=bev_pos, cam_pos=cam_pos)
    close(again.lidar_weights, out.lidar_weights, 0)


def test_aqr_bad_inputs():
    aqr = AQRWeightGenerator(C, layout=LAYOUT)
    query, memory, pos = memory_inputs(dtype=torch.float32)
    bev_pos, cam_pos = positions()
    with pytest.raises(ValueError, match="memory has 200 keys but the layout has 234"):
        aqr(query, memory[:200], pos[:200], bev_pos=bev_pos, cam_pos=cam_pos)
    with pytest.raises(ValueError, match=r"query_embed must be \[N, B, C\]"):
        aqr(query[:, :1], memory, pos, bev_pos=bev_pos, cam_pos=cam_pos)
    with pytest.raises(ValueError, match=r"the projection is for \[B, Q\] = \[2, 6\]"):
        aqr(query[:4], memory, pos, bev_pos=bev_pos, cam_pos=cam_pos)
    with pytest.raises(ValueError, match="needs ref_points"):
        aqr(query, memory, pos)
    with pytest.raises(ValueError, match=r"window_sizes\[1\] \(bev\) must be an odd"):
        AQRWeightGenerator(C, window_sizes=[15, 4])
    with pytest.raises(ValueError, match="type_embed must be one of"):
        AQRWeightGenerator(C, type_embed="memory")


# ---- one call from a detection head ------------------------------------------------------------------

def test_head_projects_once_and_feeds_the_transformer():
    torch.manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(12, 12), cam_shape=(6, 4, 10))
    head = AQRAttentionBias(dict(window_size=5, bias_scale=2.0, bev_feature_shape=(12, 12),
                                 pers_feature_shape=(6, 4, 10)), dict(embed_dims=C, window_sizes=[3, 3]))
    transformer = CmtTransformer(C, num_heads=H, num_layers=2, feedforward_channels=32)
    bsz, nq = 2, 7
    x, x_img = torch.randn(bsz, C, 12, 12), torch.randn(bsz * 6, C, 4, 10)
    bev_pe, rv_pe = torch.randn(144, C), torch.randn(bsz * 6, 4, 10, C)
    query_embed, ref = torch.randn(bsz, nq, C), torch.rand(bsz, nq, 3)
    lidar2img = synthetic_cameras(bsz, img_shape=(64, 160))
    memory, pos = CmtTransformer.flatten_memory(x, x_img, bev_pe, rv_pe, bsz)
    bias, aqr = head(query_embed.transpose(0, 1), memory, pos, ref, lidar2img, (64, 160), return_weights=True)
    assert isinstance(bias, sb.SparseBias) and bias.shape == (bsz, nq, layout.num_keys)
    win = sb.local_windows(layout, aqr.projection.bev_pos, aqr.projection.cam_pos, 5, 5)
    want = sb.window_bias(win, aqr.lidar_weights, aqr.camera_weights, scale=2.0)
    close(bias.to_dense(), want.to_dense(), 1e-6)
    out, _ = transformer(x, x_img, query_embed, bev_pe, rv_pe, attention_bias=bias)
    out.sum().backward()
    assert head.aqr.weight_predictor.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="disabled"):
        AQRAttentionBias(dict(enable=False))


def test_aqr_takes_cmttests_img_metas():
    torch.manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(12, 12), cam_shape=(6, 4, 10))
    aqr = AQRWeightGenerator(C, layout=layout).eval()
    lidar2img = synthetic_cameras(2, img_shape=(64, 160))
    img_metas = [dict(lidar2img=[m.numpy() for m in lidar2img[b]], img_shape=[(64, 160, 3)] * 6) for b in range(2)]
    query, memory, pos = torch.randn(7, 2, C), torch.randn(layout.num_keys, 2, C), torch.randn(layout.num_keys, 2, C)
    ref = torch.rand(2, 7, 3)
    want = aqr(query, memory, pos, ref, lidar2img, (64, 160))
    got = aqr(query, memory, pos, ref, img_metas)
    close(got.lidar_weights, want.lidar_weights, 0)
    assert torch.equal(got.projection.cam_pos, want.projection.cam_pos)
    with pytest.raises(TypeError, match="img_metas"):
        aqr(query, memory, pos, ref, [dict(lidar2img=None)])


@pytest.mark.parametrize("type_embed", ["keys", "queries"])
def test_aqr_weights_for_a_built_index_equal_the_dense_lam(type_embed):
    """`AQRWeightGenerator.weights` (the compilable part: an index built already) against the dense-LAM forward,
    outputs and gradients (parameters, queries, memory), with key padding."""
    torch.manual_seed(0)
    aqr = AQRWeightGenerator(C, layout=LAYOUT, type_embed=type_embed, window_sizes=[5, 3]).double().eval()
    query, memory, pos = (t.requires_grad_() for t in memory_inputs())
    bev_pos, cam_pos = positions()
    kpm = torch.zeros(2, LAYOUT.num_keys, dtype=torch.bool)
    kpm[1, -5:] = True
    want = aqr(query, memory, pos, bev_pos=bev_pos, cam_pos=cam_pos, key_padding_mask=kpm, dense_mask=True)
    got = aqr.weights(query, memory, pos, want.projection.local_window, key_padding_mask=kpm)
    leaves = [query, memory] + list(aqr.parameters())
    for a, b in zip(got, want[:2]):
        close(a, b)
    g_got = torch.autograd.grad(sum(w.square().sum() for w in got), leaves, allow_unused=True)
    g_want = torch.autograd.grad(sum(w.square().sum() for w in want[:2]), leaves, allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b)
