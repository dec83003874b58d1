"""``finetune``: train a checkpoint (optionally distilling a teacher) and keep its best epoch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

import clafuse
from clafuse.api.models import LoadedModel, check_fits, load_model, refuse_nonfinite, spec_metadata
from clafuse import progress as progress_steps
from clafuse.api.common import load_data
from clafuse.data import has_val_split
from clafuse.data.normalize import Normalization
from clafuse.errors import ClafuseError, DataError
from clafuse.io.atomic import NAME_MAX, AtomicGroup
from clafuse.io.checkpoint import output_format, save_checkpoint
from clafuse.io.keys import KeyMap
from clafuse.io.outputs import Output, checkpoint_output, plan_outputs
from clafuse.io.wrapper import check_keep_wrapper, in_input_form, save_in_input_form
from clafuse.options import Augmentation, Optimizer, Precision, Schedule
from clafuse.training.objectives import Ensemble


def train_state_path(out: str | os.PathLike) -> Path:
    """Where ``finetune_checkpoint`` keeps the training state of a run writing ``out``: ``OUT.state.pt``,
    or, where that name would be too long for the file system, ``.OUT-PREFIX~DIGEST.state.pt``."""
    out = Path(out)
    name = f"{out.name}.state.pt"
    if len(os.fsencode(name)) <= NAME_MAX:
        return out.with_name(name)
    digest = hashlib.sha256(os.fsencode(out.name)).hexdigest()[:12]
    return out.with_name(f".{os.fsdecode(os.fsencode(out.name)[:NAME_MAX - 32])}~{digest}.state.pt")


def untimed_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epochs' records without their wall-clock ``seconds``: what the output's metadata keeps,
    so that the same run always writes the same bytes."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


def _teacher(student: LoadedModel, path: Any, arch: Any, keys: KeyMap | None, x: torch.Tensor, student_path: str,
             data: str) -> LoadedModel:
    """A teacher checkpoint, checked to read ``x`` and to predict the student's classes."""
    teacher = load_model(path, arch, keys=keys)
    check_fits(teacher, x, f"teacher {path} on data {data}")
    with torch.no_grad():
        probe = x[:2]
        student_classes = student.family.forward(student.spec, student.state_dict, probe).shape[-1]
        teacher_classes = teacher.family.forward(teacher.spec, teacher.state_dict, probe).shape[-1]
    if student_classes != teacher_classes:
        raise DataError(f"teacher {path} has {teacher_classes} classes but the student {student_path} has "
                        f"{student_classes}")
    return teacher


