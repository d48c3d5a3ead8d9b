"""Registries: nothing at import, the plugin's own names, the dense names on request; configs of the dense
versions build this library's modules unchanged."""
import copy

import pytest
import torch
from helpers import run_python

import sparse_bias as sb
from sparse_bias.nn import (AQRWeightGenerator, AttentionBiasGenerator, CmtTransformer, PETRTransformerDecoder,
                            PETRTransformerDecoderLayer, SparseBiasMultiheadAttention, register_modules)

mmengine_registry = pytest.importorskip("mmengine.registry", reason="mmengine is a dev extra")

OWN = {"SparseBiasMultiheadAttention", "SparseBiasPETRTransformerDecoderLayer", "SparseBiasPETRTransformerDecoder",
       "SparseBiasCmtTransformer", "SparseBiasAttentionBiasGenerator", "SparseBiasAQRWeightGenerator"}
DENSE = {"PETRMultiheadAttention", "PETRMultiheadFlashAttention", "PETRTransformerDecoderLayer",
         "PETRTransformerDecoder", "CmtTransformer", "AttentionBiasGenerator", "AQRWeightGenerator"}

#: CMT's fusion config, transformer part (junjie18/CMT, cmt_voxel0075_vov_1600x640_cbgs.py), smaller widths.
CMT_TRANSFORMER = dict(
    type="CmtTransformer",
    decoder=dict(
        type="PETRTransformerDecoder", return_intermediate=True, num_layers=2,
        transformerlayers=dict(
            type="PETRTransformerDecoderLayer", with_cp=False,
            attn_cfgs=[dict(type="MultiheadAttention", embed_dims=32, num_heads=4, dropout=0.1),
                       dict(type="PETRMultiheadFlashAttention", embed_dims=32, num_heads=4, dropout=0.1)],
            ffn_cfgs=dict(type="FFN", embed_dims=32, feedforward_channels=64, num_fcs=2, ffn_drop=0.,
                          act_cfg=dict(type="ReLU", inplace=True)),
            feedforward_channels=64,
            operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm"))))

#: CMTTEST's AQR config (CMTTEST/bias/aqr_weight_generator.py DEFAULT_AQR_CONFIG), smaller layout.
CMTTEST_AQR = dict(
    type="AQRWeightGenerator", embed_dims=32,
    encoder_config=dict(
        type="PETRTransformerDecoder", return_intermediate=True, num_layers=1,
        transformerlayers=dict(
            type="PETRTransformerDecoderLayer", with_cp=False,
            attn_cfgs=[dict(type="MultiheadAttention", embed_dims=32, num_heads=4, dropout=0.1)],
            ffn_cfgs=dict(type="FFN", embed_dims=32, feedforward_channels=64, num_fcs=2, ffn_drop=0.1,
                          act_cfg=dict(type="ReLU", inplace=True)),
            feedforward_channels=64, operation_order=("cross_attn", "norm", "ffn", "norm"))),
    window_sizes=[5, 3], use_type_embed=True, pc_range=[-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
    bev_feature_shape=(12, 12), pers_feature_shape=(6, 4, 10))


def fresh():
    return {"test.MODELS": (mmengine_registry.Registry("model"), "all")}


def test_import_changes_no_registry_and_no_warning_filter():
    out = run_python("""
        import warnings
        import einops, torch                      # the dependencies' own import-time filters come first
        from mmengine.registry import MODELS
        before, filters = set(MODELS.module_dict), list(warnings.filters)
        import sparse_bias, sparse_bias.nn
        assert set(MODELS.module_dict) == before, set(MODELS.module_dict) ^ before
        assert list(warnings.filters) == filters
        print("ok")
    """)
    assert out.strip() == "ok"


def test_plugin_module_registers_only_the_librarys_own_names():
    out = run_python("""
        from mmengine.registry import MODELS
        before = set(MODELS.module_dict)
        import sparse_bias.mmcv
        print(sorted(set(MODELS.module_dict) - before))
    """)
    assert set(eval(out)) == OWN


def test_dense_names_on_request_refuse_a_taken_name_unless_forced():
    regs = fresh()
    done = register_modules(registries=regs)
    assert set(done["test.MODELS"]) == OWN
    assert set(register_modules(dense_names=True, registries=regs)["test.MODELS"]) == OWN | DENSE
    assert regs["test.MODELS"][0].get("PETRMultiheadFlashAttention") is SparseBiasMultiheadAttention

    class UsersCmtTransformer(torch.nn.Module):
        pass

    regs = fresh()
    regs["test.MODELS"][0].register_module(name="CmtTransformer", module=UsersCmtTransformer)
    with pytest.raises(ValueError, match=r"'CmtTransformer'.*UsersCmtTransformer, not sparse_bias.nn.transformer"):
        register_modules(dense_names=True, registries=regs)
    assert regs["test.MODELS"][0].get("CmtTransformer") is UsersCmtTransformer          # nothing replaced
    assert regs["test.MODELS"][0].get("SparseBiasCmtTransformer") is None
    with pytest.warns(UserWarning, match="replacing .*UsersCmtTransformer with sparse_bias.nn.transformer.CmtTransformer"):
        register_modules(dense_names=True, force=True, registries=regs)
    assert regs["test.MODELS"][0].get("CmtTransformer") is CmtTransformer


def test_unchanged_cmt_config_builds_this_librarys_transformer():
    regs = fresh()
    register_modules(dense_names=True, registries=regs)
    registry = regs["test.MODELS"][0]
    with pytest.warns(DeprecationWarning, match="dropout"):                # mmcv's legacy `dropout=` keyword
        built = registry.build(copy.deepcopy(CMT_TRANSFORMER))
    assert isinstance(built, CmtTransformer) and len(built.decoder.layers) == 2
    keys = set(built.state_dict())
    for name in ("decoder.layers.0.attentions.0.attn.in_proj_weight", "decoder.layers.1.attentions.1.attn.out_proj.bias",
                 "decoder.layers.0.ffns.0.layers.0.0.weight", "decoder.layers.0.ffns.0.layers.1.weight",
                 "decoder.layers.0.norms.2.bias", "decoder.post_norm.weight"):
        assert name in keys
    layer = built.decoder.layers[0]
    assert layer.attentions[0].attn_drop == 0.1 and layer.ffns[0].layers[0][2].p == 0.0 and not layer.with_cp
    # the same network as the one built from arguments: same state-dict names and shapes, same outputs
    direct = CmtTransformer(32, num_heads=4, num_layers=2, feedforward_channels=64)
    direct.load_state_dict(built.state_dict(), strict=True)
    built.eval(), direct.eval()
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 32, 3, 4, generator=gen), torch.randn(2 * 2, 32, 2, 3, generator=gen),
            torch.randn(2, 5, 32, generator=gen), torch.randn(12, 32, generator=gen), torch.randn(4, 2, 3, 32, generator=gen))
    torch.testing.assert_close(built(*args)[0], direct(*args)[0], rtol=0, atol=0)


def test_unchanged_cmttest_aqr_config_builds_the_aqr_with_its_state_dict_names():
    regs = fresh()
    register_modules(dense_names=True, registries=regs)
    cfg = copy.deepcopy(CMTTEST_AQR)
    with pytest.warns(DeprecationWarning):
        aqr = regs["test.MODELS"][0].build(cfg)
    assert isinstance(aqr, AQRWeightGenerator) and aqr.num_heads == 4 and aqr.type_embed == "unused"
    assert aqr.window_sizes == (5, 3) and aqr.layout.num_keys == 12 * 12 + 6 * 4 * 10
    assert {k for k in aqr.state_dict() if not k.startswith("encoder.layers")} == {
        "encoder.post_norm.weight", "encoder.post_norm.bias", "weight_predictor.weight", "weight_predictor.bias",
        "bev_type_embed", "rv_type_embed"}
    ffn = aqr.encoder.layers[0].ffns[0]
    assert ffn.layers[0][2].p == 0.0                # PETR's layer overrides ffn_drop with ffn_dropout=0.0


@pytest.mark.filterwarnings("ignore:The arguments `dropout` in MultiheadAttention has been deprecated")
def test_generators_and_layers_build_by_dense_names():
    regs = fresh()
    register_modules(dense_names=True, registries=regs)
    registry = regs["test.MODELS"][0]
    gen = registry.build(dict(type="AttentionBiasGenerator", bev_feature_shape=(6, 7), pers_feature_shape=(2, 3, 4),
                              window_size=3, bias_scale=2.5, learnable_scale=True, min_scale=0.5, max_scale=5.0))
    assert isinstance(gen, AttentionBiasGenerator) and gen.layout.num_keys == 66
    layer = registry.build(copy.deepcopy(CMT_TRANSFORMER["decoder"]["transformerlayers"]) | {"with_cp": True})
    assert isinstance(layer, PETRTransformerDecoderLayer) and layer.with_cp
    dec = registry.build(copy.deepcopy(CMT_TRANSFORMER["decoder"]) | {"post_norm_cfg": None})
    assert isinstance(dec, PETRTransformerDecoder) and dec.post_norm is None
    assert sb.nn.register_modules is register_modules


def test_checkpointed_layer_matches_in_training():
    torch.manual_seed(0)
    cfg = copy.deepcopy(CMT_TRANSFORMER["decoder"]["transformerlayers"])
    cfg.pop("type")
    for c in cfg["attn_cfgs"]:
        c["dropout"] = 0.0
    with pytest.warns(DeprecationWarning):
        plain = PETRTransformerDecoderLayer(**cfg)
        cp = PETRTransformerDecoderLayer(**dict(cfg, with_cp=True))
    cp.load_state_dict(plain.state_dict())
    q, kv = torch.randn(5, 2, 32), torch.randn(9, 2, 32)
    outs = []
    for layer in (plain, cp):
        layer.train()
        out = layer(q, kv, kv)
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        outs.append([out] + list(grads))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_bad_mmcv_configs():
    with pytest.raises(ValueError, match="attn_cfgs entry type 'DeformableAttention' is not supported"):
        PETRTransformerDecoderLayer(attn_cfgs=dict(type="DeformableAttention"), operation_order=("cross_attn",))
    with pytest.raises(ValueError, match="attn_cfgs holds 1 configs but operation_order has 2 attentions"):
        PETRTransformerDecoderLayer(attn_cfgs=[dict(type="MultiheadAttention", embed_dims=8, num_heads=2)])
    with pytest.raises(ValueError, match="act_cfg .* is not supported"):
        PETRTransformerDecoderLayer(act_cfg=dict(type="GELU"))
    with pytest.raises(ValueError, match="no encoder"):
        CmtTransformer(encoder=dict(type="DetrTransformerEncoder"))
