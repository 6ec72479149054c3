"""Process-wide settings of the compute (torch's CPU thread count) and its peak memory.

On a small machine the thread count matters a lot: measured on this project's 2-core machine, the
default run's first training step took 0.13 s with 2 threads and 0.19 s with 1 when the machine was
idle, but 0.57-2.4 s with 2 threads and 0.23-0.28 s with 1 beside one other busy job (OpenMP's
threads spin while they wait, and a spinning thread fights the other job for its core). So the
default (``threads: null``) shares the cores: :class:`CoreShare` keeps torch's thread count at the
cores that other processes leave free, re-read every second at the long loops' step boundaries
(:func:`share_cores`: training steps, generation batches, latent-cache batches). A ``threads``
parameter or ``OMP_NUM_THREADS`` fixes the count instead (BENCHMARKS.md, "Threads: idle and under
load").

The count changes the speed, never a result: every op a run computes gives the same bits at any
thread count. Measured op by op (BENCHMARKS.md, "Same numbers at any thread count"), a few of torch's
ops did not; :mod:`pilot.invariant` holds their stand-ins (attention with fewer queries than keys,
softmax, layer norm), whole-tensor sums over 32,768 elements or more are taken as norms or per-row sums,
and MKL's QR factorization runs on :func:`one_thread`. ``tests/test_same_numbers.py`` trains at 1 and 2
threads and under this policy beside a busy process, and finds the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def others_running(samples: int = 5, pause_s: float = 0.001) -> int | None:
    """How many threads of other processes want a core right now (None where /proc does not say).

    The kernel's count of runnable threads (``procs_running`` in ``/proc/stat``) less this process's
    own running threads, the median of a few samples a millisecond apart so one short-lived command
    does not count. It measures demand, not use: a job starved of its core by our threads still counts.
    """
    counts = []
    for index in range(samples):
        try:
            stat = Path("/proc/stat").read_text()
            running = int(stat.split("procs_running", 1)[1].split()[0])
            own = 0
            for task in os.scandir("/proc/self/task"):
                try:  # "tid (comm) S ...": the state follows the last parenthesis
                    own += Path(task.path, "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
                except (OSError, IndexError):  # the thread ended meanwhile
                    pass
        except (OSError, IndexError, ValueError):
            return None
        counts.append(max(0, running - own))
        if index + 1 < samples:
            time.sleep(pause_s)
    return round(statistics.median(counts))


class CoreShare:
    """Keeps torch's thread count at the cores other processes leave free (at least one).

    ``update()`` is cheap to call often: it reads the machine at most every ``interval_s``. It gives
    cores up at once when another job appears (spinning threads beside it cost 3-12x) and takes them
    back only when two readings in a row find them free (one thread too few costs 1.5x at most).
    """

    def __init__(self, cores: int, interval_s: float = 1.0,
                 read_others: Callable[[], int | None] = others_running) -> None:
        self.cores = cores
        self.interval_s = interval_s
        self.read_others = read_others
        self.checked = -float("inf")
        self.pending_rise = False

    def update(self, force: bool = False) -> int:
        now = time.monotonic()
        current = torch.get_num_threads()
        if not force and now - self.checked < self.interval_s:
            return current
        self.checked = now
        others = self.read_others()
        wanted = self.cores if others is None else max(1, min(self.cores, self.cores - others))
        rise_now = wanted > current and (force or self.pending_rise)
        self.pending_rise = wanted > current and not rise_now
        if wanted < current or rise_now:
            torch.set_num_threads(wanted)
            logger.debug("torch threads %d -> %d (%s other runnable thread(s))", current, wanted, others)
            return wanted
        return current


_share: CoreShare | None = None


def share_cores() -> None:
    """Adapt torch's thread count to the machine's load, where ``threads: null`` asked for it (cheap)."""
    if _share is not None:
        _share.update()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one torch thread, then restore the count.

    For the few ops whose bits depend on the thread count: MKL's LAPACK factorizations (``geqrf``, the QR
    behind an orthogonal parametrization's start) split their work by threads. Measured on torch 2.13's
    CPU wheel, a 128 x 128 QR differs between 1 and 2 threads, while matrix products, solves, norms,
    per-row and per-dimension reductions do not (BENCHMARKS.md, "Same numbers at any thread count").
    """
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op thread count; returns the count set.

    ``requested`` (the ``threads`` parameter) or ``OMP_NUM_THREADS`` fix it; with neither, the count
    follows the cores other processes leave free (:class:`CoreShare`), starting now.
    """
    global _share
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    fixed = requested or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else None)
    if fixed:
        _share = None
        if torch.get_num_threads() != fixed:
            torch.set_num_threads(fixed)
        count = fixed
    else:
        _share = CoreShare(available_cores())
        count = _share.update(force=True)
    logger.info("torch uses %d CPU thread(s) (%s).", count,
                "parameter 'threads'" if requested else "OMP_NUM_THREADS" if fixed else
                f"of {available_cores()} cores, the ones other processes leave free, re-read every second")
    return count


def thread_policy() -> str:
    """How this process sets torch's thread count, in words (an MLflow tag of every run)."""
    if _share is not None:
        return f"shared: the cores of {_share.cores} that other processes leave free (threads: null)"
    return f"fixed: {torch.get_num_threads()}"


def machine_record() -> dict[str, str]:
    """What a run's numbers depend on beyond its code, parameters and seed: torch's version and the
    CPU kernels it dispatches to. Measured here: the default run's student trained with torch's AVX2
    kernels (``ATEN_CPU_CAPABILITY=avx2``) leaves the AVX-512 run's losses at step 4, so a run repeats
    bit for bit on the same kind of CPU (at any thread count), not across kinds."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    record = {"torch": str(torch.__version__), "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
              "cpu": cpu, "platform": f"{platform.system()} {platform.machine()}"}
    if torch.cuda.is_available():
        record["cuda_device"] = torch.cuda.get_device_name()
    return record


def peak_memory_gib() -> float:
    """The largest resident set this process has had so far, in GiB (0.0 where the OS does not say)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
