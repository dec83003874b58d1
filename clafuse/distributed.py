"""Data-parallel finetuning across the processes that ``torchrun`` starts.

A process belongs to a torchrun launch when ``WORLD_SIZE`` (> 1), ``RANK`` and ``LOCAL_RANK`` are
set. Processes on CPU join a gloo process group; with CUDA, an nccl group with each process on
``cuda:LOCAL_RANK``. Everything here also works in a single process, where the collectives do
nothing, so the training code has one path.

Errors must not leave some ranks waiting in a collective for ranks that have stopped, and should be
printed once. Checks that fail the same way everywhere run inside :func:`same_on_every_rank`;
steps that may fail on one rank only (reading and writing files) run inside :func:`agree`, which
makes every rank stop together. Either way the rank that reports the error raises it, and the
others raise :class:`ReportedByPeer`, which the command line turns into a silent exit 2.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clafuse.errors import ClafuseError

if dist.is_available():
    # DistributedDataParallel imports this lazily; imported after init_process_group, its functions'
    # default ``group=group.WORLD`` arguments would keep the default process group alive after
    # destroy_process_group, and gloo's threads then abort some processes at exit.
    import torch.distributed.nn  # noqa: F401


class ReportedByPeer(ClafuseError):
    """This rank stops because of an error that another rank reports (rank 0 when all ranks fail
    the same way); the command line exits 2 without printing it again."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def device(self) -> torch.device:
        """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    @property
    def backend(self) -> str:
        """nccl on CUDA, gloo on the CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ClafuseError(f"environment variable {name} must be an integer, got {value!r}") from None


def launch_from_env() -> Launch | None:
    """The torchrun launch this process belongs to (``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``), or
    None for a single process."""
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return None
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if world < 1 or rank is None or not 0 <= rank < world:
        raise ClafuseError(f"WORLD_SIZE={world} needs RANK in [0, {world}) (start data-parallel runs with torchrun)")
    local = rank if local is None else local
    if local < 0 or (torch.cuda.is_available() and local >= torch.cuda.device_count()):
        raise ClafuseError(f"LOCAL_RANK={local} has no CUDA device (this machine has {torch.cuda.device_count()}); "
                           "start at most one process per GPU")
    return Launch(rank=rank, world_size=world, local_rank=local)


def env_rank() -> int:
    """This process's rank from the environment: 0 outside a torchrun launch (or if it is malformed)."""
    try:
        launch = launch_from_env()
    except ClafuseError:
        return 0
    return launch.rank if launch is not None else 0


def default_device(launch: Launch | None) -> torch.device:
    """The launch's device; for a single process ``cuda`` when available, else the CPU."""
    if launch is not None:
        return launch.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the running group (0 without one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the running group (1 without one)."""
    return dist.get_world_size() if active() else 1


@contextmanager
def process_group(launch: Launch | None) -> Iterator[None]:
    """Join the launch's process group for the body and destroy it afterwards, also on errors.

    Does nothing for a single process, or when the caller already runs a group (which it keeps).
    """
    if launch is None or (dist.is_available() and dist.is_initialized()):
        yield
        return
    device = launch.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(launch.backend, rank=launch.rank, world_size=launch.world_size,
                                device_id=device if device.type == "cuda" else None)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClafuseError(f"cannot join the process group of rank {launch.rank}: {first}") from None
    try:
        yield
    except Exception as exc:
        if isinstance(exc, ClafuseError) or not is_peer_failure(exc):
            raise
        message = f"lost contact with another process of the run, which stopped: {str(exc).split('. ')[0]}"
        raise (ClafuseError(message) if launch.rank == 0 else ReportedByPeer(message)) from None
    finally:
        dist.destroy_process_group()


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a collective whose peer has gone (crashed, stopped or unreachable)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or "closed by peer" in text or "reset by peer" in text


@contextmanager
def same_on_every_rank() -> Iterator[None]:
    """For checks that fail the same way on every rank (same inputs, same code path): rank 0 raises
    the error, the other ranks :class:`ReportedByPeer`, so it is printed once."""
    try:
        yield
    except ClafuseError as exc:
        own = dist.get_rank() if dist.is_available() and dist.is_initialized() else env_rank()
        if own == 0 or isinstance(exc, ReportedByPeer):
            raise
        raise ReportedByPeer(str(exc)) from None


@contextmanager
def agree() -> Iterator[None]:
    """Run a step that may fail on some ranks only, then stop every rank if any failed.

    The lowest failing rank raises its own error; the others raise :class:`ReportedByPeer`. A
    collective at the end of the body: every rank must enter it. A no-op for a single process.
    """
    if not active():
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
        error = exc
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
    failed = [r for r, report in enumerate(reports) if report is not None]
    if not failed:
        return
    if error is not None and failed[0] == dist.get_rank():
        raise error
    raise ReportedByPeer(f"rank {failed[0]} failed: {reports[failed[0]]}")


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sums over all ranks of ``values`` (in float64); the values themselves for a single process."""
    if not active():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def part(total: int, rank_: int, world: int) -> slice:
    """Rank ``rank_``'s contiguous share of ``total`` items; shares differ by at most one item and
    may be empty when ``total < world``."""
    return slice(total * rank_ // world, total * (rank_ + 1) // world)


class _AllReduceSum(torch.autograd.Function):
    """Sum over all ranks whose gradient is the sum of the ranks' gradients (each rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class GlobalBatchNorm(nn.Module):
    """Stands in for a BatchNorm layer under data parallelism: in training mode it normalises with
    the mean and (biased) variance of the global batch, all-reduced over the ranks in float64, and
    updates the running statistics with them, so outputs, gradients and statistics equal one
    process's on the whole batch. ``torch.nn.SyncBatchNorm`` does the same on GPUs only; this works
    with any backend. In eval mode it is the plain layer. Shares the parameters and buffers of
    ``bn`` (same names), so state dicts are unchanged."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps, self.momentum, self.track_running_stats = bn.eps, bn.momentum, bn.track_running_stats
        self.register_parameter("weight", bn.weight)
        self.register_parameter("bias", bn.bias)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                  self.running_mean is None, 0.0, self.eps)
        dims = [0, *range(2, x.ndim)]
        shape = [1, -1] + [1] * (x.ndim - 2)
        xf = x.float()
        count = xf.new_tensor([xf.numel() // max(xf.shape[1], 1)], dtype=torch.float64)
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims, dtype=torch.float64), count]))
        n = float(sums[-1].detach())
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} over all ranks")
        mean = (sums[:-1] / n).float()
        centred = xf - mean.view(shape)
        var = (_AllReduceSum.apply(centred.square().sum(dims, dtype=torch.float64)) / n).float()
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                factor = self.momentum
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    if factor is None:
                        factor = 1.0 / float(self.num_batches_tracked)
                factor = 0.0 if factor is None else factor
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * (n / (n - 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        return out.to(x.dtype)


def synchronise_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Replace every BatchNorm layer of ``model`` (in place) by a :class:`GlobalBatchNorm` sharing its
    tensors; returns what :func:`restore_batchnorm` needs to put the original layers back."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, GlobalBatchNorm(child))
                swaps.append((parent, name, child))
    return swaps


def restore_batchnorm(swaps: list[tuple[nn.Module, str, nn.Module]]) -> None:
    """Put back the layers that :func:`synchronise_batchnorm` replaced (they hold the trained values)."""
    for parent, name, original in reversed(swaps):
        setattr(parent, name, original)
