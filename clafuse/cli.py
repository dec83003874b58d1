"""The ``clafuse`` command line: thin wrappers that parse options and call :mod:`clafuse.api`.

Heavy modules (torch, POT) are imported inside the commands so that ``--help`` stays fast.
Exit codes: 0 success, 1 internal error, 2 bad usage or bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer

from clafuse.options import (
    MIN_REG,
    Augmentation,
    Balance,
    Correction,
    Ground,
    Inserted,
    Metric,
    Optimizer,
    OutputDtype,
    Precision,
    Schedule,
    SchemaName,
    Scoring,
    SentenceLoss,
    Signal,
    Solver,
    check_choice,
    one_of,
)
from clafuse.cli_common import (
    IgnoreKeysOpt,
    JsonOpt,
    KeepWrapperOpt,
    NormalizeOpt,
    ProgressOpt,
    RenameOpt,
    Session,
    StripPrefixOpt,
    ThreadsOpt,
    app,
    console,
    emit,
    guard,
    key_map,
    terminate,
)


@app.command()
@guard
def inspect(
    ckpt: Path = typer.Argument(..., help="Checkpoint (.safetensors, .pt, .pth, .bin or a sharded index)."),
    arch: Optional[Path] = typer.Option(None, help="Architecture spec file (JSON/YAML); detected when omitted."),
    strip_prefix: Optional[str] = StripPrefixOpt,
    rename: Optional[List[str]] = RenameOpt,
    ignore_keys: Optional[List[str]] = IgnoreKeysOpt,
    threads: Optional[int] = ThreadsOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show a checkpoint's family, depth, alignable layers, parameters and dtypes, and how its
    tensor names were made to fit (prefix stripped, tensors left out)."""
    from clafuse.api import inspect_checkpoint
    from clafuse.report import render_inspect

    keys = key_map(strip_prefix, rename, ignore_keys)
    with Session(threads, as_json, show_progress) as session:
        doc = inspect_checkpoint(ckpt, arch, keys=keys)
    emit(doc, as_json, render_inspect, session.threads)


