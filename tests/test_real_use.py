"""Real-use checks: DistributedDataParallel on two CPU processes, torch.compile, bfloat16 autocast."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest
from helpers import random_positions, skip_without_dynamo
from sparse_bias._core.compat import CUSTOM_OPS

import sparse_bias as sb
from sparse_bias.nn import AttentionBiasGenerator, PETRTransformerDecoderLayer

LAYOUT = sb.KeyLayout(bev_shape=(8, 8), cam_shape=(2, 4, 5))         # 64 + 40 = 104 keys
C, H = 32, 4


def make_layer(seed=0):
    torch.manual_seed(seed)
    return PETRTransformerDecoderLayer(C, H, feedforward_channels=64, dropout=0.0)


def batch(seed, queries=6):
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(LAYOUT, 2, queries, 2, gen)
    lw, cw = torch.rand(2, queries, generator=gen), torch.rand(2, queries, generator=gen)
    bias = AttentionBiasGenerator(LAYOUT, window_size=3, bias_scale=2.0)(lw, cw, bev_pos, cam_pos)
    query = torch.randn(queries, 2, C, generator=gen)
    memory = torch.randn(LAYOUT.num_keys, 2, C, generator=gen)
    pos = torch.randn(queries, 2, C, generator=gen)
    return query, memory, pos, bias


def run(layer, query, memory, pos, bias):
    return layer(query, memory, memory, query_pos=pos, key_pos=torch.zeros_like(memory), attention_bias=bias)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(make_layer())
    query, memory, pos, bias = batch(seed=100 + rank)             # each rank its own data
    out = run(model, query, memory, pos, bias)
    out.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.save(grads, os.path.join(out_dir, f"grads{rank}.pt"))
    dist.barrier()                  # both ranks done before either tears its gloo pairs down
    dist.destroy_process_group()


def test_ddp_two_processes_identical_gradients(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    g0, g1 = (torch.load(tmp_path / f"grads{r}.pt") for r in range(2))
    assert torch.equal(g0, g1)
    # and they are the average of what each rank computes alone
    local = []
    for rank in range(2):
        layer = make_layer()
        query, memory, pos, bias = batch(seed=100 + rank)
        run(layer, query, memory, pos, bias).square().mean().backward()
        local.append(torch.cat([p.grad.flatten() for p in layer.parameters()]))
    torch.testing.assert_close(g0, (local[0] + local[1]) / 2, rtol=1e-5, atol=1e-7)


def test_torch_compile_matches_eager():
    """Default torch.compile (graph breaks allowed), where the ops are registered (torch 2.4+: docs/install.md)."""
    skip_without_dynamo()
    if not CUSTOM_OPS:
        pytest.skip("before torch 2.4 dynamo cannot trace the library's autograd Functions (docs/install.md)")
    layer = make_layer()
    query, memory, pos, bias = batch(seed=1)
    eager = run(layer, query, memory, pos, bias)
    out = run(torch.compile(layer), query, memory, pos, bias)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    g_eager = torch.autograd.grad(eager.square().sum(), list(layer.parameters()))
    g_comp = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_matches_eager():
    layer = make_layer()
    query, memory, pos, bias = batch(seed=2)
    with torch.no_grad():
        eager = run(layer, query, memory, pos, bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run(layer, query, memory, pos, bias)
        # the same layer with the dense reference attention under autocast: the naive same-precision yardstick
        dense = sb.SparseBias(bias.index, bias.values).to_dense().transpose(0, 1)     # the layer's [Q, B, K] layout
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive = run(layer, query, memory, pos, dense)
    assert out.dtype == torch.float32                       # LayerNorm runs in fp32 under autocast
    drift = float((naive.float() - eager).abs().max())
    assert 0 < float((out.float() - eager).abs().max()) <= 2 * drift
