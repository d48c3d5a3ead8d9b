"""The fused C++ window-terms kernel against torch.compile of the same computation (decision record).

Forward window terms of the exact correction at the CMT fusion shape (B=2, H=8, D=32, Q=900, K=56,400,
windows 15/15): the gather formulation in eager PyTorch, the same function through torch.compile (Inductor,
C++/OpenMP codegen), and the compiled extension sparse_bias._C. Run: python benchmarks/fused_vs_compile.py
"""
import time, torch, sparse_bias as sb
from sparse_bias.tools.synthetic import synthetic_scene
from sparse_bias.dense import dense_lse_forward
from sparse_bias._core.call import Call
from sparse_bias import _C
sc = synthetic_scene(2, 900, config="fusion", seed=0)
win = sb.local_windows(sc.layout, sc.bev_pos, sc.cam_pos, 15, 15)
B, H, D, K, Q = 2, 8, 32, sc.layout.num_keys, 900
q = torch.randn(B, H, Q, D); k = torch.randn(B, H, K, D); v = torch.randn(B, H, K, D)
o, lse, _ = dense_lse_forward(q, k, v, Call.of(q, D**-0.5))
order = win.entries().order
eb = torch.expm1(torch.rand(win.nnz))
def terms(qb, kb, vb, lseb, row, key, ebb):
    s = (qb[:, row] * kb[:, key]).sum(-1) * (D ** -0.5) - lseb[:, row]
    a = s.exp() * ebb
    S = torch.zeros(H, Q).index_add_(1, row, a)
    C = torch.zeros(H, Q, D).index_add_(1, row, a.unsqueeze(-1) * vb[:, key])
    return S, C
compiled = torch.compile(terms, dynamic=False)
def run(fn):
    for b in range(B):
        e0, e1 = win.batch_range(b)
        fn(q[b], k[b], v[b], lse[b], win.row[e0:e1] - b * Q, win.key[e0:e1], eb[e0:e1])
def fused():
    den = torch.ones(B, H, Q); out = o.clone()
    for b in range(B):
        e0, e1 = win.batch_range(b); crow, col = win.indptr[b * Q:(b + 1) * Q + 1] - e0, win.key[e0:e1]
        _C.window_forward(q, k, v, lse[b].contiguous(), crow, col, order[b * Q:(b + 1) * Q] - b * Q, eb[e0:e1, None].contiguous(), None, b, 0, H, D**-0.5, 0.0, 0, den[b], torch.zeros(H, Q), out[b])
t0 = time.perf_counter(); run(compiled); print(f"compile + first call {time.perf_counter() - t0:.1f} s")
for name, f in (("eager gather", lambda: run(terms)), ("torch.compile", lambda: run(compiled)), ("fused C++", fused)):
    f(); ts = []
    for _ in range(5):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    print(f"{name:14s} forward window terms: {min(ts) * 1000:.1f} ms (min of 5)")
