"""The first hour of a new user: clear CLI errors, errors in the modules' terms, tensor-like moves, debug mode
that reports where it is seen, the demo's memory check."""
import importlib.metadata
import subprocess
import sys
import warnings

import pytest
import torch

import sparse_bias as sb
from sparse_bias.nn import CmtTransformer, SparseBiasMultiheadAttention


# ---- command lines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, argv", [("benchmark", ["--variants", "foo"]), ("benchmark", ["--dtype", "float8"]),
                                         ("demo", ["--window", "15"]), ("aqr_benchmark", ["--variants", "bar"]),
                                         ("selftest", ["--dtypes", "double"]), ("benchmark", ["--dropout", "1.5"])])
def test_invalid_arguments_exit_2_with_one_line(module, argv):
    res = subprocess.run([sys.executable, "-m", f"sparse_bias.tools.{module}"] + argv, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m sparse_bias.tools.{module}: error:"), res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("module", ["benchmark", "demo", "aqr_benchmark", "selftest"])
def test_help_shows_a_default_or_a_flag_for_every_option(module):
    res = subprocess.run([sys.executable, "-m", f"sparse_bias.tools.{module}", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and res.stdout.startswith(f"usage: python -m sparse_bias.tools.{module}")
    options = [line for line in res.stdout.splitlines() if line.startswith("  --")]   # not wrapped help lines
    text = res.stdout.replace("\n", " ")
    assert options and text.count("(default:") >= len(options) - 1          # every option but --help has help


def test_console_scripts_are_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    for name in ("sparse-bias-benchmark", "sparse-bias-demo", "sparse-bias-selftest", "sparse-bias-aqr-benchmark"):
        assert name in scripts, name


# ---- errors in the user's terms ---------------------------------------------------------------------------

def test_module_shape_errors_name_query_key_and_batch_first():
    mha = SparseBiasMultiheadAttention(32, 4)
    with pytest.raises(ValueError, match=r"query and key disagree on the batch size.*batch_first=False.*"
                                         r"batch_first=True or pass query.transpose\(0, 1\)"):
        mha(torch.randn(2, 50, 32), torch.randn(2, 70, 32))          # batch-first tensors, seq-first module
    with pytest.raises(ValueError, match=r"query must be \[N, B, C\] with C = embed_dims = 32"):
        mha(torch.randn(50, 2, 16))
    with pytest.raises(ValueError, match=r"key and value must have the same shape"):
        mha(torch.randn(5, 2, 32), torch.randn(7, 2, 32), torch.randn(6, 2, 32))
    with pytest.raises(ValueError, match=r"value must be \[B, N, C\]"):
        SparseBiasMultiheadAttention(32, 4, batch_first=True)(torch.randn(2, 5, 32), torch.randn(2, 7, 32),
                                                              torch.randn(2, 7))


def test_memory_shape_errors_name_the_positional_embeddings():
    x, x_img = torch.randn(2, 8, 4, 4), torch.randn(12, 8, 3, 5)
    with pytest.raises(ValueError, match=r"rv_pos_embed must be \[B \* V, Hc, Wc, C\] = \[12, 3, 5, 8\].*"
                                         r"channels-first: pass rv_pos_embed.permute\(0, 2, 3, 1\)"):
        CmtTransformer.flatten_memory(x, x_img, torch.randn(16, 8), torch.randn(12, 8, 3, 5), 2)
    with pytest.raises(ValueError, match=r"bev_pos_embed must be \[H \* W, C\] = \[16, 8\]"):
        CmtTransformer.flatten_memory(x, x_img, torch.randn(8, 16), torch.randn(12, 3, 5, 8), 2)
    memory, pos = CmtTransformer.flatten_memory(x, x_img, torch.randn(16, 8), torch.randn(12, 3, 5, 8), 2)
    assert memory.shape == pos.shape == (16 + 6 * 15, 2, 8)


# ---- tensor-like moves ------------------------------------------------------------------------------------

def small_bias(per_head=False):
    layout = sb.KeyLayout(bev_shape=(6, 6), cam_shape=(1, 3, 4))
    win = sb.local_windows(layout, torch.tensor([[[1, 1], [3, 4]]]), torch.tensor([[[0, 1, 1], [-1, 0, 0]]]), 3, 3)
    w = torch.rand(1, 2, *((3,) if per_head else ()), requires_grad=True)
    return win, sb.window_bias(win, w, w.detach())


@pytest.mark.parametrize("per_head", [False, True])
def test_sparse_bias_and_index_move_like_tensors(per_head):
    win, bias = small_bias(per_head)
    meta = bias.to("meta", torch.float16)
    assert meta.device.type == "meta" and meta.dtype == torch.float16 and meta.index.device.type == "meta"
    assert meta.index.key.device.type == "meta" and meta.index.indptr.dtype == torch.long
    kw = bias.to(device="meta", dtype=torch.float64)
    assert (kw.device.type, kw.dtype) == ("meta", torch.float64)
    assert bias.to(torch.float64).device.type == "cpu" and bias.to(torch.float64).index is win   # cache kept
    assert bias.to(torch.zeros(1, dtype=torch.float16, device="meta")).device.type == "meta"
    assert bias.values.requires_grad and not bias.detach().values.requires_grad
    assert bias.cpu().index is win and win.cpu() is win and win.detach() is win
    assert win.to("meta").device.type == "meta" and win.to(torch.float16) is win
    with pytest.raises(TypeError, match=r"to\(\) takes a device, a dtype, both, or a tensor"):
        bias.to("not-a-device")


def test_modality_bias_moves_like_a_tensor():
    layout = sb.KeyLayout(bev_shape=(2, 2), cam_shape=(1, 2, 2))
    mb = sb.ModalityBias(layout, torch.rand(1, 3, 2, requires_grad=True))
    assert mb.to("meta").device.type == "meta" and mb.to(torch.float64).dtype == torch.float64
    assert not mb.detach().values.requires_grad and mb.cpu().device.type == "cpu"


# ---- debug mode ------------------------------------------------------------------------------------------

def test_debug_mode_warns_on_disagreement(monkeypatch):
    from sparse_bias.nn import attention as mha_mod
    mha = SparseBiasMultiheadAttention(16, 2).double()
    layout = sb.KeyLayout(bev_shape=(4, 4))
    win = sb.local_windows(layout, torch.tensor([[[1, 1], [2, 2], [3, 0]]] * 2), None, 3)
    bias = sb.window_bias(win, torch.rand(2, 3, dtype=torch.float64), None)
    bias.debug = True
    x, mem = torch.randn(3, 2, 16, dtype=torch.float64), torch.randn(16, 2, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # agreement: no warning
        mha(x, mem, mem, attention_bias=bias)
    original = mha_mod.attend
    monkeypatch.setattr(mha_mod, "attend", lambda *a, **kw: original(*a, **kw) + 0.1)
    with pytest.warns(RuntimeWarning, match="debug_mode: the sparse attention differs from the dense reference"):
        mha(x, mem, mem, attention_bias=bias)


# ---- the demo's memory check -------------------------------------------------------------------------------

def test_demo_skips_the_dense_variant_without_enough_memory(monkeypatch, capsys, tmp_path):
    from types import SimpleNamespace

    from sparse_bias.tools import benchmark, demo
    calls = []

    def fake_main(argv):
        calls.append(argv)
        return [dict(variant=v, chosen="fused", max_rel_error=1e-6, time_ratio=1.0, peak_rss_mib=100.0)
                for v in argv[argv.index("--variants") + 1:]]
    monkeypatch.setattr(benchmark, "main", fake_main)
    monkeypatch.setattr(demo, "available_gib", lambda: 0.1)
    demo._attention(SimpleNamespace(quick=False, queries=900, batch_size=2, out=str(tmp_path)))
    out = capsys.readouterr().out
    assert "the dense-bias variant needs about 11.5 GB" in out and "skipping the dense-bias variant" in out
    assert "dense-bias" not in calls[0]
