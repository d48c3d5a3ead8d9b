"""The library's private core: everything between the public functions and the kernels.

Nothing here is public API; the public modules (`sparse_bias.attention`, `sparse_bias.window_attention`,
`sparse_bias.bias`, ...) are the entry points. This ``__init__`` imports nothing, so that the public data modules
below can import the leaf modules of the core without importing the rest.

The call path of ``sparse_bias_attention(q, k, v, bias)`` (`window_attention` and a `ModalityBias` take the same
path with their own op):

1. `sparse_bias.attention.sparse_bias_attention` -- builds the call's inputs record (`inputs.AttentionInputs`),
   which validates every argument once, then picks the backend (`dispatch.choose_backend`, first-use self-checks
   in `selfcheck`).
2. `ops.SparseBiasAttention` -- the one ``autograd.Function`` of the op: its forward calls the forward op, its
   backward the backward op, and it keeps what the forward chose (the dense kernel) for the backward.
3. ``torch.ops.sparse_bias.sparse_attention`` -- the registered op (`ops.Op`), whose implementation is the math
   of `correction.forward` (dense pass plus sparse correction; `window.forward`, `modality.forward`). Compiled
   graphs call the registered op; eager calls run its implementation directly (same code, no dispatcher round
   trip, no import of ``torch._dynamo``).
4. `sparse_bias.backends` -- one block of window terms (``forward_block``), or `sparse_bias.dense` for the dense
   pass.
5. The kernel: the compiled C++ extension (`extension`), a Triton kernel, torch-scatter or PyTorch operators.

Layers, lowest first (a module imports only from layers below it):

* leaves: `compat` (feature probes of the installed torch), `checks` (argument checks and the debug switch),
  `call` (the `Call` record), `entries` (the index tensors the kernels read), `threads`, `extension`;
* the public data types: `sparse_bias.layout`, `sparse_bias.windows`, `sparse_bias.bias`, ...;
* kernels: `sparse_bias.backends`, `sparse_bias.dense`;
* the math of each op: `blocks`, `exact_rows`, `correction`, `window`, `modality`; `reference` (the dense
  float64-capable reference);
* `ops` (registered ops and their autograd Functions), `inputs` (validation), `precision` / `verify` /
  `concentrated` / `selfcheck` / `dispatch` (backend choice);
* the public functions: `sparse_bias.attention`, `sparse_bias.window_attention`; then `sparse_bias.nn` and
  `sparse_bias.tools`.
"""
