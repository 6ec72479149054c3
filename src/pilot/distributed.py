"""Data-parallel training on ``torch.distributed``: N processes started by ``torchrun``, each
holding the frozen student and a shard of every batch; only the small trained module's gradients
cross processes (one all-reduce per step).

Why ``torch.distributed`` and not a framework over it: the trained module is a few hundred
thousand parameters beside a frozen student, and the training engine (:mod:`pilot.training.engine`)
already owns the loop; DDP's bucketing, Accelerate's wrapping or Ray Train's workers would each
take the loop away for no gain. ``torchrun`` gives the process start, the rendezvous across
machines and the "one worker died, stop the others" supervision; gloo runs on CPU (the tests),
nccl on GPUs.

The one rule every stage follows (so one process and N processes train the same numbers):

- A step's **global batch** is the batch one process would train on (``batch_size`` in the
  parameters; fixed when N changes). Rank r takes positions ``r, r + N, r + 2N, ...`` of it
  (:func:`shard`): the per-device batch is ``ceil(batch_size / N)`` or one less.
- Each rank's loss terms are its **additive share** of the global batch's term: summed over ranks
  they give the one-process value (a mean over examples is the rank's sum divided by the global
  count, :func:`global_count`). The engine sums gradients and logged values over ranks
  (:func:`all_reduce_sum`), so the update, the clipping norm and the history are the one-process
  ones, to float rounding.
- Only rank 0 writes: checkpoints, saved models, MLflow. Checkpoints hold no trace of N, so a run
  resumes with any number of processes.

Embarrassingly parallel work (plans, the latent cache, evaluation's answers) is dealt out in the
batches or shards one process would cut (:func:`my_batches`; batch b to rank ``b mod N``) and gathered
back in order (:func:`gather_batches`, :func:`gather_to_main`), so its outputs are one process's.

Without ``torchrun`` (no process group) every helper is the identity and :func:`world` is
``World(rank=0, size=1)``: the library runs exactly as before.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
Backend = Literal["auto", "gloo", "nccl"]
DEFAULT_TIMEOUT_S = 300  # a rank that stops answering fails the others after this long, never a hang


class DistributedSetupError(RuntimeError):
    """The process group could not be formed from the launcher's environment."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process group's rank and size; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_rank() -> int:
    """The rank ``torchrun`` gave this process (``RANK``), readable before the group exists; 0 without it."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of the group, or of the launch when the group is not formed yet; True in a plain process."""
    return world().is_main if dist.is_available() and dist.is_initialized() else launched_rank() == 0


def resolve_backend(backend: Backend = "auto") -> str:
    """``auto``: nccl when CUDA is available, else gloo."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise DistributedSetupError(f"Backend '{backend}' is not one of auto, gloo, nccl.")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedSetupError("Backend 'nccl' needs CUDA, which this machine lacks; use --backend gloo.")
    return backend


def init_from_env(backend: Backend = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    A plain process (no ``WORLD_SIZE``) forms no group and gets ``World(0, 1)``. With nccl each
    process takes the GPU ``LOCAL_RANK`` as its default CUDA device, so ``device: cuda`` in the
    parameters means "this rank's GPU". ``timeout_s`` bounds every collective: a rank that died
    makes the survivors fail within it instead of waiting forever.
    """
    if "WORLD_SIZE" not in os.environ:
        return World()
    if dist.is_initialized():
        return world()
    chosen = resolve_backend(backend)
    if chosen == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(chosen, timeout=datetime.timedelta(seconds=timeout_s))
    except (ValueError, RuntimeError) as error:
        raise DistributedSetupError(f"Could not join the process group ({error}); start this through torchrun "
                                    "(docs/distributed.md).") from error
    found = world()
    logger.info("Data-parallel process %d of %d (backend %s)", found.rank, found.size, chosen)
    return found


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ sharding
def shard(items: Sequence[T], current: World | None = None) -> list[T]:
    """This rank's part of a global batch: positions ``rank, rank + size, ...`` (all of it in one process)."""
    current = current or world()
    return list(items[current.rank::current.size])


def shard_positions(length: int, current: World | None = None) -> list[int]:
    """The positions in a global batch of ``length`` that :func:`shard` gives this rank."""
    current = current or world()
    return list(range(current.rank, length, current.size))


def per_device_batch(global_batch: int, size: int) -> int:
    """The most examples one of ``size`` processes holds of a global batch."""
    return math.ceil(global_batch / size)


def check_global_batch(global_batch: int, key: str, current: World | None = None) -> None:
    """Every rank needs at least one example of every batch."""
    current = current or world()
    if global_batch < current.size:
        raise ValueError(f"{key} is {global_batch}, fewer than the {current.size} data-parallel processes; "
                         f"raise it to at least {current.size} or start fewer processes.")


