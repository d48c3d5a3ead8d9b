"""The keyword contract of the nn modules' ``forward``: a misspelt keyword is a ``TypeError``
naming it and the module, with a "did you mean"; the keywords the dense versions' decoders hand on
(`MMCV_IGNORED_KEYWORDS`) are accepted and change nothing."""
import copy
import pathlib
import re

import pytest
import torch
from helpers import random_positions

import sparse_bias as sb
from sparse_bias.nn import CmtTransformer, PETRTransformerDecoderLayer, SparseBiasMultiheadAttention
from sparse_bias.nn.attention import MMCV_IGNORED_KEYWORDS

LAYOUT = sb.KeyLayout(bev_shape=(6, 7), cam_shape=(2, 3, 4))        # 42 + 24 = 66 keys
C, H, Q, B = 16, 4, 5, 2
K = LAYOUT.num_keys

#: CMT's fusion config, decoder part (junjie18/CMT, cmt_voxel0075_vov_1600x640_cbgs.py), smaller widths.
CMT_DECODER = dict(
    type="PETRTransformerDecoder", return_intermediate=True, num_layers=2,
    transformerlayers=dict(
        type="PETRTransformerDecoderLayer", with_cp=False,
        attn_cfgs=[dict(type="MultiheadAttention", embed_dims=C, num_heads=H, dropout=0.1),
                   dict(type="PETRMultiheadFlashAttention", embed_dims=C, num_heads=H, dropout=0.1)],
        ffn_cfgs=dict(type="FFN", embed_dims=C, feedforward_channels=32, num_fcs=2, ffn_drop=0.,
                      act_cfg=dict(type="ReLU", inplace=True)),
        feedforward_channels=32,
        operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")))

#: typos users make and the keyword each was meant to be
TYPOS = [("attention_bais", "attention_bias"), ("attn_bias", "attention_bias"), ("bias", "attention_bias"),
         ("local_windows", "local_window")]


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Q, B, C, generator=gen, dtype=torch.float64)
    mem = torch.randn(K, B, C, generator=gen, dtype=torch.float64)
    pos = torch.randn(K, B, C, generator=gen, dtype=torch.float64)
    bias = torch.randn(Q, B, K, generator=gen, dtype=torch.float64)        # dense, the module's [Q, B, K]
    bev_pos, cam_pos = random_positions(LAYOUT, B, Q, 2, gen)
    win = sb.local_windows(LAYOUT, bev_pos, cam_pos, bev_window=3, cam_window=3)
    return x, mem, pos, bias, win


def mmcv_extras(x):
    """What Deformable-DETR-style decoders hand every attention through mmcv's ``BaseTransformerLayer``, and
    the ``reg_branch`` of CMT's / PETR's / MoME's transformers."""
    extras = dict(reg_branch=torch.nn.ModuleList([torch.nn.Linear(C, 10)]),
                  reference_points=torch.rand(B, Q, 3, dtype=x.dtype),
                  spatial_shapes=torch.tensor([[6, 7]]), level_start_index=torch.tensor([0]))
    assert set(extras) == set(MMCV_IGNORED_KEYWORDS)
    return extras


def value_for(keyword, bias, win):
    return win if "window" in keyword else bias


# ---- SparseBiasMultiheadAttention ------------------------------------------------------------------

@pytest.mark.parametrize("typo, meant", TYPOS)
def test_mha_typos_raise_with_the_suggestion(typo, meant):
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, mem, _, bias, win = inputs()
    # the keyword meant does change the output (so dropping the typo silently gave a wrong result) ...
    assert not torch.allclose(mha(x, mem, mem, **{meant: value_for(meant, bias, win)}), mha(x, mem, mem))
    # ... and the typo is an error naming the module, the keyword and the one meant
    with pytest.raises(TypeError, match=rf"SparseBiasMultiheadAttention\.forward\(\).*'{typo}' "
                                        rf"\(did you mean '{meant}'\?\)"):
        mha(x, mem, mem, **{typo: value_for(meant, bias, win)})


@pytest.mark.parametrize("typo, meant", [("attn_masks", "attn_mask"), ("attention_mask", "attn_mask"),
                                         ("key_padding", "key_padding_mask"), ("reg_branches", "reg_branch"),
                                         ("query_position", "query_pos")])
def test_mha_other_near_misses(typo, meant):
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, mem, *_ = inputs()
    with pytest.raises(TypeError, match=rf"'{typo}' \(did you mean '{meant}'\?\)"):
        mha(x, mem, mem, **{typo: None})


def test_mha_unknown_keyword_names_every_one_and_suggests_only_near_misses():
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, mem, *_ = inputs()
    # StreamPETR's layer *uses* temp_memory (it joins the self-attention keys): never silently dropped
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'temp_memory'; ") as err:
        mha(x, mem, mem, temp_memory=mem)
    assert "did you mean" not in str(err.value)
    with pytest.raises(TypeError, match=r"arguments 'foo', 'attn_bias' \(did you mean 'attention_bias'\?\)"):
        mha(x, mem, mem, foo=1, attn_bias=None, reg_branch=None)


@pytest.mark.parametrize("keyword", MMCV_IGNORED_KEYWORDS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_mha_accepted_mmcv_keywords_leave_the_output_unchanged(keyword, with_bias):
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, mem, pos, bias, _ = inputs()
    kwargs = dict(query_pos=torch.randn_like(x), key_pos=pos, key_padding_mask=torch.zeros(B, K, dtype=torch.float64),
                  attention_bias=bias if with_bias else None)
    ref = mha(x, mem, mem, **kwargs)
    assert torch.equal(mha(x, mem, mem, **kwargs, **{keyword: mmcv_extras(x)[keyword]}), ref)
    assert torch.equal(mha(x, mem, mem, **kwargs, **mmcv_extras(x)), ref)


def test_mha_mmcv_calling_convention_positional_identity_and_deprecated_residual():
    """mmcv's ``BaseTransformerLayer`` passes query, key, value, identity by position, the rest by name; mmcv's
    ``MultiheadAttention`` maps its deprecated ``residual`` to ``identity`` with a warning."""
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, mem, pos, bias, _ = inputs()
    identity = torch.randn_like(x)
    ref = mha(x, mem, mem, identity, query_pos=x, key_pos=pos, attn_mask=None, key_padding_mask=None,
              attention_bias=bias)
    with pytest.warns(DeprecationWarning, match="'residual' is deprecated.*'identity'"):
        out = mha(x, mem, mem, residual=identity, query_pos=x, key_pos=pos, attention_bias=bias, **mmcv_extras(x))
    assert torch.equal(out, ref)
    with pytest.raises(TypeError, match="both 'residual' and 'identity'"):
        mha(x, mem, mem, identity, residual=identity)


def test_mha_keyword_check_under_local_window():
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).double().eval()
    x, mem, _, _, win = inputs()
    ref = mha(x, mem, mem, local_window=win)
    assert torch.equal(mha(x, mem, mem, local_window=win, **mmcv_extras(x)), ref)
    with pytest.raises(TypeError, match="did you mean 'local_window'"):
        mha(x, mem, mem, window=win)


# ---- PETRTransformerDecoderLayer / PETRTransformerDecoder / CmtTransformer --------------------------------

def cmt_decoder():
    torch.manual_seed(0)
    return CmtTransformer(decoder=copy.deepcopy(CMT_DECODER)).double().eval().decoder


@pytest.mark.parametrize("typo, meant", TYPOS + [("attn_mask", "attn_masks"), ("key_padding", "key_padding_mask")])
def test_layer_and_decoder_typos_raise_with_the_suggestion(typo, meant):
    decoder = cmt_decoder()
    layer = decoder.layers[0]
    x, mem, pos, bias, win = inputs()
    value = value_for(meant, bias, win)
    with pytest.raises(TypeError, match=rf"PETRTransformerDecoderLayer\.forward\(\).*'{typo}' "
                                        rf"\(did you mean '{meant}'\?\)"):
        layer(torch.zeros_like(x), mem, mem, query_pos=x, key_pos=pos, **{typo: value})
    with pytest.raises(TypeError, match=rf"PETRTransformerDecoder\.forward\(\).*'{typo}' "
                                        rf"\(did you mean '{meant}'\?\)"):
        decoder(torch.zeros_like(x), mem, mem, query_pos=x, key_pos=pos, **{typo: value})


def test_layer_rejects_streampetr_temporal_memory():
    """StreamPETR's decoder layer concatenates ``temp_memory`` / ``temp_pos`` into the self-attention keys; this
    layer does not, so they are an error rather than silently dropped."""
    decoder = cmt_decoder()
    x, mem, pos, *_ = inputs()
    with pytest.raises(TypeError, match="'temp_memory', 'temp_pos'"):
        decoder(torch.zeros_like(x), mem, mem, query_pos=x, key_pos=pos, temp_memory=x, temp_pos=x)
    with pytest.raises(TypeError, match="PETRTransformerDecoderLayer.*'temp_memory'"):
        decoder.layers[0](torch.zeros_like(x), mem, mem, query_pos=x, key_pos=pos, temp_memory=x)


@pytest.mark.parametrize("with_bias", [False, True])
def test_cmt_decoder_call_convention_and_mmcv_keywords(with_bias):
    """CMT's ``CmtTransformer`` calls its decoder by name with ``key_padding_mask=memory.new_zeros(bs, K)``,
    ``attn_masks=[attn_masks, None]`` and ``reg_branch``; the extra keywords change nothing."""
    decoder = cmt_decoder()
    x, mem, pos, bias, _ = inputs()
    dn_mask = torch.zeros(Q, Q, dtype=torch.bool)
    dn_mask[0, 1:] = True
    kwargs = dict(query=torch.zeros_like(x), key=mem, value=mem, key_pos=pos, query_pos=x,
                  key_padding_mask=mem.new_zeros(B, K), attn_masks=[dn_mask, None])
    if with_bias:
        kwargs["attention_bias"] = bias.transpose(0, 1)                # [B, Q, K] at the decoder level
    ref = decoder(**kwargs)
    assert ref.shape == (2, Q, B, C)
    assert torch.equal(decoder(**kwargs, reg_branch=None), ref)
    assert torch.equal(decoder(**kwargs, **mmcv_extras(x)), ref)
    layer_kwargs = dict(kwargs, attention_bias=bias if with_bias else None)   # [Q, B, K] at the layer level
    ref_layer = decoder.layers[0](**layer_kwargs)
    assert torch.equal(decoder.layers[0](**layer_kwargs, **mmcv_extras(x)), ref_layer)
    if with_bias:
        assert not torch.allclose(ref, decoder(**dict(kwargs, attention_bias=None)))


def test_layer_with_checkpointing_checks_keywords_in_training():
    """CMT's layers train with ``with_cp=True``: the check runs before the checkpointed forward."""
    cfg = copy.deepcopy(CMT_DECODER["transformerlayers"])
    cfg.pop("type")
    cfg["with_cp"] = True
    layer = PETRTransformerDecoderLayer(**cfg).double().train()
    x, mem, pos, bias, _ = inputs()
    out = layer(torch.zeros_like(x), mem, mem, query_pos=x.requires_grad_(), key_pos=pos, attention_bias=bias,
                reg_branch=None)
    out.sum().backward()
    with pytest.raises(TypeError, match="did you mean 'attention_bias'"):
        layer(torch.zeros_like(x), mem, mem, query_pos=x, key_pos=pos, attention_bais=bias)


def test_cmt_transformer_takes_reg_branch_and_rejects_typos():
    torch.manual_seed(0)
    model = CmtTransformer(embed_dims=C, num_heads=H, num_layers=1, feedforward_channels=32).double().eval()
    x = torch.randn(B, C, 6, 7, dtype=torch.float64)
    x_img = torch.randn(B * 2, C, 3, 4, dtype=torch.float64)
    query = torch.randn(B, Q, C, dtype=torch.float64)
    bev_pos, rv_pos = torch.randn(42, C, dtype=torch.float64), torch.randn(B * 2, 3, 4, C, dtype=torch.float64)
    out, _ = model(x, x_img, query, bev_pos, rv_pos)
    assert torch.equal(model(x, x_img, query, bev_pos, rv_pos, reg_branch=torch.nn.Linear(C, 10))[0], out)
    with pytest.raises(TypeError, match="attention_bais"):
        model(x, x_img, query, bev_pos, rv_pos, attention_bais=torch.zeros(B, Q, K, dtype=torch.float64))


def test_docs_list_the_accepted_keywords():
    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "modules.md").read_text()
    section = re.search(r"\*\*Keywords\.\*\*(.*?)\n## ", text, re.S)
    assert section, "docs/modules.md: the keyword contract paragraph (**Keywords.**) is missing"
    for name in MMCV_IGNORED_KEYWORDS:
        assert f"`{name}`" in section.group(1), name
