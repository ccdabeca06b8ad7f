"""CPU thread count: as many intra-op threads as the cores this process may actually use.

torch starts one thread per core it can see. In a container with a CPU quota (Docker ``--cpus``,
Kubernetes limits) it sees the host's cores, not the quota, and more busy threads than cores make
every step slower: on the 2-core benchmark machine, 4 threads made a training step 1.5x slower than 2
(docs/benchmarks.md, "fast path"). peftlab therefore caps torch's threads at the cores it is allowed,
unless the user chose a count themselves (``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None if unlimited."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def usable_cpus(root: Path = _CGROUP) -> int:
    """Cores this process may run on: its CPU affinity, bounded by the cgroup quota (rounded up)."""
    # Not joblib.cpu_count() (loky's, the same rule): it reads fixed /sys paths, so it cannot be pointed at a
    # test's cgroup tree; it raises ValueError on a cpu.max whose fields are not numbers where this returns
    # the affinity; and joblib is not one of peftlab's declared dependencies (it comes with scikit-learn).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def configure_threads() -> int:
    """Cap torch's intra-op threads at :func:`usable_cpus` unless the user set a count; return the count."""
    import torch

    if os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"):
        return torch.get_num_threads()
    cores = usable_cpus()
    if torch.get_num_threads() > cores:
        logger.info("using %d CPU threads (torch saw %d cores; this process may use %d)", cores,
                    torch.get_num_threads(), cores)
        torch.set_num_threads(cores)
    return torch.get_num_threads()
