"""``finetune``: the training loop, in one process or data parallel under torchrun.

:func:`finetune` trains a classifier; :func:`finetune_objective` runs the same loop for any
:class:`~clafuse.training.objectives.Objective` (data, loss, validation metric). It checks its
inputs, then a :class:`_Trainer` restores a saved state if given and
runs the epochs; each epoch trains on shuffled batches, validates, and hands the training state
and the epoch's metrics to the caller's callbacks.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from clafuse import distributed as ddp
from clafuse.data import Dataset
from clafuse.errors import DataError
from clafuse.training.batches import num_batches, shuffled_batches
from clafuse.training.config import AUTOCAST, FinetuneConfig, FinetuneResult, check_precision, make_optimizer
from clafuse.training.evaluation import device_of
from clafuse.training.objectives import Classification, Objective
from clafuse.training.state import STATE_VERSION, state_copy


def finetune(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None,
    config: FinetuneConfig,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = False,
    teacher: nn.Module | None = None,
    on_state: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> FinetuneResult:
    """Train ``model`` in place (cross-entropy, or distillation from ``teacher``) and keep the weights of
    the best validation epoch.

    Runs are deterministic for a given ``config.seed``; the caller's global RNG state is restored after.
    The model is left with its final-epoch weights; load ``result.best_state`` to use the best one.
    Each epoch's dict (epoch, train_loss, train_accuracy, val_loss and val_accuracy or None without
    val, lr of the epoch's last step, seconds) is passed to ``on_epoch`` while the model still holds
    that epoch's weights; ``progress`` shows a per-epoch bar on stderr.

    ``teacher`` (kept in eval mode, without gradients, its mode restored after) turns the loss into
    :func:`distillation_loss` with ``config.kd_alpha`` and ``config.kd_temperature``.
    ``on_state`` receives, after every epoch and before ``on_epoch``, the full training state (weights,
    optimizer, RNG states, best so far, history; plain tensors and containers, see
    :func:`save_train_state`). Passing such a state as ``resume_from`` continues that run: the result
    equals that of an uninterrupted run with the same config, which must match the saved one.

    Data parallel: while a ``torch.distributed`` group of several processes runs, every rank calls
    this with the same arguments and a copy of the model on its device. Every global batch of
    ``config.batch_size`` (shuffled and augmented alike on all ranks from ``config.seed``) is split
    into contiguous per-rank parts; the model trains under DistributedDataParallel, which averages
    the ranks' gradients, so each rank's mean loss is weighted by ``world * part / batch``: the
    gradient is that of the global batch in one process, for any batch size. BatchNorm layers use
    the global batch's statistics (:class:`~clafuse.distributed.GlobalBatchNorm`). Validation is
    sharded and all-reduced; dropout draws from the global RNG seeded with ``seed + rank``. Pass the
    callbacks on one rank to write things once; a state can only be resumed by as many processes.
    """
    return finetune_objective(model, Classification(train, val, config, teacher), config, on_epoch=on_epoch,
                              progress=progress, teacher=teacher, on_state=on_state, resume_from=resume_from)


def finetune_objective(
    model: nn.Module,
    objective: Objective,
    config: FinetuneConfig,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = False,
    teacher: nn.Module | None = None,
    on_state: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> FinetuneResult:
    """:func:`finetune` for any :class:`~clafuse.training.objectives.Objective`: the same loop,
    schedule, data parallelism, saved states and best-epoch selection (on ``val_<metric>``).
    ``teacher`` is only put in eval mode for the run (the objective uses it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with ddp.same_on_every_rank():
        objective.check(config)
        if not params:
            raise DataError("the model has no trainable parameters")
        check_precision(config.precision, device_of(model))
        if resume_from is not None:
            _check_resumable(resume_from, len(objective), config, objective.distill)
    trainer = _Trainer(model, objective, config, params)
    bar = _progress_bar() if progress else None
    fork_devices = [trainer.device] if trainer.device.type == "cuda" else []
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed if trainer.rank == 0 else (config.seed + trainer.rank) % 2**64)
        run = trainer.restore(resume_from) if resume_from is not None else _Progress()
        task = bar.add_task("", total=trainer.steps_per_epoch, loss=float("nan")) if bar is not None else None
        if bar is not None:
            bar.start()
        try:
            trainer.wrap_data_parallel()
            for epoch in range(run.first_epoch, config.epochs + 1):
                started = time.perf_counter()
                if bar is not None:
                    bar.reset(task, description=f"epoch {epoch}/{config.epochs}", loss=float("nan"))
                record = trainer.train_epoch(epoch, run, (bar, task) if bar is not None else None)
                trainer.validate(epoch, run, record)
                record["seconds"] = time.perf_counter() - started
                run.history.append(record)
                rng_ranks = trainer.gather_rng_states()
                with ddp.agree():
                    if on_state is not None:
                        on_state(trainer.state(epoch, run, rng_ranks))
                    if on_epoch is not None:
                        on_epoch(record)
        finally:
            ddp.restore_batchnorm(trainer.swaps)
            if bar is not None:
                bar.stop()
            model.train(was_training)
            if teacher is not None:
                teacher.train(teacher_was_training)
    if not objective.has_val():
        run.best_epoch, run.best_state = config.epochs, state_copy(model)
    return FinetuneResult(best_state=run.best_state, best_epoch=run.best_epoch, history=run.history)


