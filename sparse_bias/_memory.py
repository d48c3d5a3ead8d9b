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
