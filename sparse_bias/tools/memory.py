"""How much memory the machine has free: used to skip the dense-bias comparisons that would not fit."""
from __future__ import annotations

from typing import Optional


def available_gib() -> Optional[float]:
    """MemAvailable of ``/proc/meminfo`` in GB (1e9 bytes), or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:  # pragma: no cover - not Linux
        return None
    return None  # pragma: no cover


def dense_bias_gb(batch: int, heads: int, queries: int, keys: int) -> float:
    """RAM (GB) of a forward + backward of the dense-bias SDPA (the dense version) on CPU: measured 10.5 GB peak
    at B=2, H=8, Q=900, K=56,400, fp32 (docs/results/attention-cmt-fusion-cpu.txt), i.e. about 3.4 score-sized
    fp32 buffers of ``B * H * Q * K`` plus 0.5 GB of inputs; scaled to other sizes."""
    return 0.5 + 3.4 * batch * heads * queries * keys * 4 / 1e9