@app.command()
@guard
def align(
    ckpts: List[Path] = typer.Argument(..., help="Two or more checkpoints (models A, B, C, ... in this order)."),
    out: Path = typer.Option(..., "-o", "--out", help="Map file to write (JSON)."),
    anchor: Optional[str] = typer.Option(None, help="Model the others are aligned to and fused into by default: "
                                                   "a letter (A, B, ...), deep or shallow (default: the deepest)."),
    data: Optional[str] = typer.Option(None, help="Calibration data: .npz file, data folder (IDX, CIFAR-10/100, image class folders) or built-in (digits, mnist, fashion-mnist)."),
    samples: int = typer.Option(2000, help="Number of calibration samples (from the train split), at least 2."),
    metric: str = typer.Option("cka", help=f"Layer cost: {one_of(Metric)} (neuron compares widths and needs no "
                                           "data; the others compare activations)."),
    seed: int = typer.Option(0, help="Seed for drawing the calibration samples."),
    pin_first: bool = typer.Option(True, "--pin-first/--no-pin-first", help="Map first hidden layer to first."),
    pin_last: bool = typer.Option(True, "--pin-last/--no-pin-last", help="Map last hidden layer to last."),
    arch: Optional[List[Path]] = typer.Option(None, help="Spec file per model, in order (repeat for each checkpoint)."),
    normalize: Optional[str] = NormalizeOpt,
    strip_prefix: Optional[str] = StripPrefixOpt,
    rename: Optional[List[str]] = RenameOpt,
    ignore_keys: Optional[List[str]] = IgnoreKeysOpt,
    threads: Optional[int] = ThreadsOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Align the layers of every network to an anchor's (cross-layer alignment by dynamic programming).
    The key handling each checkpoint needed is recorded in the map, so fuse reads it the same way."""
    from clafuse.api import align as run_align
    from clafuse.report import render_map

    if len(ckpts) < 2:
        raise typer.BadParameter(f"give at least two checkpoints, got {len(ckpts)}", param_hint="CKPTS")
    archs = _per_model(arch, len(ckpts))
    keys = key_map(strip_prefix, rename, ignore_keys)
    with Session(threads, as_json, show_progress) as session:
        doc = run_align(ckpts, out, archs=archs, data=data, samples=samples, metric=metric, seed=seed,
                        pin_first=pin_first, pin_last=pin_last, anchor=anchor, keys=keys, normalize=normalize)
    emit(doc.model_dump(mode="json"), as_json, lambda d: render_map(d, out), session.threads)


@app.command()
@guard
def fuse(
    map_file: Path = typer.Option(..., "--map", help="Map file written by 'clafuse align'."),
    out: Path = typer.Option(..., "-o", "--out", help="Fused checkpoint (.safetensors, or .pt by extension)."),
    target: Optional[str] = typer.Option(None, help="Output architecture: the map's anchor by default; deep, shallow, or a "
                                                   "model letter (A, B, ... by align order). Each other model is balanced "
                                                   "to it: add (identities) when shallower, merge (folding) when deeper."),
    balance: Optional[str] = typer.Option(None, help=f"Two-model maps, {one_of(Balance)}: add = the deeper architecture "
                                                    "(identity layers into the shallower net), merge = the shallower "
                                                    "one (fold the deeper net's unmatched layers)."),
    solver: str = typer.Option("emd", help=f"Transport solver: {one_of(Solver)} (emd exact, sinkhorn entropic)."),
    reg: float = typer.Option(0.05, help=f"Sinkhorn regularisation, relative to the largest cost (above {MIN_REG:g})."),
    signal_: Optional[str] = typer.Option(None, "--signal", help=f"{one_of(Signal)} (default: activations when data "
                                                                 "is available)."),
    weights: Optional[str] = typer.Option(None, help="Mixing weights, one per model in align order, e.g. 0.5,0.5: finite, "
                                                    "non-negative, not all zero (default: equal)."),
    dtype: Optional[str] = typer.Option(None, help=f"Floating-point dtype of the output: {one_of(OutputDtype)} "
                                                  "(default: the target's)."),
    max_shard_size: Optional[str] = typer.Option(None, help="Split a larger .safetensors output into shards of at most this "
                                                        "size (e.g. 2GB, 500MiB) with a .safetensors.index.json index."),
    data: Optional[str] = typer.Option(None, help="Calibration data (default: the data recorded in the map)."),
    samples: Optional[int] = typer.Option(None, help="Calibration samples, at least 2 (default: as in the map)."),
    ground: str = typer.Option("correlation", help=f"Neuron cost from activations: {one_of(Ground)}."),
    inserted: Optional[str] = typer.Option(None, help=f"{one_of(Inserted)}: keep = layers only one net has are taken "
                                                     "from it; average = average real layers with inserted identities "
                                                     "(default: keep for networks with normalisations or residual blocks, "
                                                     "average otherwise)."),
    correction: Optional[str] = typer.Option(None, help=f"{one_of(Correction)}: regress = refit layers to the parents' "
                                                        "mixed activations; repair = restore each neuron's mean and std "
                                                        "(default: regress)."),
    bn_reset: bool = typer.Option(True, "--bn-reset/--no-bn-reset",
                                  help="Recompute BatchNorm running statistics of the fused network on the calibration data."),
    allow_nonfinite: bool = typer.Option(False, help="Fuse checkpoints holding NaN/Inf values, and write a fused "
                                                     "checkpoint holding them (refused by default)."),
    normalize: Optional[str] = NormalizeOpt,
    keep_wrapper: bool = KeepWrapperOpt,
    threads: Optional[int] = ThreadsOpt,
    show_progress: bool = ProgressOpt,
    mapping: Optional[List[str]] = typer.Option(None, help="LETTER=i,j,... replaces the map's layer mapping of that "
                                                          "model (from the shallower model of its pair into the "
                                                          "deeper one; groups separated by /). Repeatable."),
    refit_head: bool = typer.Option(False, "--refit-head", help="Refit the fused head to the models' ensemble on the "
                                                              "calibration data (the last Linear alone, fitted to its soft "
                                                              "predictions; no labels)."),
    search: bool = typer.Option(False, "--search", help="Choose weights, mapping, inserted, correction and head refit "
                                                       "by what each candidate does on held-out calibration samples; "
                                                       "prints the command that repeats the choice."),
    budget: Optional[str] = typer.Option(None, help="With --search: a number of candidates (40) or a time (30s, 2m); "
                                                   "default 8 candidates."),
    scoring: Optional[str] = typer.Option(None, help=f"With --search, {one_of(Scoring)}: kl = agreement with the "
                                                    "models' ensemble (KL at the fused logits' best temperature; "
                                                    "no labels, the default); accuracy = on the "
                                                    "held-out labels; cosine = agreement with the models' mean "
                                                    "sentence embedding (the default for text encoders)."),
    score_data: Optional[str] = typer.Option(None, help="With --search: score candidates on this data (e.g. "
                                                       "fashion-mnist:val, labels for --scoring accuracy) instead of "
                                                       "held-out calibration samples; never a test split."),
    reference: Optional[str] = typer.Option(None, help="With --search or --refit-head: compare with these models' "
                                                      "ensemble instead of all models', e.g. B to fuse a teacher B "
                                                      "into a student A."),
    rebuild: bool = typer.Option(True, "--rebuild/--no-rebuild",
                                 help="With --search from fewer --samples than the map's (to leave held-out "
                                      "calibration samples): build the chosen settings from the map's count, as "
                                      "plain fuse draws it (the default), or from --samples only, as scored."),
    as_json: bool = JsonOpt,
) -> None:
    """Balance the depths and fuse all mapped networks into one with optimal transport. Checkpoints
    are read with the key handling the map recorded; the output has the names the architecture
    knows, or the target input's own names and wrapper with --keep-wrapper."""
    from clafuse.api import fuse as run_fuse
    from clafuse.report import render_fuse, search_progress

    with Session(threads, as_json, show_progress) as session:
        report = run_fuse(map_file, out, balance=balance, target=target, weights=weights, data=data, samples=samples,
                          signal=signal_, allow_nonfinite=allow_nonfinite, solver=solver, reg=reg, ground=ground,
                          inserted=inserted, correction=correction, bn_reset=bn_reset, dtype=dtype,
                          max_shard_size=max_shard_size, keep_wrapper=keep_wrapper, normalize=normalize,
                          mapping=mapping, refit_head=refit_head, search=search, budget=budget, scoring=scoring,
                          reference=reference, score_data=score_data, rebuild=rebuild,
                          on_candidate=search_progress if search and session.show else None)
    emit(report, as_json, lambda d: render_fuse(d, map_file), session.threads)


@app.command("eval")
@guard
def evaluate(
    ckpts: List[Path] = typer.Argument(..., help="One or more checkpoints."),
    data: str = typer.Option(..., help="Data: .npz, data folder (IDX, CIFAR-10/100, image class folders) or built-in, with split, e.g. mnist:test, ./cifar-10-batches-py:val."),
    arch: Optional[List[Path]] = typer.Option(None, help="Spec file per checkpoint, in order."),
    ensemble_of: Optional[str] = typer.Option(None, help="Models the ensemble row averages, e.g. A,B (letters in the "
                                                        "order given, indices or paths); default: every checkpoint "
                                                        "that is not a fused output (by its metadata)."),
    normalize: Optional[str] = NormalizeOpt,
    strip_prefix: Optional[str] = StripPrefixOpt,
    rename: Optional[List[str]] = RenameOpt,
    ignore_keys: Optional[List[str]] = IgnoreKeysOpt,
    threads: Optional[int] = ThreadsOpt,
    show_progress: bool = ProgressOpt,
    teacher: Optional[Path] = typer.Option(None, help="Text encoders: the teacher whose sentence embeddings "
                                                    "the models are compared with."),
    max_length: int = typer.Option(128, help="Text encoders: tokens per sentence at most."),
    limit: Optional[int] = typer.Option(None, help="Text encoders: use the first LIMIT sentences only."),
    tokenizer: Optional[Path] = typer.Option(None, help="Text encoders: tokenizer.json for bare state dicts."),
    heads: Optional[int] = typer.Option(None, help="Text encoders: attention heads of bare state dicts."),
    as_json: bool = JsonOpt,
) -> None:
    """Accuracy and loss of checkpoints, and of the prediction ensemble of the parents (not of
    fused outputs, unless --ensemble-of names them). Text encoders (BERT model folders or state
    dicts, DATA a file of sentences) are compared with the first one; with --teacher, with the
    teacher: mean cosine to its sentence embeddings, Spearman of pairwise similarities, and
    recall@1/recall@5/MRR of finding each text's second half from its first half."""
    from clafuse.api.encoders import evaluate_encoders, is_encoder_input

    if teacher is not None and all(is_encoder_input(c) for c in ckpts):
        from clafuse.report import render_text_eval

        if arch:
            raise typer.BadParameter("applies to image classifiers, not to text encoders", param_hint="--arch")
        with Session(threads, as_json, show_progress) as session:
            doc = evaluate_encoders(ckpts, data, teacher=teacher, max_length=max_length, limit=limit, heads=heads,
                                    tokenizer=tokenizer)
        emit(doc, as_json, render_text_eval, session.threads)
        return
    from clafuse.api import evaluate_checkpoints
    from clafuse.report import render_eval

    if teacher is not None:
        raise typer.BadParameter("applies to text encoders only", param_hint="--teacher")
    keys = key_map(strip_prefix, rename, ignore_keys)
    with Session(threads, as_json, show_progress) as session:
        doc = evaluate_checkpoints(ckpts, data, archs=_per_model(arch, len(ckpts)), keys=keys, normalize=normalize,
                                   ensemble_of=ensemble_of.split(",") if ensemble_of is not None else None)
    emit(doc, as_json, render_eval, session.threads)


@app.command()
@guard
def finetune(
    ckpt: Path = typer.Argument(..., help="Checkpoint to finetune."),
    data: str = typer.Option(..., help="Training data: .npz, data folder (IDX, CIFAR-10/100, image class folders) or built-in (train split by default)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the best checkpoint (by validation accuracy)."),
    val: Optional[str] = typer.Option(None, help="Validation data (default: the val split of a built-in source or data folder)."),
    epochs: int = typer.Option(1, help="Number of epochs, at least 1."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate, positive (default 0.01; 1e-4 for text encoders)."),
    momentum: float = typer.Option(0.9, help="SGD momentum, in [0, 1)."),
    batch_size: Optional[int] = typer.Option(None, help="Mini-batch size, at least 1 (default 64; 32 for text encoders)."),
    schedule: str = typer.Option("cosine", help=f"Learning-rate schedule: {one_of(Schedule)}."),
    weight_decay: float = typer.Option(0.0, help="Weight decay, non-negative."),
    seed: int = typer.Option(0, help="Seed for initial shuffling and any randomness."),
    arch: Optional[Path] = typer.Option(None, help="Architecture spec file; detected when omitted."),
    optimizer: Optional[str] = typer.Option(None, help=f"Optimizer: {one_of(Optimizer)} (momentum and nesterov apply "
                                                       "to sgd; default sgd, adamw for text encoders)."),
    nesterov: bool = typer.Option(False, "--nesterov", help="Nesterov momentum (sgd)."),
    warmup_steps: int = typer.Option(0, help="Steps of linear learning-rate warm-up before the schedule."),
    label_smoothing: float = typer.Option(0.0, help="Label smoothing of the cross-entropy, in [0, 1)."),
    augment: str = typer.Option("none", help=f"Image augmentation: {one_of(Augmentation)} (random crop after "
                                             "zero padding of 2 pixels, 4 for inputs of 28 pixels or more)."),
    teacher: Optional[List[Path]] = typer.Option(None, help="Teacher checkpoint to distil from (same classes; for text "
                                                          "encoders, the sentence encoder whose embeddings to match); "
                                                          "repeat it to distil the teachers' ensemble (e.g. a fused "
                                                          "model's parents)."),
    teacher_arch: Optional[List[Path]] = typer.Option(None, help="Architecture spec file of the teacher (one per "
                                                                "--teacher)."),
    kd_alpha: float = typer.Option(0.5, help="Weight of the distillation term (with --teacher), in [0, 1]."),
    kd_temperature: float = typer.Option(4.0, help="Softmax temperature of distillation (with --teacher), positive."),
    metrics_out: Optional[Path] = typer.Option(None, help="Write one JSON line of metrics per epoch to this file "
                                                        "(in place, replacing any previous one, when the run completes)."),
    plot: Optional[Path] = typer.Option(None, help="Write a PNG of the loss and accuracy curves."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUT.state.pt."),
    allow_nonfinite: bool = typer.Option(False, help="Finetune a checkpoint holding NaN/Inf values, and write "
                                                     "weights holding them (refused by default)."),
    precision: str = typer.Option("fp32", help=f"{one_of(Precision)}: fp32, or bf16/fp16 autocast (weights stay fp32; "
                                               "fp16 needs CUDA)."),
    normalize: Optional[str] = NormalizeOpt,
    strip_prefix: Optional[str] = StripPrefixOpt,
    rename: Optional[List[str]] = RenameOpt,
    ignore_keys: Optional[List[str]] = IgnoreKeysOpt,
    keep_wrapper: bool = KeepWrapperOpt,
    threads: Optional[int] = ThreadsOpt,
    show_progress: bool = ProgressOpt,
    loss: str = typer.Option("cosine", help=f"Text encoders: {one_of(SentenceLoss)} between the student's and the "
                                            "teacher's mean-pooled sentence embeddings."),
    max_length: int = typer.Option(128, help="Text encoders: tokens per sentence at most."),
    tokenizer: Optional[Path] = typer.Option(None, help="Text encoders: tokenizer.json for a bare state dict "
                                                      "(default: its folder's, else the teacher's)."),
    heads: Optional[int] = typer.Option(None, help="Text encoders: attention heads of a bare state dict "
                                                 "(default: the teacher's config, else width / 64)."),
    as_json: bool = JsonOpt,
) -> None:
    """Finetune a checkpoint (SGD or AdamW, optionally distilling a teacher), selecting the best epoch on
    validation data. The training state is kept in OUT.state.pt until the run completes. Under
    torchrun the run is data parallel (--batch-size is the global batch) and rank 0 alone prints
    and writes files. A text encoder (BERT model folder or state dict) is distilled from --teacher
    on a file of sentences (--data, --val), selecting on the mean cosine to the teacher."""
    from clafuse.api import finetune_checkpoint
    from clafuse.api.encoders import finetune_encoder, is_encoder_input, refuse_classifier_options
    from clafuse.distributed import ReportedByPeer, env_rank
    from clafuse.report import render_finetune

    teacher, teacher_arch = list(teacher or []), list(teacher_arch or [])
    if is_encoder_input(ckpt):
        if len(teacher) != 1:
            raise typer.BadParameter("a text encoder is finetuned by distillation from one teacher: give --teacher "
                                     "once", param_hint="--teacher")
        refuse_classifier_options(arch=arch, teacher_arch=teacher_arch or None, augment=augment, nesterov=nesterov,
                                  label_smoothing=label_smoothing, kd_alpha=kd_alpha, kd_temperature=kd_temperature,
                                  resume=resume)
        with Session(threads, as_json, show_progress) as session:
            report = finetune_encoder(ckpt, out, data=data, teacher=teacher[0], val=val, loss=loss, epochs=epochs,
                                      lr=1e-4 if lr is None else lr,
                                      batch_size=32 if batch_size is None else batch_size, schedule=schedule,
                                      weight_decay=weight_decay, seed=seed, optimizer=optimizer or "adamw",
                                      momentum=momentum, warmup_steps=warmup_steps, max_length=max_length, heads=heads,
                                      tokenizer=tokenizer, metrics_out=metrics_out, plot=plot,
                                      progress=not as_json and sys.stderr.isatty(), precision=precision,
                                      allow_nonfinite=allow_nonfinite)
        emit(report, as_json, render_finetune, session.threads)
        return
    lr = 0.01 if lr is None else lr
    batch_size = 64 if batch_size is None else batch_size
    optimizer = optimizer or "sgd"

    main_rank = env_rank() == 0
    if not main_rank:
        logging.getLogger("clafuse").setLevel(logging.ERROR)
    if teacher_arch and not teacher:
        if not main_rank:  # every rank got the same options: rank 0 reports
            raise typer.Exit(2)
        raise typer.BadParameter("needs --teacher", param_hint="--teacher-arch")
    keys = key_map(strip_prefix, rename, ignore_keys)
    session = Session(threads, as_json, show_progress and main_rank)
    session.show = session.show and main_rank
    try:
        with session:
            report = finetune_checkpoint(ckpt, out, data=data, val=val, epochs=epochs, lr=lr, momentum=momentum,
                                         batch_size=batch_size, schedule=schedule, weight_decay=weight_decay, seed=seed,
                                         arch=arch, progress=not as_json and sys.stderr.isatty(), optimizer=optimizer,
                                         nesterov=nesterov, warmup_steps=warmup_steps, label_smoothing=label_smoothing,
                                         augment=augment, teacher=teacher, teacher_arch=teacher_arch or None,
                                         kd_alpha=kd_alpha,
                                         kd_temperature=kd_temperature, metrics_out=metrics_out, plot=plot, resume=resume,
                                         precision=precision, keys=keys, keep_wrapper=keep_wrapper, normalize=normalize,
                                         allow_nonfinite=allow_nonfinite)
    except ReportedByPeer:
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        if not main_rank:
            raise typer.Exit(130) from None
        raise
    if main_rank:
        emit(report, as_json, render_finetune, session.threads)


@app.command()
@guard
def schema(what: str = typer.Argument("map", help=f"Which schema: {one_of(SchemaName)}.")) -> None:
    """Print the JSON Schema of the map file format."""
    from clafuse.align.mapfile import map_schema

    check_choice("schema", what, SchemaName)
    sys.stdout.write(json.dumps(map_schema(), indent=2) + "\n")


@app.command()
@guard
def report(
    map_file: Path = typer.Argument(..., help="Map file written by 'clafuse align'."),
    out: Path = typer.Option(..., "-o", "--out", help="HTML page to write (self-contained: loads nothing)."),
    fused: Optional[Path] = typer.Option(None, help="Fused checkpoint written by 'clafuse fuse' from this map: adds "
                                                  "per-layer similarity to each parent (and accuracy, with --data)."),
    data: Optional[str] = typer.Option(None, help="Labelled data for the accuracy table (test split by default); "
                                                "also the activations' inputs when the map has no calibration data."),
    samples: Optional[int] = typer.Option(None, help="Inputs for the activation statistics (default: as "
                                                          "align drew them, else 1000)."),
    solver: Optional[str] = typer.Option(None, help="Transport solver of the neuron statistics: "
                                                  f"{one_of(Solver)} (default: the fused checkpoint's, else emd)."),
    reg: Optional[float] = typer.Option(None, help="Sinkhorn regularisation (default: the fused "
                                                          "checkpoint's, else 0.05)."),
    png_dir: Optional[Path] = typer.Option(None, help="Also write every figure as a PNG file into this folder."),
    normalize: Optional[str] = NormalizeOpt,
    threads: Optional[int] = ThreadsOpt,
    show_progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write an HTML report of an alignment map: cost heat-maps with the chosen path, the mapping in
    words, inserted and dropped layers, neuron transport statistics and, with --fused, how the
    fused network compares to its parents."""
    from clafuse.reporting.build import build_report

    with Session(threads, as_json, show_progress) as session:
        doc = build_report(map_file, out, fused=fused, data=data, samples=samples, solver=solver, reg=reg,
                           png_dir=png_dir, normalize=normalize)
    emit(doc, as_json, lambda d: console().print(
        f"report written to {d['output']}" + (f" ({len(d['pngs'])} PNGs in {png_dir})" if d["pngs"] else ""),
        markup=False, soft_wrap=True), session.threads)


def _per_model(arch: Optional[List[Path]], count: int) -> list[Optional[Path]]:
    if not arch:
        return [None] * count
    if len(arch) != count:
        raise typer.BadParameter(f"give one spec per checkpoint ({count}), got {len(arch)}", param_hint="--arch")
    return list(arch)


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point."""
    from clafuse.memory import tune_allocator

    tune_allocator()
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), terminate)
    logging.basicConfig(format="clafuse: warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    app(args=argv, prog_name="clafuse")
