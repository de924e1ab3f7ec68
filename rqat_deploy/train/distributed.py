"""Multi-process helpers for ``torchrun``: process-group setup and teardown, rank queries, sharding.

Data-parallel stage 2 runs under PyTorch's own launcher and engine: ``torchrun`` starts one process
per device and sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them and opens the default process group (``nccl`` on CUDA, ``gloo``
on CPU); :mod:`rqat_deploy.train.stage2` then wraps the student in
:class:`torch.nn.parallel.DistributedDataParallel`. Nothing here moves tensors between processes
by itself beyond thin wrappers over ``torch.distributed`` collectives.

Every helper also works without a process group (a plain ``python`` run): rank 0 of a world of 1.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from rqat_deploy.errors import ConfigError

T = TypeVar("T")

#: how long :func:`wait_for_main` lets the other ranks wait while rank 0 works alone (stage 1,
#: teacher cache): far beyond the default collective timeout, which such work would exceed.
WAIT_TIMEOUT = timedelta(hours=72)
_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_wait_group: Any = None


def env_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` set by ``torchrun`` (0 when absent): the device index of this process."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main() -> bool:
    """Whether this is rank 0, the only process that writes files, logs and progress bars."""
    return rank() == 0


def backend_for(device: str | torch.device) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str | torch.device = "cpu", *, timeout: timedelta | None = None) -> bool:
    """Open the default process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``.

    On CUDA the process's current device becomes ``cuda:LOCAL_RANK``, so ``"cuda"`` means this
    process's own GPU.

    Args:
        device: the training device (``cpu``, ``cuda``); picks the backend (:func:`backend_for`).
        timeout: collective timeout (default: PyTorch's).

    Returns:
        ``True`` when this call opened the group (the caller then closes it with
        :func:`destroy_distributed`); ``False`` for a single process or a group opened elsewhere.

    Raises:
        ConfigError: ``WORLD_SIZE > 1`` without the rest of torchrun's environment, torch built
            without ``torch.distributed``, ``cuda:N`` other than this process's ``LOCAL_RANK``, or
            a CUDA device without CUDA.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={env_world_size()} but {missing} are not set: launch with torchrun --nproc_per_node N")
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run a single process (no torchrun)")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(device)!r} but CUDA is not available: pass --device cpu")
        if dev.index is not None and dev.index != local_rank():
            raise ConfigError(
                f"device {str(device)!r} under torchrun: pass --device cuda, each process uses cuda:LOCAL_RANK "
                f"(this one cuda:{local_rank()})"
            )
        torch.cuda.set_device(local_rank())
    kwargs: dict[str, Any] = {"backend": backend_for(dev)}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if dev.type == "cuda":
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(**kwargs)
    return True


def destroy_distributed() -> None:
    """Close the default process group (and the wait group) if one is open."""
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def wait_for_main() -> None:
    """A barrier that may last hours: the other ranks wait here while rank 0 works alone.

    Uses a CPU (``gloo``) group with :data:`WAIT_TIMEOUT`, created on first use (every rank must
    call this at the same point, like any collective).
    """
    global _wait_group
    if not is_distributed():
        return
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    dist.barrier(group=_wait_group)


def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``[a, b)`` of this rank's contiguous share of ``n`` items (sizes differ by at most one, rank 0 largest)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    a = r * base + min(r, extra)
    return a, a + base + (1 if r < extra else 0)


def shard(items: Sequence[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous slice of ``items``; the slices of all ranks, in rank order, are ``items``."""
    a, b = shard_bounds(len(items), rank_, world)
    return list(items[a:b])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place and return it (unchanged for a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
