"""Type-checked by tests/test_typing.py (mypy, the package's own annotations through ``py.typed``): the public API as
a user's code calls it. Not a test module of its own (pytest does not collect it)."""
import torch

import sparse_bias as sb
from sparse_bias.nn import PETRTransformerDecoderLayer, SparseBiasMultiheadAttention

layout: sb.KeyLayout = sb.KeyLayout(bev_shape=(8, 8), cam_shape=(2, 4, 5))
bev_pos, cam_pos = sb.project_points(torch.rand(1, 3, 3), [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0], layout)
win: sb.WindowIndex = sb.local_windows(layout, torch.tensor([[[2, 3]]]), None, bev_window=3)
bias: sb.SparseBias = sb.window_bias(win, torch.ones(1, 1), None, scale=2.0, profile="gaussian")
modality: sb.ModalityBias = sb.ModalityBias(layout, torch.zeros(1, 1, 2))
dense: torch.Tensor = bias.to_dense()
q = torch.randn(1, 2, 1, 4)
k = torch.randn(1, 2, layout.num_keys, 4)
out: torch.Tensor = sb.sparse_bias_attention(q, k, k, bias, dropout_p=0.1, dropout_seed=3, backend="auto")
ref: torch.Tensor = sb.dense_bias_attention(q, k, k, dense)
local: torch.Tensor = sb.window_attention(q, k, k, win, bias=None)
choice: str = sb.select_backend(q, bias)[0]
why: str = sb.select_window_backend(q)[1]
available: bool = sb.extension_available()
mha = SparseBiasMultiheadAttention(8, 2)
memory = torch.randn(layout.num_keys, 1, 8)                 # [K, B, C]
y: torch.Tensor = mha.forward(torch.randn(1, 1, 8), memory, memory, attention_bias=bias)
layer = PETRTransformerDecoderLayer(attn_cfgs=dict(type="MultiheadAttention", embed_dims=8, num_heads=2),
                                    feedforward_channels=16, operation_order=("cross_attn", "norm", "ffn", "norm"))
z: torch.Tensor = layer.forward(torch.randn(1, 1, 8), torch.randn(4, 1, 8), torch.randn(4, 1, 8))
version: str = sb.__version__