def _check_resumable(saved_state: dict, num_train: int, config: FinetuneConfig, distill: bool) -> None:
    """Refuse a training state saved with other settings, data, teacher or number of processes."""
    saved = saved_state.get("config")
    if isinstance(saved, dict):
        saved = {"precision": "fp32", **saved}  # states written before precision existed
    if saved != asdict(config):
        diff = sorted(k for k in asdict(config)
                      if not isinstance(saved, dict) or saved.get(k) != asdict(config)[k])
        raise DataError(f"the training state was saved with different settings ({', '.join(diff)}); "
                        "resume with the same settings")
    if saved_state.get("num_train") != num_train or saved_state.get("distill") != distill:
        raise DataError("the training state was saved for different training data or teacher")
    saved_world = int(saved_state.get("world_size", 1))
    if saved_world != ddp.world_size():
        raise DataError(f"the training state was saved by {saved_world} process(es); resume it with as "
                        f"many (this run has {ddp.world_size()})")


def _progress_bar():
    """A per-epoch progress bar on stderr (rich), with the running training loss."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


@dataclass
class _Progress:
    """Where a run stands: its epochs so far, the best one, and the next epoch and global step."""

    history: list[dict] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    best_epoch: int = 0
    best_acc: float = -1.0
    first_epoch: int = 1
    step: int = 0


class _Trainer:
    """The fixed parts of one finetuning run (model, data, optimizer, loss scaler, batch generator)
    and the steps of an epoch: training, validation and the state to save."""

    def __init__(self, model: nn.Module, objective: Objective, config: FinetuneConfig,
                 params: list[torch.Tensor]) -> None:
        self.model, self.net, self.objective, self.config = model, model, objective, config
        self.world, self.rank = ddp.world_size(), ddp.rank()
        self.device = device_of(model)
        self.optimizer = make_optimizer(params, config)
        self.steps_per_epoch = num_batches(len(objective), config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.amp_dtype = AUTOCAST.get(config.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        self.gen = torch.Generator().manual_seed(config.seed)
        self.swaps: list = []

    def restore(self, saved: dict) -> _Progress:
        """Load a saved state's weights, optimizer, scaler and random states; return its progress."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        rng_cpu, rng_cuda = (saved["rng_ranks"][self.rank] if "rng_ranks" in saved
                             else (saved["rng_cpu"], saved.get("rng_cuda")))
        torch.set_rng_state(rng_cpu)
        self.gen.set_state(saved["rng_generator"])
        if self.device.type == "cuda" and rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, self.device)
        if self.scaler.is_enabled() and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        return _Progress(history=[dict(h) for h in saved["history"]], best_state=dict(saved["best_state"]),
                         best_epoch=int(saved["best_epoch"]), best_acc=float(saved["best_acc"]),
                         first_epoch=int(saved["epoch"]) + 1, step=int(saved["step"]))

    def wrap_data_parallel(self) -> None:
        """Under several processes, train through DistributedDataParallel with global-batch BatchNorm
        (``self.swaps`` records the BatchNorm layers to put back)."""
        if self.world <= 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        self.swaps = ddp.synchronise_batchnorm(self.model)
        self.net = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def train_epoch(self, epoch: int, run: _Progress, bar: tuple | None) -> dict:
        """One pass over the shuffled training batches; the epoch's record without validation."""
        self.net.train()
        loss_sum, metric_sum, seen, lr = 0.0, 0.0, 0, self.config.lr
        for idx in shuffled_batches(len(self.objective), self.config.batch_size, self.gen):
            lr = self.config.lr_at(run.step, self.total_steps, self.steps_per_epoch)
            value, batch_metric = self._train_step(idx, lr, epoch)
            run.step += 1
            loss_sum += value * len(idx)
            metric_sum += batch_metric
            seen += len(idx)
            if bar is not None:
                bar[0].update(bar[1], advance=1, loss=loss_sum / seen)
        metric = self.objective.metric
        return {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            f"train_{metric}": metric_sum / seen,
            "val_loss": None,
            f"val_{metric}": None,
            "lr": lr,
            "seconds": 0.0,
        }

    def _train_step(self, idx: torch.Tensor, lr: float, epoch: int) -> tuple[float, float]:
        """One optimizer step on the global batch ``idx`` (this rank's part of it); returns the batch's
        mean loss and the sum of the per-sample metric over all ranks."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        rows = ddp.part(len(idx), self.rank, self.world)
        local = idx[rows]
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        loss, batch_metric = self.objective.batch_loss(self.net, local, rows, len(idx), self.gen, autocast)
        value = float(loss.detach())
        if self.world > 1:
            batch_loss, batch_metric = ddp.all_reduce_sum([value * len(local), batch_metric])
            value = batch_loss / len(idx)
            loss = loss * (self.world * len(local) / len(idx))
        if not math.isfinite(value):
            with ddp.same_on_every_rank():
                raise DataError(f"training diverged in epoch {epoch} (loss {value}); "
                                "lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # DDP's harmless notice for conv weights with one input channel, whose size-1
            # dimension has another stride in the gradient than in the weight.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return value, batch_metric

    def validate(self, epoch: int, run: _Progress, record: dict) -> None:
        """Fill in the epoch's validation metrics (sharded over the ranks) and keep the best weights."""
        if not self.objective.has_val():
            return
        metrics, name = self.objective.validate(self.model, self.rank, self.world), self.objective.metric
        record["val_loss"], record[f"val_{name}"] = metrics["loss"], metrics[name]
        if metrics[name] > run.best_acc:
            run.best_acc, run.best_epoch, run.best_state = metrics[name], epoch, state_copy(self.model)

    def gather_rng_states(self) -> list:
        """Every rank's [CPU, CUDA or None] random state; every rank must call this together."""
        rng_cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return ddp.all_gather_object([torch.get_rng_state(), rng_cuda])

    def state(self, epoch: int, run: _Progress, rng_ranks: list) -> dict:
        """The full training state after ``epoch`` (see :func:`finetune`), with the ranks' random states."""
        return {
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "num_train": len(self.objective),
            "distill": self.objective.distill,
            "world_size": self.world,
            "epoch": epoch,
            "step": run.step,
            "model": state_copy(self.model),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng_cpu": rng_ranks[0][0],
            "rng_cuda": rng_ranks[0][1],
            "rng_ranks": rng_ranks,
            "rng_generator": self.gen.get_state(),
            "best_state": run.best_state,
            "best_epoch": run.best_epoch,
            "best_acc": run.best_acc,
            "history": [dict(h) for h in run.history],
        }