# ------------------------------------------------------------------------------ collectives
def _wire_device() -> torch.device:
    """Where collectives take their tensors: this rank's GPU with nccl, the CPU with gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum ``tensors`` over the ranks, in place, in one collective (a no-op in one process).

    Float64 on the wire for float32 values, so the sum does not depend on the reduction's order
    beyond float32 rounding of the final value."""
    current = world()
    if not current.parallel or not tensors:
        return
    device = _wire_device()
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for tensor in tensors:
        count = tensor.numel()
        tensor.copy_(flat[offset:offset + count].view_as(tensor).to(tensor.device, tensor.dtype))
        offset += count


def broadcast_from_main(tensors: Sequence[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (a no-op in one process)."""
    if not world().parallel:
        return
    for tensor in tensors:
        wire = tensor.detach().to(_wire_device())
        dist.broadcast(wire, src=0)
        with torch.no_grad():
            tensor.copy_(wire.to(tensor.device))


def global_count(local: float | int | torch.Tensor) -> float:
    """A count (examples, tokens) summed over the ranks: the denominator of a global mean."""
    value = torch.tensor([float(local)], dtype=torch.float64)
    all_reduce_sum([value])
    return float(value)


def all_gather_objects(value: T) -> list[T]:
    """Every rank's ``value`` (picklable plain data: strings, lists, numbers), in rank order."""
    current = world()
    if not current.parallel:
        return [value]
    gathered: list = [None] * current.size
    dist.all_gather_object(gathered, value)
    return gathered


def all_gather_rows(local: torch.Tensor, length: int) -> torch.Tensor:
    """The global batch's rows from every rank's :func:`shard` of them, back in global order
    (detached: for terms such as InfoNCE that compare a rank's rows with every other row)."""
    current = world()
    if not current.parallel:
        return local.detach()
    width = per_device_batch(length, current.size)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:len(local)] = local.detach()
    padded = padded.to(_wire_device())
    parts = [torch.empty_like(padded) for _ in range(current.size)]
    dist.all_gather(parts, padded)
    rows = torch.empty((length, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for rank, part in enumerate(parts):
        positions = list(range(rank, length, current.size))
        rows[positions] = part[:len(positions)].to(local.device)
    return rows


def with_own_rows(gathered: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``gathered`` (global order, detached) with this rank's rows replaced by ``local`` (live): a
    function of the whole batch whose gradient reaches this rank's rows only."""
    current = world()
    if not current.parallel:
        return local
    rows = gathered.clone()
    rows[shard_positions(len(gathered), current)] = local
    return rows


def replicated_share(value: torch.Tensor) -> torch.Tensor:
    """A term every rank computes whole (on the gathered batch, gradient through its own rows): its
    value becomes ``value / N`` (the ranks' values sum to it) while its gradient stays whole (the
    ranks' gradients, each through its own rows, sum to the one-process gradient)."""
    size = world().size
    if size == 1:
        return value
    return value - value.detach() * (1 - 1 / size)


def barrier() -> None:
    if world().parallel:
        dist.barrier()


def broadcast_object_from_main(value: T) -> T:
    """Rank 0's ``value`` (picklable plain data) on every rank; ``value`` itself in one process."""
    if not world().parallel:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: T) -> list[T] | None:
    """Every rank's ``value`` (picklable plain data, e.g. bytes), in rank order, on rank 0; None on the
    other ranks. ``[value]`` in one process."""
    current = world()
    if not current.parallel:
        return [value]
    gathered: list | None = [None] * current.size if current.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


# ------------------------------------------------------------------------------ embarrassingly parallel work
def my_batches(length: int, batch_size: int, current: World | None = None) -> list[range]:
    """This rank's batches of ``length`` items cut as one process cuts them (``[0, batch_size)``,
    ``[batch_size, 2 batch_size)``, ...): batch b goes to rank ``b mod N``. Every batch keeps one
    process's composition and shapes, so what a rank computes for it is what one process computes.
    All the batches in one process."""
    current = current or world()
    starts = range(0, length, batch_size)
    return [range(start, min(start + batch_size, length)) for number, start in enumerate(starts)
            if number % current.size == current.rank]


def gather_batches(mine: list[T], length: int, batch_size: int) -> list[T]:
    """Every batch's result on every rank, in batch order, from each rank's results for
    :func:`my_batches` (the identity in one process)."""
    current = world()
    if not current.parallel:
        return list(mine)
    parts = all_gather_objects(mine)
    count = -(-length // batch_size)
    return [parts[number % current.size][number // current.size] for number in range(count)]
