"""OpenMMLab stacks: CMT's config through mmdet3d's / mmengine's registries (mmcv 2.x), mmcv's own transformer
bricks around this library's attention (mmcv 2.x and 1.x), mmcv 1.x's ``Registry`` API. Each test skips unless its
stack is installed (`.ci/compat/mm-install.sh`); the stand-in of mmcv 1.x's Registry runs everywhere."""
import copy
import importlib

import pytest
import torch

import sparse_bias as sb
from sparse_bias.nn import CmtTransformer, SparseBiasMultiheadAttention, register_modules

BEV, PERS = (4, 5), (2, 3, 4)
B, Q, C, H = 2, 6, 16, 4
K = BEV[0] * BEV[1] + PERS[0] * PERS[1] * PERS[2]

#: CMT's transformer config (junjie18/CMT projects/configs/fusion/cmt_voxel0075_vov_1600x640_cbgs.py), narrower,
#: under this library's own names (custom_imports=["sparse_bias.mmcv"] registers those)
CMT_TRANSFORMER = dict(
    type="SparseBiasCmtTransformer",
    decoder=dict(
        type="PETRTransformerDecoder", return_intermediate=True, num_layers=2,
        transformerlayers=dict(
            type="PETRTransformerDecoderLayer", with_cp=False,
            attn_cfgs=[dict(type="MultiheadAttention", embed_dims=C, num_heads=H, attn_drop=0.0),
                       dict(type="PETRMultiheadFlashAttention", embed_dims=C, num_heads=H, attn_drop=0.0)],
            ffn_cfgs=dict(type="FFN", embed_dims=C, feedforward_channels=32, num_fcs=2, ffn_drop=0.0,
                          act_cfg=dict(type="ReLU", inplace=True)),
            feedforward_channels=32, operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm"))))


def mmcv_major():
    try:
        return int(importlib.import_module("mmcv").__version__.split(".")[0])
    except Exception:
        return None


needs_mm2 = pytest.mark.skipif(mmcv_major() != 2, reason="needs mmcv 2.x (.ci/compat/mm-install.sh VENV mm2)")
needs_mm1 = pytest.mark.skipif(mmcv_major() != 1, reason="needs mmcv 1.x (.ci/compat/mm-install.sh VENV mm1)")


def a_bias(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layout = sb.KeyLayout(bev_shape=BEV, cam_shape=PERS)
    bev = torch.stack([torch.randint(0, n, (B, Q), generator=gen) for n in BEV], -1)
    cam = torch.stack([torch.randint(0, n, (B, Q), generator=gen) for n in PERS], -1)
    win = sb.local_windows(layout, bev, cam, 3, 3)
    lw = (torch.rand(B, Q, generator=gen, dtype=dtype) * 4 - 2).requires_grad_()
    cw = (torch.rand(B, Q, generator=gen, dtype=dtype) * 4 - 2).requires_grad_()
    return sb.window_bias(win, lw, cw, scale=1.5), (lw, cw)


def transformer_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    return [r(B, C, *BEV), r(B * PERS[0], C, *PERS[1:]), r(B, Q, C), r(BEV[0] * BEV[1], C), r(B * PERS[0], *PERS[1:], C)]


def forward_backward(fn, leaves):
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return [out] + list(torch.autograd.grad((out * g).sum(), leaves))


def assert_all_close(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"item {i}: {m}")


def mmcv_sequence_cfg(cross_type):
    """mmcv's own bricks: TransformerLayerSequence of BaseTransformerLayer, mmcv's MultiheadAttention as the
    self-attention, ``cross_type`` as the cross-attention."""
    return dict(type="TransformerLayerSequence", num_layers=2, transformerlayers=dict(
        type="BaseTransformerLayer",
        attn_cfgs=[dict(type="MultiheadAttention", embed_dims=C, num_heads=H),
                   dict(type=cross_type, embed_dims=C, num_heads=H)],
        ffn_cfgs=dict(type="FFN", embed_dims=C, feedforward_channels=32, num_fcs=2, ffn_drop=0.0),
        operation_order=("self_attn", "norm", "cross_attn", "norm", "ffn", "norm")))


def check_mmcv_bricks(build_transformer_layer_sequence):
    """The library's attention inside mmcv's BaseTransformerLayer (which hands attention_bias to both attentions)
    against the dense-bias computation in mmcv's own MultiheadAttention (the bias as its additive attn_mask),
    on the same parameters: outputs and gradients (inputs, bias weights, parameters)."""
    torch.manual_seed(0)
    ours = build_transformer_layer_sequence(mmcv_sequence_cfg("SparseBiasMultiheadAttention")).double().eval()
    dense = build_transformer_layer_sequence(mmcv_sequence_cfg("MultiheadAttention")).double().eval()
    assert isinstance(ours.layers[0].attentions[1], SparseBiasMultiheadAttention)
    assert ours.layers[0].attentions[1].operation_name == "cross_attn"
    dense.load_state_dict(ours.state_dict(), strict=True)      # mmcv's MultiheadAttention's names: attn.in_proj_*
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(Q, B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    memory = torch.randn(K, B, C, generator=gen, dtype=torch.float64, requires_grad=True)
    query_pos = torch.randn(Q, B, C, generator=gen, dtype=torch.float64)
    key_pos = torch.randn(K, B, C, generator=gen, dtype=torch.float64)
    results = []
    for kind in ("sparse", "seq_first", "dense_here", "mmcv_dense"):
        bias, (lw, cw) = a_bias()
        leaves = [query, memory, lw, cw] + list(ours.parameters() if kind != "mmcv_dense" else dense.parameters())
        kw = dict(query_pos=query_pos, key_pos=key_pos)
        if kind == "mmcv_dense":
            additive = bias.to_dense().unsqueeze(1).expand(-1, H, -1, -1).reshape(B * H, Q, K)
            fn = lambda: dense(query, memory, memory, attn_masks=[None, additive], **kw)          # noqa: E731
        else:
            b = {"sparse": bias, "seq_first": bias.transpose(0, 1), "dense_here": bias.to_dense().transpose(0, 1)}[kind]
            fn = lambda: ours(query, memory, memory, attention_bias=b, **kw)                      # noqa: E731
        results.append(forward_backward(fn, leaves))
    for got in results[:3]:
        assert_all_close(got, results[3])


# ---- mmcv 2.x, mmengine, mmdet 3.x, mmdet3d 1.4 -------------------------------------------------------------

@needs_mm2
def test_mm2_cmt_config_with_custom_imports_builds_through_mmdet3ds_registry(tmp_path):
    mmengine_config = pytest.importorskip("mmengine.config")
    registry = pytest.importorskip("mmdet3d.registry")
    try:                              # what a child registry's first lookup imports (mmengine: import_from_location)
        importlib.import_module("mmdet3d.models")
    except Exception:                 # mmcv without compiled ops: mmdet3d.models needs mmcv._ext; its registry still
        registry.MODELS._imported = True   # falls back to mmengine's root, which is what is tested here
    cfg_file = tmp_path / "cmt_sparse_bias.py"
    cfg_file.write_text("custom_imports = dict(imports=['sparse_bias.mmcv'], allow_failed_imports=False)\n"
                        f"transformer = {CMT_TRANSFORMER!r}\n")
    cfg = mmengine_config.Config.fromfile(str(cfg_file))       # imports sparse_bias.mmcv: the registration
    assert registry.MODELS.get("SparseBiasCmtTransformer") is CmtTransformer
    assert "SparseBiasCmtTransformer" in registry.MODELS.module_dict        # registered in the child as well
    transformer = registry.MODELS.build(cfg.transformer).double().eval()
    assert isinstance(transformer, CmtTransformer)
    direct = CmtTransformer(decoder=copy.deepcopy(CMT_TRANSFORMER["decoder"])).double().eval()
    direct.load_state_dict(transformer.state_dict(), strict=True)
    results = []
    for model, kind in ((transformer, "sparse"), (transformer, "dense"), (direct, "dense")):
        bias, weights = a_bias()
        inputs = transformer_inputs()
        b = bias if kind == "sparse" else bias.to_dense()
        results.append(forward_backward(lambda: model(*inputs, attention_bias=b)[0],
                                        inputs + list(weights) + list(model.parameters())))
    assert_all_close(results[0], results[2])
    assert_all_close(results[1], results[2])


@needs_mm2
def test_mm2_mmcv_bricks_take_the_librarys_attention():
    transformer = pytest.importorskip("mmcv.cnn.bricks.transformer")
    register_modules()                                       # mmengine's root MODELS, where mmcv 2.x builds
    check_mmcv_bricks(transformer.build_transformer_layer_sequence)


# ---- mmcv-full 1.x, mmdet 2.x -------------------------------------------------------------------------------

@needs_mm1
def test_mm1_registries_and_bricks_take_the_librarys_modules():
    bricks = pytest.importorskip("mmcv.cnn.bricks.registry")
    transformer = pytest.importorskip("mmcv.cnn.bricks.transformer")
    done = register_modules()
    assert "SparseBiasMultiheadAttention" in done["mmcv.cnn.bricks.registry.ATTENTION"]
    assert bricks.ATTENTION.get("SparseBiasMultiheadAttention") is SparseBiasMultiheadAttention
    check_mmcv_bricks(transformer.build_transformer_layer_sequence)
    try:
        builder = importlib.import_module("mmdet.models.utils.builder")     # needs mmcv-full's compiled ops
    except Exception as exc:
        pytest.skip(f"mmdet 2.x's TRANSFORMER registry does not import: {exc}")
    cfg = copy.deepcopy(CMT_TRANSFORMER)
    assert isinstance(builder.build_transformer(cfg), CmtTransformer)


# ---- mmcv 1.x's Registry API, stood in -----------------------------------------------------------------------

class MMCV1Registry:
    """mmcv 1.x's ``mmcv.utils.Registry`` as CMT's plugins use it: ``register_module(name=None, force=False,
    module=None)`` (a taken name is a KeyError unless ``force``), ``module_dict``, ``get``, ``build`` with
    ``build_from_cfg``'s rules (a copy of the dict, ``type`` popped, a KeyError naming the registry)."""

    def __init__(self, name):
        self._name, self._module_dict = name, {}

    @property
    def module_dict(self):
        return self._module_dict

    def get(self, key):
        return self._module_dict.get(key)

    def register_module(self, name=None, force=False, module=None):
        if not isinstance(force, bool):
            raise TypeError(f"force must be a boolean, but got {type(force)}")
        if module is None:
            return lambda cls: self.register_module(name, force, cls) or cls
        for n in [name or module.__name__] if not isinstance(name, (list, tuple)) else name:
            if not force and n in self._module_dict:
                raise KeyError(f"{n} is already registered in {self._name}")
            self._module_dict[n] = module
        return module

    def build(self, cfg, default_args=None):
        if not isinstance(cfg, dict) or "type" not in cfg:
            raise KeyError(f'`cfg` must contain the key "type", but got {cfg}')
        args = copy.deepcopy(cfg)
        kind = args.pop("type")
        cls = self.get(kind) if isinstance(kind, str) else kind
        if cls is None:
            raise KeyError(f"{kind} is not in the {self._name} registry")
        for k, v in (default_args or {}).items():
            args.setdefault(k, v)
        return cls(**args)


def test_mmcv1_registry_api_stand_in_builds_cmts_config_by_dense_names():
    regs = {f"mmcv.cnn.bricks.registry.{n}": (MMCV1Registry(n.lower()), kind) for n, kind in
            (("ATTENTION", "attention"), ("TRANSFORMER_LAYER", "layer"), ("TRANSFORMER_LAYER_SEQUENCE", "sequence"))}
    regs["mmdet.models.utils.builder.TRANSFORMER"] = (MMCV1Registry("Transformer"), "transformer")

    class UsersCmtTransformer(torch.nn.Module):           # CMT's plugin: @TRANSFORMER.register_module()
        pass
    regs["mmdet.models.utils.builder.TRANSFORMER"][0].register_module(module=UsersCmtTransformer,
                                                                      name="CmtTransformer")
    with pytest.raises(ValueError, match="CmtTransformer.*UsersCmtTransformer"):
        register_modules(dense_names=True, registries=regs)
    with pytest.warns(UserWarning, match="replacing"):
        register_modules(dense_names=True, force=True, registries=regs)
    attention = regs["mmcv.cnn.bricks.registry.ATTENTION"][0]
    assert attention.get("PETRMultiheadFlashAttention") is SparseBiasMultiheadAttention
    cfg = copy.deepcopy(CMT_TRANSFORMER)
    cfg["type"] = "CmtTransformer"
    transformer = regs["mmdet.models.utils.builder.TRANSFORMER"][0].build(cfg).double().eval()
    assert isinstance(transformer, CmtTransformer)
    layer = regs["mmcv.cnn.bricks.registry.TRANSFORMER_LAYER"][0].build(cfg["decoder"]["transformerlayers"])
    assert len(layer.attentions) == 2
    bias, weights = a_bias()
    inputs = transformer_inputs()
    got = forward_backward(lambda: transformer(*inputs, attention_bias=bias)[0], inputs + list(weights))
    bias, weights = a_bias()
    want = forward_backward(lambda: transformer(*inputs, attention_bias=bias.to_dense())[0], inputs + list(weights))
    assert_all_close(got, want)
