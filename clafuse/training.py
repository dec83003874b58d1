"""Evaluate and finetune any ``torch.nn.Module`` classifier on a :class:`~clafuse.data.Dataset`.

Inputs go to the model exactly as the dataset holds them; models that need flat vectors flatten
themselves. Model selection during finetuning uses the validation set only, never test data.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from clafuse import distributed as ddp
from clafuse.data import Dataset
from clafuse.errors import ClafuseError, DataError

SCHEDULES = ("cosine", "step", "constant")
OPTIMIZERS = ("sgd", "adamw")
AUGMENTATIONS = ("none", "crop", "crop-flip")
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
STATE_VERSION = 1


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _forward(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on one batch, turning a shape mismatch into a one-line DataError."""
    try:
        out = model(batch)
    except RuntimeError as exc:
        if ddp.is_peer_failure(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"the model cannot take inputs of shape {list(batch.shape[1:])}: {first}") from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"the model must return (batch, classes) logits, got {shape}")
    return out


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode without gradients, batched; returned on the CPU.

    The model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if len(x) == 0:
                return _forward(model, x.to(device)).cpu()
            outs = [
                _forward(model, x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(outs)


def _labels(ds: Dataset, num_outputs: int) -> torch.Tensor:
    if ds.y is None:
        raise DataError(f"{ds.name} has no labels, so accuracy cannot be measured")
    classes = ds.num_classes or 0
    if classes > num_outputs:
        raise DataError(f"{ds.name} has labels up to {classes - 1} but the model has only {num_outputs} outputs")
    return ds.y


def _metrics(log_probs: torch.Tensor, y: torch.Tensor) -> dict:
    return {
        "accuracy": float((log_probs.argmax(dim=1) == y).double().mean()),
        "loss": float(F.nll_loss(log_probs.double(), y)),
        "num_samples": int(len(y)),
    }


def evaluate(model: nn.Module, ds: Dataset, batch_size: int = 1024) -> dict:
    """Accuracy (fraction correct), mean cross-entropy ``loss`` and ``num_samples`` of ``model`` on ``ds``."""
    logits = predict_logits(model, ds.x, batch_size)
    y = _labels(ds, logits.shape[1])
    return _metrics(F.log_softmax(logits.double(), dim=1), y)


def evaluate_ensemble(models: Sequence[nn.Module], ds: Dataset, batch_size: int = 1024) -> dict:
    """Metrics of the prediction ensemble that averages the models' softmax probabilities.

    ``loss`` is the negative log-likelihood of the averaged probabilities.
    """
    if len(models) == 0:
        raise DataError("an ensemble needs at least one model")
    log_probs = []
    for model in models:
        logits = predict_logits(model, ds.x, batch_size)
        if log_probs and logits.shape[1] != log_probs[0].shape[1]:
            raise DataError(
                f"ensemble members disagree on the number of classes ({log_probs[0].shape[1]} vs {logits.shape[1]})"
            )
        log_probs.append(F.log_softmax(logits.double(), dim=1))
    y = _labels(ds, log_probs[0].shape[1])
    mean_log_prob = torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(log_probs))
    return _metrics(mean_log_prob, y)


@dataclass
class FinetuneConfig:
    """Finetuning settings. ``cosine`` decays per step to 0 over all steps; ``step`` multiplies the
    rate by 0.1 at half and at three quarters of the epochs; ``warmup_steps`` ramps linearly first.

    ``optimizer`` is ``sgd`` (with ``momentum``/``nesterov``) or ``adamw`` (default betas; momentum
    and nesterov do not apply). ``kd_alpha`` and ``kd_temperature`` only matter when a teacher is
    given: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y).
    ``augment``: ``none``, ``crop`` (random crop after zero padding of 2 pixels, 4 for inputs of 28
    pixels or more) or ``crop-flip`` (plus random horizontal flips), for (N, C, H, W) images.
    ``precision``: ``fp32``, or ``bf16``/``fp16`` autocast for forward passes (weights and optimizer
    stay fp32; fp16 needs CUDA and scales the loss with a GradScaler)."""

    epochs: int
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int = 64
    schedule: str = "cosine"
    warmup_steps: int = 0
    seed: int = 0
    optimizer: str = "sgd"
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    augment: str = "none"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise DataError(f"epochs must be a positive integer, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DataError(f"learning rate must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise DataError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise DataError("nesterov momentum needs momentum > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise DataError(f"weight decay must be non-negative, got {self.weight_decay}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DataError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise DataError(f"unknown schedule {self.schedule!r} (valid: {', '.join(SCHEDULES)})")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise DataError(f"warmup steps must be a non-negative integer, got {self.warmup_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise DataError(f"unknown optimizer {self.optimizer!r} (valid: {', '.join(OPTIMIZERS)})")
        if self.nesterov and self.optimizer != "sgd":
            raise DataError("nesterov momentum applies to the sgd optimizer only")
        if not (math.isfinite(self.label_smoothing) and 0 <= self.label_smoothing < 1):
            raise DataError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not (math.isfinite(self.kd_alpha) and 0 <= self.kd_alpha <= 1):
            raise DataError(f"distillation alpha must be in [0, 1], got {self.kd_alpha}")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise DataError(f"distillation temperature must be positive, got {self.kd_temperature}")
        if self.augment not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {self.augment!r} (valid: {', '.join(AUGMENTATIONS)})")
        if self.precision not in PRECISIONS:
            raise DataError(f"unknown precision {self.precision!r} (valid: {', '.join(PRECISIONS)})")

    def lr_at(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """Learning rate for global step ``step`` (0-based) of ``total_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "cosine":
            span = max(total_steps - self.warmup_steps, 1)
            return 0.5 * self.lr * (1 + math.cos(math.pi * (step - self.warmup_steps) / span))
        if self.schedule == "step":
            epoch = step // steps_per_epoch
            if self.epochs == 1:
                return self.lr
            drops = int(epoch >= self.epochs // 2) + int(epoch >= (3 * self.epochs) // 4)
            return self.lr * 0.1**drops
        return self.lr


@dataclass
class FinetuneResult:
    """``best_state``: CPU copy of the weights at ``best_epoch`` (1-based; best val accuracy, earliest on
    ties; the last epoch without val). ``history``: one dict per epoch."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    history: list[dict] = field(default_factory=list)


def _num_batches(n: int, batch_size: int) -> int:
    count = -(-n // batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one sample is dropped (batch norm cannot train on it)."""
    perm = torch.randperm(n, generator=gen)
    return list(perm.split(batch_size))[: _num_batches(n, batch_size)]


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Randomly crop (after zero padding) and, for ``crop-flip``, horizontally flip each image of an
    (N, C, H, W) batch. Random numbers come from the CPU generator ``gen``; ``none`` draws nothing."""
    return _augment_part(x, mode, gen, len(x) if x.ndim else 0, slice(None))


def _augment_part(x: torch.Tensor, mode: str, gen: torch.Generator, total: int, rows: slice) -> torch.Tensor:
    """Augment ``x``, the ``rows`` of a batch of ``total`` images: the random numbers are drawn for the
    whole batch, so every rank of a data-parallel run draws the same and each image gets what it
    would get in one process."""
    if mode == "none":
        return x
    if mode not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {mode!r} (valid: {', '.join(AUGMENTATIONS)})")
    if x.ndim != 4:
        raise DataError(f"augmentation needs image batches shaped (N, C, H, W), got {list(x.shape)}")
    n, _, h, w = x.shape
    pad = 4 if min(h, w) >= 28 else 2
    off_y = torch.randint(0, 2 * pad + 1, (total,), generator=gen)[rows].to(x.device)
    off_x = torch.randint(0, 2 * pad + 1, (total,), generator=gen)[rows].to(x.device)
    flip = (torch.rand(total, generator=gen)[rows] < 0.5).to(x.device) if mode == "crop-flip" else None
    padded = F.pad(x, (pad, pad, pad, pad))
    rows_idx = off_y[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = off_x[:, None] + torch.arange(w, device=x.device)  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows_idx[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip is not None:
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, alpha: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, y)``."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                  reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student, y, label_smoothing=label_smoothing)


def _make_optimizer(params: list[torch.Tensor], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ClafuseError unless ``precision`` can run on ``device``: fp16 autocast needs CUDA (on the
    CPU it is slow and loses accuracy), bf16 on CUDA a GPU that supports it."""
    if precision not in PRECISIONS:
        raise ClafuseError(f"unknown precision {precision!r} (valid: {', '.join(PRECISIONS)})")
    if precision == "fp16" and device.type != "cuda":
        raise ClafuseError(f"precision fp16 needs a CUDA GPU (this run is on {device.type}); use bf16 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ClafuseError("this GPU does not support bf16; use precision fp16")


def save_train_state(path, state: dict) -> None:
    """Write a training state (from ``finetune``'s ``on_state``) atomically with ``torch.save``."""
    from clafuse.io.atomic import atomic_output

    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def load_train_state(path) -> dict:
    """Read a training state written by :func:`save_train_state` (plain tensors and containers only)."""
    from clafuse.errors import ClafuseError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ClafuseError(f"no training state to resume at {path}") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing error
        raise ClafuseError(f"cannot read training state {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ClafuseError(f"{path} is not a clafuse training state (version {STATE_VERSION})")
    return state


def _evaluate_sharded(model: nn.Module, ds: Dataset, rank: int, world: int) -> dict:
    """:func:`evaluate` in a data-parallel run: each rank predicts its part of ``ds`` and the loss and
    correct counts are summed over the ranks, so every rank gets the same metrics."""
    rows = ddp.part(len(ds), rank, world)
    logits = predict_logits(model, ds.x[rows])
    y = _labels(ds, logits.shape[1])[rows]
    log_probs = F.log_softmax(logits.double(), dim=1)
    nll, correct = ddp.all_reduce_sum([float(F.nll_loss(log_probs, y, reduction="sum")),
                                       int((log_probs.argmax(dim=1) == y).sum())])
    return {"accuracy": correct / len(ds), "loss": nll / len(ds), "num_samples": len(ds)}


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
    world, rank = ddp.world_size(), ddp.rank()
    device = _device_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    with ddp.same_on_every_rank():
        if train.y is None:
            raise DataError(f"{train.name} has no labels, so it cannot be used for training")
        if len(train) < 2:
            raise DataError(f"{train.name} needs at least 2 samples for training")
        if not params:
            raise DataError("the model has no trainable parameters")
        if config.augment != "none" and train.x.ndim != 4:
            raise DataError(f"augmentation needs images shaped (N, C, H, W), {train.name} has "
                            f"{list(train.x.shape[1:])}")
        check_precision(config.precision, device)
        if resume_from is not None:
            saved = resume_from.get("config")
            if isinstance(saved, dict):
                saved = {"precision": "fp32", **saved}  # states written before precision existed
            if saved != asdict(config):
                diff = sorted(k for k in asdict(config)
                              if not isinstance(saved, dict) or saved.get(k) != asdict(config)[k])
                raise DataError(f"the training state was saved with different settings ({', '.join(diff)}); "
                                "resume with the same settings")
            if resume_from.get("num_train") != len(train) or resume_from.get("distill") != (teacher is not None):
                raise DataError("the training state was saved for different training data or teacher")
            saved_world = int(resume_from.get("world_size", 1))
            if saved_world != world:
                raise DataError(f"the training state was saved by {saved_world} process(es); resume it with as "
                                f"many (this run has {world})")
    optimizer = _make_optimizer(params, config)
    steps_per_epoch = _num_batches(len(train), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    fork_devices = [device] if device.type == "cuda" else []
    amp_dtype = _AUTOCAST.get(config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )

    history: list[dict] = []
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, best_acc = 0, -1.0
    first_epoch, step = 1, 0
    was_training = model.training
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    swaps: list = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed if rank == 0 else (config.seed + rank) % 2**64)
        gen = torch.Generator().manual_seed(config.seed)
        if resume_from is not None:
            model.load_state_dict(resume_from["model"])
            optimizer.load_state_dict(resume_from["optimizer"])
            rng_cpu, rng_cuda = (resume_from["rng_ranks"][rank] if "rng_ranks" in resume_from
                                 else (resume_from["rng_cpu"], resume_from.get("rng_cuda")))
            torch.set_rng_state(rng_cpu)
            gen.set_state(resume_from["rng_generator"])
            if device.type == "cuda" and rng_cuda is not None:
                torch.cuda.set_rng_state(rng_cuda, device)
            if scaler.is_enabled() and resume_from.get("scaler"):
                scaler.load_state_dict(resume_from["scaler"])
            history = [dict(h) for h in resume_from["history"]]
            best_state = dict(resume_from["best_state"])
            best_epoch, best_acc = int(resume_from["best_epoch"]), float(resume_from["best_acc"])
            first_epoch, step = int(resume_from["epoch"]) + 1, int(resume_from["step"])
        task = bar.add_task("", total=steps_per_epoch, loss=float("nan")) if bar is not None else None
        if bar is not None:
            bar.start()
        try:
            net = model
            if world > 1:
                from torch.nn.parallel import DistributedDataParallel

                swaps = ddp.synchronise_batchnorm(model)
                net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            checked = False
            for epoch in range(first_epoch, config.epochs + 1):
                started = time.perf_counter()
                if bar is not None:
                    bar.reset(task, description=f"epoch {epoch}/{config.epochs}", loss=float("nan"))
                net.train()
                loss_sum, correct, seen, lr = 0.0, 0, 0, config.lr
                for idx in _batches(len(train), config.batch_size, gen):
                    lr = config.lr_at(step, total_steps, steps_per_epoch)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    rows = ddp.part(len(idx), rank, world)
                    local = idx[rows]
                    xb, yb = train.x[local].to(device), train.y[local].to(device)
                    xb = _augment_part(xb, config.augment, gen, len(idx), rows)
                    with ddp.same_on_every_rank():
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            logits = _forward(net, xb)
                            if teacher is not None:
                                with torch.no_grad():
                                    t_logits = _forward(teacher, xb.to(_device_of(teacher))).to(logits.device)
                        logits = logits.float()
                        if not checked:
                            _labels(train, logits.shape[1])
                            if val is not None:
                                _labels(val, logits.shape[1])
                            checked = True
                        if teacher is not None and t_logits.shape[1] != logits.shape[1]:
                            raise DataError(f"the teacher has {t_logits.shape[1]} classes but the student "
                                            f"has {logits.shape[1]}")
                    if len(local) == 0:
                        loss = logits.sum() * 0.0  # an empty part still takes part in the gradient all-reduce
                    elif teacher is not None:
                        loss = distillation_loss(logits, t_logits.float(), yb, config.kd_alpha,
                                                 config.kd_temperature, config.label_smoothing)
                    else:
                        loss = F.cross_entropy(logits, yb, label_smoothing=config.label_smoothing)
                    value = float(loss.detach())
                    batch_correct = int((logits.detach().argmax(dim=1) == yb).sum())
                    if world > 1:
                        batch_loss, batch_correct = ddp.all_reduce_sum([value * len(local), batch_correct])
                        value, batch_correct = batch_loss / len(idx), int(batch_correct)
                        loss = loss * (world * len(local) / len(idx))
                    if not math.isfinite(value):
                        with ddp.same_on_every_rank():
                            raise DataError(f"training diverged in epoch {epoch} (loss {value}); "
                                            "lower the learning rate")
                    optimizer.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():
                        # DDP's harmless notice for conv weights with one input channel, whose size-1
                        # dimension has another stride in the gradient than in the weight.
                        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
                        scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    step += 1
                    loss_sum += value * len(idx)
                    correct += batch_correct
                    seen += len(idx)
                    if bar is not None:
                        bar.update(task, advance=1, loss=loss_sum / seen)
                train_loss = loss_sum / seen
                record = {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "train_accuracy": correct / seen,
                    "val_loss": None,
                    "val_accuracy": None,
                    "lr": lr,
                    "seconds": 0.0,
                }
                if val is not None:
                    metrics = evaluate(model, val) if world == 1 else _evaluate_sharded(model, val, rank, world)
                    record["val_loss"], record["val_accuracy"] = metrics["loss"], metrics["accuracy"]
                    if metrics["accuracy"] > best_acc:
                        best_acc, best_epoch, best_state = metrics["accuracy"], epoch, _state_copy(model)
                record["seconds"] = time.perf_counter() - started
                history.append(record)
                rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
                rng_ranks = ddp.all_gather_object([torch.get_rng_state(), rng_cuda])
                with ddp.agree():
                    if on_state is not None:
                        on_state({
                            "version": STATE_VERSION,
                            "config": asdict(config),
                            "num_train": len(train),
                            "distill": teacher is not None,
                            "world_size": world,
                            "epoch": epoch,
                            "step": step,
                            "model": _state_copy(model),
                            "optimizer": copy.deepcopy(optimizer.state_dict()),
                            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                            "rng_cpu": rng_ranks[0][0],
                            "rng_cuda": rng_ranks[0][1],
                            "rng_ranks": rng_ranks,
                            "rng_generator": gen.get_state(),
                            "best_state": best_state,
                            "best_epoch": best_epoch,
                            "best_acc": best_acc,
                            "history": [dict(h) for h in history],
                        })
                    if on_epoch is not None:
                        on_epoch(record)
        finally:
            ddp.restore_batchnorm(swaps)
            if bar is not None:
                bar.stop()
            model.train(was_training)
            if teacher is not None:
                teacher.train(teacher_was_training)
    if val is None:
        best_epoch, best_state = config.epochs, _state_copy(model)
    return FinetuneResult(best_state=best_state, best_epoch=best_epoch, history=history)
