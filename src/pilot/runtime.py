"""Process-wide settings of the compute (torch's CPU thread count) and its peak memory.

On a small machine the thread count matters a lot: measured on this project's 2-core machine,
SmolLM2-135M answered 32 questions in 8.4 s with 2 threads and 11.6 s with 1 when idle, but a
loaded machine turned torch's default into ~5 s per answer against ~0.7 s with one thread. The
``threads`` parameter sets it (null: the cores this process may use, or ``OMP_NUM_THREADS``
when the environment sets it). Every core stays fast on a busy machine only when OpenMP's idle
threads sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``), which must be in the environment before
torch is imported: ``pilot.settings`` sets it for every Kedro run (BENCHMARKS.md, "Threads: idle and
under load").
"""

from __future__ import annotations

import logging
import os
import resource
import sys

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count; returns the count set."""
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    count = requested or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else available_cores())
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    logger.info("torch uses %d CPU thread(s) (%s; OMP_WAIT_POLICY=%s).", count,
                "parameter 'threads'" if requested else "OMP_NUM_THREADS" if from_env else "cores available",
                os.environ.get("OMP_WAIT_POLICY", "unset"))
    return count


def peak_memory_gib() -> float:
    """The largest resident set this process has had so far, in GiB (0.0 where the OS does not say)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