def finetune_checkpoint(path: str | os.PathLike, out: str | os.PathLike, *, data: str, val: str | None = None,
                        epochs: int = 1, lr: float = 0.01, momentum: float = 0.9, batch_size: int = 64,
                        schedule: Schedule = "cosine", weight_decay: float = 0.0, seed: int = 0,
                        arch: str | os.PathLike | None = None, progress: bool = False,
                        optimizer: Optimizer = "sgd", nesterov: bool = False, warmup_steps: int = 0,
                        label_smoothing: float = 0.0, augment: Augmentation = "none",
                        teacher: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                        teacher_arch: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                        kd_alpha: float = 0.5, kd_temperature: float = 4.0,
                        metrics_out: str | os.PathLike | None = None, plot: str | os.PathLike | None = None,
                        resume: bool = False, precision: Precision = "fp32", keys: KeyMap | None = None,
                        keep_wrapper: bool = False, normalize: str | None = None,
                        allow_nonfinite: bool = False) -> dict[str, Any]:
    """Finetune a checkpoint and write the epoch with the best validation accuracy (never selected on
    test data) to ``out``, in the input's key names and dtypes.

    With ``teacher`` the student is distilled from that checkpoint (same classes, same inputs), or
    from the ensemble of several (their mean softmax prediction; ``teacher_arch`` then one spec
    file per teacher).
    The training state is saved to :func:`train_state_path` after every epoch and removed once
    ``out`` is written; ``resume`` continues an interrupted run from it (same settings required).
    ``metrics_out`` gets one JSON line per epoch as training goes; ``plot`` a PNG of the curves.
    ``precision`` ``bf16``/``fp16`` runs the forward passes under autocast (fp16 needs CUDA).
    ``keys`` is the key handling of the input (and teacher); ``keep_wrapper`` writes ``out`` in the
    input's own form (:mod:`clafuse.io.wrapper`). The output's metadata holds no timings, so two
    identical runs write identical bytes; the seconds per epoch are in the report and metrics.
    ``normalize`` (``--normalize`` text) standardises the training and validation inputs.
    Checkpoint, metrics and plot appear together when the run completes; a run that fails leaves
    the previous files as they were and removes the training state it wrote (an interrupted one
    keeps it for ``resume``). Weights holding NaN or Inf, read or about to be written, are refused
    unless ``allow_nonfinite``.

    Training runs on CUDA when available (``cuda:LOCAL_RANK``), else on the CPU. Started by torchrun
    with several processes, the run is data parallel (see :func:`clafuse.training.finetune`):
    ``batch_size`` is the global batch, every rank reads the inputs itself, and rank 0 alone writes
    ``out``, the metrics, the plot and the training state (and reads it to resume); every rank
    returns the same report.
    """
    from clafuse import distributed as ddp
    from clafuse.training import FinetuneConfig, check_precision, finetune, load_train_state, save_train_state

    teachers = _listed(teacher)
    teacher_archs = _listed(teacher_arch)
    if teacher_archs and len(teacher_archs) != len(teachers):
        raise ClafuseError(f"{len(teacher_archs)} --teacher-arch for {len(teachers)} --teacher: give one per teacher")
    with ddp.same_on_every_rank():
        launch = ddp.launch_from_env()
        device = ddp.default_device(launch)
        config = FinetuneConfig(epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size, schedule=schedule,
                                weight_decay=weight_decay, seed=seed, optimizer=optimizer, nesterov=nesterov,
                                warmup_steps=warmup_steps, label_smoothing=label_smoothing, augment=augment,
                                kd_alpha=kd_alpha, kd_temperature=kd_temperature, precision=precision)
        check_precision(precision, device)
        norm = Normalization.parse(normalize)
        output_format(out)
    with ddp.process_group(launch):
        main = ddp.rank() == 0
        state_file = train_state_path(out)
        resume_from = None
        with ddp.agree():
            if main:
                plan_outputs([path, data, val, arch, *teachers, *teacher_archs],
                             [checkpoint_output("-o", out), Output("--metrics-out", Path(metrics_out))
                              if metrics_out is not None else None,
                              Output("--plot", Path(plot)) if plot is not None else None,
                              Output("training state", state_file)])
            model = load_model(path, arch, keys=keys)
            if not allow_nonfinite:
                refuse_nonfinite(model.state_dict, f"{path}: the weights")
            container = check_keep_wrapper(path, out) if keep_wrapper else None
            train = load_data(data, "train", norm)
            if val is None and not has_val_split(data):
                raise DataError("a .npz training file has no validation split: pass --val")
            val_ds = load_data(val if val is not None else data, "val", norm)
            for ds, name in ((train, data), (val_ds, val or data)):
                if ds.y is None:
                    raise DataError(f"data {name}: finetuning needs labels (array 'y')")
                check_fits(model, ds.x, f"data {name}")
            teacher_models = [_teacher(model, t, a, keys, train.x, f"{path}", data)
                              for t, a in zip(teachers, teacher_archs or [None] * len(teachers))]
            teacher_module = None
            if teacher_models:
                modules = [t.module().to(device) for t in teacher_models]
                teacher_module = modules[0] if len(modules) == 1 else Ensemble(modules)
            teacher_sha = ",".join(t.sha256 for t in teacher_models) or None
            if main:
                identity = {"input_sha256": model.sha256, "teacher_sha256": teacher_sha}
                if resume:
                    resume_from = load_train_state(state_file)
                    if resume_from.get("identity") != identity:
                        raise ClafuseError(f"{state_file} was saved for a different checkpoint or teacher; "
                                           "run without --resume to start afresh")
        if resume:
            resume_from = ddp.broadcast_object(resume_from)

        wrote_state = False

        def on_state(state: dict) -> None:
            nonlocal wrote_state
            save_train_state(state_file, {**state, "identity": identity})
            wrote_state = True

        metrics_fh = None

        def on_epoch(record: dict) -> None:
            progress_steps.advance(record["epoch"], epochs, f"val accuracy {record['val_accuracy']:.4f}"
                             if record.get("val_accuracy") is not None else "")
            if metrics_fh is not None:
                metrics_fh.write(json.dumps(record) + "\n")
                metrics_fh.flush()

        # Every file of the run is written to a temp file and renamed into place at the end, all
        # together: a run that fails leaves the previous outputs (and metrics) as they were.
        outputs = AtomicGroup()
        try:
            with ddp.agree():
                if main and metrics_out is not None:
                    metrics_fh = open(outputs.temp(metrics_out), "w", encoding="utf-8")
            if metrics_fh is not None and resume_from is not None:
                for record in resume_from["history"]:
                    on_epoch(record)
            module = model.module().to(device)
            # A progress bar (``progress``, on a terminal) shows the training itself.
            with contextlib.nullcontext() if progress else progress_steps.step(f"training {epochs} epochs"):
                result = finetune(module, train, val_ds, config, on_epoch=on_epoch if main else None,
                                  progress=progress and main, teacher=teacher_module,
                                  on_state=on_state if main else None, resume_from=resume_from)
            if metrics_fh is not None:
                metrics_fh.close()
            with ddp.agree():
                if main:
                    state = {k: v.to(model.state_dict[k].dtype) for k, v in result.best_state.items()}
                    if not allow_nonfinite:
                        refuse_nonfinite(state, "the finetuned weights (training diverged: try a lower --lr)")
                    metadata = {"clafuse_version": clafuse.__version__, "finetuned_from": model.sha256,
                                "best_epoch": str(result.best_epoch),
                                "history": json.dumps(untimed_history(result.history)),
                                **spec_metadata(model.spec)}
                    if teacher_sha is not None:
                        metadata["distilled_from"] = teacher_sha
                    if container is not None:
                        plan = model.plan or KeyMap().apply(model.state_dict)
                        save_in_input_form(out, container, in_input_form(container, plan, state), metadata,
                                           group=outputs)
                    else:
                        save_checkpoint(out, state, metadata, group=outputs)
                    if plot is not None:
                        from clafuse.plots import plot_history

                        plot_history(result.history, plot, group=outputs)
                    outputs.commit()
                    state_file.unlink(missing_ok=True)
        except KeyboardInterrupt:  # resumable: the training state stays
            outputs.discard()
            raise
        except BaseException:
            outputs.discard()
            if wrote_state and not resume:  # a failed run leaves no state of its own behind
                state_file.unlink(missing_ok=True)
            raise
        finally:
            if metrics_fh is not None:
                metrics_fh.close()
    return {"input": str(path), "output": str(out), "best_epoch": result.best_epoch, "history": result.history}
