"""Rough time and memory of the tools' long phases, printed before they start (`estimate_line`).

Memory comes from the shapes. Time comes from per-step rates measured on the reference machine (2 CPU threads,
docs/results/attention-cmt-fusion-cpu.txt: fp32, D = 32), in nanoseconds per score entry ``B * H * Q * K``, scaled
linearly by the head dim and by 2 / (torch's thread count) -- rough (a factor of two either way on other CPUs); the
progress bar's own estimate takes over once the phase runs. On a GPU the CPU rates do not apply: the time is
left out there.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .memory import dense_bias_gb

__all__ = ["STEP_NS", "PROCESS_START_S", "step_seconds", "step_gb", "format_duration", "Estimate",
           "estimate_line"]

#: ns per score entry (B*H*Q*K) of one step, (forward, forward + backward), 2 threads, fp32, D = 32
STEP_NS = {
    "sdpa": (0.80, 2.93),
    "sparse-auto": (0.86, 3.08),
    "sparse-fused": (0.86, 3.12),
    "sparse-sparse": (0.90, 3.22),
    "sparse-scatter": (1.96, 6.41),
    "sparse-torch": (2.01, 6.57),
    "dense-bias": (4.30, 10.94),           # also the dense reference of the exactness checks
}
#: seconds for a fresh worker process to import torch and the package and build its inputs (2 threads)
PROCESS_START_S = 4.0
_THREADS_REF = 2


def step_seconds(variant: str, backward: bool, batch: int, heads: int, queries: int, keys: int,
                 head_dim: int = 32, dtype: torch.dtype = torch.float32) -> float:
    """Rough seconds of one step of ``variant`` (a `STEP_NS` key; other variants count as ``dense-bias``) on this
    machine's CPU threads; half-precision dtypes count twice (CPUs without native bf16/fp16 matmuls)."""
    rate = STEP_NS.get(variant, STEP_NS["dense-bias"])[1 if backward else 0]
    scale = max(head_dim, 8) / 32 * _THREADS_REF / max(torch.get_num_threads(), 1)
    scale *= 1.0 if dtype in (torch.float32, torch.float64) else 2.0
    return rate * 1e-9 * batch * heads * queries * keys * scale


def step_gb(variant: str, batch: int, heads: int, queries: int, keys: int, head_dim: int = 32,
            element_size: int = 4) -> float:
    """Rough peak RAM (GB) of a process running forward + backward of ``variant``: ``dense-bias`` (and the dense
    reference) from `sparse_bias.tools.memory.dense_bias_gb`; the others hold q, k, v, their gradients and
    the attention's buffers, about 4 x the inputs, plus 0.4 GB for torch itself."""
    if variant not in STEP_NS or variant == "dense-bias":
        return dense_bias_gb(batch, heads, queries, keys)
    return 0.4 + 4 * batch * heads * (queries + 2 * keys) * head_dim * element_size / 1e9


def format_duration(seconds: float) -> str:
    """``"40 s"``, ``"3.5 min"``, ``"1.2 h"``."""
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Estimate(NamedTuple):
    """A phase's rough cost: ``phase`` (its name), ``what`` (what it runs), ``seconds`` and ``gb`` (the peak of
    ``memory``, ``"RAM"`` or ``"GPU memory"``); None where there is no estimate."""

    phase: str
    what: str
    seconds: Optional[float]
    gb: Optional[float]
    memory: str = "RAM"

    def figures(self) -> str:
        """``"about 4.1 min on 2 threads, peak RAM about 11.5 GB"``."""
        out = []
        if self.seconds is not None:
            out.append(f"about {format_duration(self.seconds)} on {torch.get_num_threads()} threads")
        if self.gb is not None:
            out.append(f"peak {self.memory} about {self.gb:.1f} GB")
        return ", ".join(out) or "no estimate"

    def line(self) -> str:
        """The line printed before the phase: ``"estimate: <phase> (<what>): <figures>"``."""
        return f"estimate: {self.phase}{f' ({self.what})' if self.what else ''}: {self.figures()}"


def estimate_line(phase: str, seconds: Optional[float], gb: Optional[float], what: str = "") -> str:
    """`Estimate.line` of these figures."""
    return Estimate(phase, what, seconds, gb).line()
