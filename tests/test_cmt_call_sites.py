"""CMT's / CMTTEST's decoder call sites (tests/cmt_call_sites.py) with the dense bias and with a `SparseBias`: the
same outputs and gradients, and `SparseBias.transpose` -- the call CMTTEST's transformer makes on the bias."""
import copy

import pytest
import torch
from cmt_call_sites import cmttest_decoder, cmttest_layer, cmttest_petr_attention, cmttest_transformer

import sparse_bias as sb
from sparse_bias.nn import SparseBiasMultiheadAttention

BEV, PERS = (4, 5), (2, 3, 4)                  # 20 BEV keys + 24 camera keys
B, Q, C, H = 2, 6, 16, 4

#: CMT's fusion config (cmt_voxel0075_vov_1600x640_cbgs.py), transformer part, narrower, no dropout
DECODER = dict(
    type="PETRTransformerDecoder", return_intermediate=True, num_layers=2,
    transformerlayers=dict(
        type="PETRTransformerDecoderLayer", with_cp=False,
        attn_cfgs=[dict(type="MultiheadAttention", embed_dims=C, num_heads=H, attn_drop=0.0),
                   dict(type="PETRMultiheadFlashAttention", embed_dims=C, num_heads=H, attn_drop=0.0)],
        ffn_cfgs=dict(type="FFN", embed_dims=C, feedforward_channels=32, num_fcs=2, ffn_drop=0.0,
                      act_cfg=dict(type="ReLU", inplace=True)),
        feedforward_channels=32, operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")))

#: CMTTEST's generator config keys (cmt_aqr_*.py), small feature maps
GENERATOR = dict(type="AttentionBiasGenerator", bev_feature_shape=BEV, pers_feature_shape=PERS, window_size=3,
                 bias_scale=2.0, learnable_scale=True, min_scale=0.5, max_scale=5.0, use_local_bias=True, fp16=False)


def scene(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)   # noqa: E731
    inputs = dict(x=r(B, C, *BEV), x_img=r(B * PERS[0], C, *PERS[1:]), query_embed=r(B, Q, C),
                  bev_pos_embed=r(BEV[0] * BEV[1], C), rv_pos_embed=r(B * PERS[0], *PERS[1:], C))
    weights = dict(lidar_weights=torch.rand(B, Q, generator=gen, dtype=torch.float64) * 4 - 2,
                   camera_weights=torch.rand(B, Q, generator=gen, dtype=torch.float64) * 4 - 2)
    positions = (torch.randint(0, BEV[0] * BEV[1], (B, Q), generator=gen),
                 torch.stack([torch.randint(0, n, (B, Q), generator=gen) for n in PERS], -1))
    blocked = torch.rand(Q, Q, generator=gen) < 0.3          # a denoising-style self-attention mask, True = blocked
    blocked.fill_diagonal_(False)
    return inputs, weights, positions, blocked


def models():
    torch.manual_seed(0)
    transformer = sb.nn.CmtTransformer(decoder=copy.deepcopy(DECODER)).double().eval()
    generator = sb.build_attention_bias(GENERATOR).double()
    return transformer, generator


def run(route, bias_kind, seed=0):
    """Output and gradients (inputs, bias weights, the generator's learnable scale, the transformer's parameters)
    of one route: ``cmttest`` (CMTTEST's call sites over this library's attention), ``reference`` (CMTTEST's
    call sites with its dense PETRMultiheadAttention computation) or ``library`` (sb.nn.CmtTransformer)."""
    transformer, generator = models()
    inputs, weights, (pts_bev, pts_pers), blocked = scene(seed)
    leaves = {k: v.clone().requires_grad_() for k, v in {**inputs, **weights}.items()}
    bias = generator(leaves["lidar_weights"], leaves["camera_weights"], pts_bev, pts_pers)
    if bias_kind == "dense":
        bias = bias.to_dense()
    args = [leaves[k] for k in inputs]
    if route == "library":
        out, memory = transformer(*args, attn_masks=blocked, attention_bias=bias)
    else:
        attention = None
        if route == "reference":
            def attention(i, module, q, k, v, **kw):
                return cmttest_petr_attention(module, q, k, v, **kw)
        layers = [cmttest_layer(layer, layer.operation_order, attention) for layer in transformer.decoder.layers]

        def decoder(query, **kw):
            return cmttest_decoder(layers, transformer.decoder.post_norm, query, **kw)
        out, memory = cmttest_transformer(decoder, *args, attn_masks=blocked, attention_bias=bias)
    assert out.shape == (2, B, Q, C)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = [generator.bias_scale] + list(transformer.parameters())
    grads = torch.autograd.grad((out * g).sum(), list(leaves.values()) + params)
    return [out] + list(grads)


@pytest.mark.parametrize("route,bias_kind", [("cmttest", "sparse"), ("cmttest", "dense"), ("library", "sparse"),
                                             ("library", "dense")])
def test_call_sites_give_the_dense_versions_outputs_and_gradients(route, bias_kind):
    want = run("reference", "dense")
    got = run(route, bias_kind)
    names = ["out", "x", "x_img", "query_embed", "bev_pos_embed", "rv_pos_embed", "lidar_weights", "camera_weights",
             "bias_scale"]
    for i, (a, b) in enumerate(zip(got, want)):
        name = names[i] if i < len(names) else f"parameter {i - len(names)}"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    assert want[6].abs().sum() > 0 and want[8].abs() > 0          # the bias reaches the output


def test_the_bias_matters_at_the_call_sites():
    """Guard: without the bias the reference differs (the comparison above is not vacuous)."""
    transformer, _ = models()
    inputs, _, _, blocked = scene()
    layers = [cmttest_layer(layer, layer.operation_order) for layer in transformer.decoder.layers]
    with torch.no_grad():
        plain, _ = cmttest_transformer(lambda query, **kw: cmttest_decoder(layers, transformer.decoder.post_norm,
                                                                           query, **kw),
                                       *inputs.values(), attn_masks=blocked)
    assert not torch.allclose(plain, run("reference", "dense")[0])


# ---- SparseBias.transpose -----------------------------------------------------------------------------------

def a_bias(heads=None, dtype=torch.float64):
    layout = sb.KeyLayout(bev_shape=BEV, cam_shape=PERS)
    gen = torch.Generator().manual_seed(3)
    bev = torch.stack([torch.randint(0, BEV[0], (B, Q), generator=gen), torch.randint(0, BEV[1], (B, Q), generator=gen)], -1)
    cam = torch.stack([torch.randint(0, n, (B, Q), generator=gen) for n in PERS], -1)
    win = sb.local_windows(layout, bev, cam, 3, 3)
    tail = () if heads is None else (heads,)
    lw = torch.rand((B, Q) + tail, generator=gen, dtype=dtype).requires_grad_()
    cw = torch.rand((B, Q) + tail, generator=gen, dtype=dtype).requires_grad_()
    return sb.window_bias(win, lw, cw), (lw, cw)


@pytest.mark.parametrize("heads", [None, 2])
def test_transpose_is_a_sequence_first_view_and_twice_batch_first(heads):
    bias, _ = a_bias(heads)
    view = bias.transpose(0, 1)
    assert view.seq_first and not bias.seq_first                    # the original is untouched
    assert view.values is bias.values and view.index is bias.index  # no copy
    dense = bias.to_dense()
    assert view.shape == dense.transpose(0, 1).shape
    torch.testing.assert_close(view.to_dense(), dense.transpose(0, 1), rtol=0, atol=0)
    for again in (view.transpose(0, 1), view.transpose(1, 0), view.transpose(-len(bias.shape), 1 - len(bias.shape))):
        assert not again.seq_first and again.shape == bias.shape and again.values is bias.values
    assert view.to(torch.float32).seq_first and view.detach().seq_first and view.cpu().seq_first
    assert "seq_first" in repr(view) and "seq_first" not in repr(bias)


def test_transpose_of_other_dims_is_an_error_naming_them():
    bias, _ = a_bias()
    for dims in [(1, 2), (0, 2), (0, 0), (-1, 0)]:
        with pytest.raises(ValueError, match=rf"SparseBias.transpose\({dims[0]}, {dims[1]}\): only dims 0 and 1"):
            bias.transpose(*dims)


def test_modality_bias_transposes_too():
    layout = sb.KeyLayout(bev_shape=BEV, cam_shape=PERS)
    bias = sb.ModalityBias(layout, torch.randn(B, Q, 2, dtype=torch.float64))
    view = bias.transpose(0, 1)
    torch.testing.assert_close(view.to_dense(), bias.to_dense().transpose(0, 1), rtol=0, atol=0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    q, kv = torch.randn(Q, B, C, dtype=torch.float64), torch.randn(layout.num_keys, B, C, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(mha(q, kv, kv, attention_bias=view), mha(q, kv, kv, attention_bias=bias))


@pytest.mark.parametrize("heads", [None, H])
def test_attention_takes_the_view_as_it_takes_the_dense_bias_sequence_first(heads):
    """As test_dense_bias_in_the_modules_sequence_layout: [Q, B, K] at a sequence-first attention."""
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    bias, (lw, cw) = a_bias(heads)
    q = torch.randn(Q, B, C, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(bias.shape[-1], B, C, dtype=torch.float64, requires_grad=True)
    outs = []
    for b in (bias.transpose(0, 1), bias, bias.to_dense().transpose(0, 1) if heads is None else bias.to_dense()):
        out = mha(q, kv, kv, attention_bias=b)
        outs.append([out] + list(torch.autograd.grad(out.square().sum(), [q, kv, lw, cw], retain_graph=True)))
    for got in outs[:2]:
        for a, w in zip(got, outs[2]):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-10)


def test_batch_first_attention_refuses_the_sequence_first_view():
    mha = SparseBiasMultiheadAttention(C, H, batch_first=True).double().eval()
    bias, _ = a_bias()
    q, kv = torch.randn(B, Q, C, dtype=torch.float64), torch.randn(B, bias.shape[-1], C, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sequence-first view .* batch_first=True: pass the bias untransposed"):
        mha(q, kv, kv, attention_bias=bias.transpose(0, 1))
    mha(q, kv, kv, attention_bias=bias)


def test_self_attention_built_by_mmcvs_layer_ignores_the_cross_attentions_bias():
    """mmcv's BaseTransformerLayer hands attention_bias to every attention and sets operation_name on each."""
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    bias, _ = a_bias()
    q = torch.randn(Q, B, C, dtype=torch.float64)
    mha.operation_name = "self_attn"
    with torch.no_grad():
        torch.testing.assert_close(mha(q, q, q, attention_bias=bias.transpose(0, 1)), mha(q, q, q), rtol=0, atol=0)
        torch.testing.assert_close(mha(q, q, q, attention_bias=bias.to_dense().transpose(0, 1)), mha(q, q, q))
    mha.operation_name = "cross_attn"
    with pytest.raises(ValueError):
        mha(q, q, q, attention_bias=bias)            # 44 keys of the bias against 6 here: not silently dropped


def test_functional_ops_refuse_the_sequence_first_view():
    """The functional ops take q [B, H, Q, D]: a sequence-first bias there is an error, never read batch-first."""
    bias, _ = a_bias()
    win = bias.index
    q = torch.randn(B, H, Q, 8, dtype=torch.float64)
    k = torch.randn(B, H, win.layout.num_keys, 8, dtype=torch.float64)
    view = bias.transpose(0, 1)
    with pytest.raises(ValueError, match=r"bias is the sequence-first view .* pass bias.transpose\(0, 1\)"):
        sb.sparse_bias_attention(q, k, k, view)
    with pytest.raises(ValueError, match=r"bias is the sequence-first view"):
        sb.window_attention(q, k, k, win, view)
    modality = sb.ModalityBias(win.layout, torch.randn(B, Q, 2, dtype=torch.float64)).transpose(0, 1)
    with pytest.raises(ValueError, match=r"bias is the sequence-first view"):
        sb.sparse_bias_attention(q, k, k, modality)
