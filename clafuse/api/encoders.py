"""``finetune`` and ``eval`` for sentence encoders (BERT family): distillation from a teacher's
sentence embeddings, and label-free measures against a teacher and on a retrieval task.

Sentences come from a text file (one per line). Each model tokenizes them with its own
``tokenizer.json`` (a bare state dict needs ``tokenizer``); a bare state dict takes its head count
from ``heads``, else from the teacher's config when the widths agree (see
:func:`clafuse.textmodels.load_text_model`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

import clafuse
from clafuse.api.finetuning import untimed_history
from clafuse.api.models import refuse_nonfinite
from clafuse.errors import ClafuseError, DataError
from clafuse.io.atomic import AtomicGroup
from clafuse.io.outputs import Output, plan_outputs
from clafuse.options import Optimizer, Precision, Schedule, SentenceLoss
from clafuse.textdata import DEFAULT_MAX_LENGTH, TokenBatch, load_tokenizer, read_sentences, tokenize
from clafuse.textmodels import TextModel, require_text_model, save_text_model


def model_tokens(model: TextModel, sentences: list[str], max_length: int, what: str) -> TokenBatch:
    """``sentences`` tokenized with ``model``'s tokenizer; DataError when it has none or ids do not fit."""
    if model.tokenizer is None:
        raise DataError(f"{what} {model.path} has no tokenizer.json: pass --tokenizer")
    tokens = tokenize(sentences, load_tokenizer(model.tokenizer), max_length)
    top = int(tokens.input_ids.max())
    if top >= model.spec.vocab:
        raise DataError(f"the tokenizer of {what} {model.path} gives id {top}, beyond its vocabulary of {model.spec.vocab}")
    return tokens


def _load_student(path: str | os.PathLike, teacher: TextModel | None, heads: int | None,
                  tokenizer: str | os.PathLike | None) -> TextModel:
    """The encoder at ``path``; a bare state dict borrows the teacher's config and tokenizer."""
    student = require_text_model(path, "model", heads=heads, tokenizer=tokenizer,
                                 config=teacher.config if teacher is not None else None)
    if student.tokenizer is None and teacher is not None:
        student.tokenizer = teacher.tokenizer
    return student


def finetune_encoder(path: str | os.PathLike, out: str | os.PathLike, *, data: str, teacher: str | os.PathLike,
                     val: str | None = None, loss: SentenceLoss = "cosine", epochs: int = 1, lr: float = 1e-4,
                     batch_size: int = 32, schedule: Schedule = "cosine", weight_decay: float = 0.0, seed: int = 0,
                     optimizer: Optimizer = "adamw", momentum: float = 0.9, warmup_steps: int = 0,
                     max_length: int = DEFAULT_MAX_LENGTH, limit: int | None = None, heads: int | None = None,
                     tokenizer: str | os.PathLike | None = None, metrics_out: str | os.PathLike | None = None,
                     plot: str | os.PathLike | None = None, progress: bool = False,
                     precision: Precision = "fp32", allow_nonfinite: bool = False) -> dict[str, Any]:
    """Distil ``teacher``'s mean-pooled sentence embeddings into the encoder at ``path`` on the
    sentences of ``data`` (the first ``limit``), keeping the epoch with the best mean cosine to the
    teacher on ``val`` sentences (the last epoch without ``val``). The student is written to
    ``out`` in its input's form (a model folder for a folder). A student without a tokenizer of its
    own uses the teacher's (same vocabulary assumed; ids are checked against its vocabulary).
    Outputs follow the one output rule (:func:`~clafuse.io.outputs.plan_outputs`); metrics and plot
    appear when the run completes, and finetuned weights holding NaN or Inf are refused unless
    ``allow_nonfinite``."""
    from clafuse.training import FinetuneConfig, check_precision
    from clafuse.training.loop import finetune_objective
    from clafuse.training.sentences import SentenceDistillation, SentenceEncoder

    config = FinetuneConfig(epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size, schedule=schedule,
                            weight_decay=weight_decay, seed=seed, optimizer=optimizer, warmup_steps=warmup_steps,
                            precision=precision)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_precision(precision, device)
    plan_outputs([path, data, val, teacher, tokenizer],
                 [Output("-o", Path(out), folder=Path(out).suffix == ""),
                  Output("--metrics-out", Path(metrics_out)) if metrics_out is not None else None,
                  Output("--plot", Path(plot)) if plot is not None else None])
    teacher_model = require_text_model(teacher, "teacher")
    student = _load_student(path, teacher_model, heads, tokenizer)
    if student.spec.hidden != teacher_model.spec.hidden:
        raise DataError(f"the student's width {student.spec.hidden} differs from the teacher's "
                        f"{teacher_model.spec.hidden}: its embeddings cannot be compared")
    train_text = read_sentences(data, limit)
    val_text = read_sentences(val) if val is not None else None
    objective = SentenceDistillation(
        model_tokens(student, train_text, max_length, "model"),
        model_tokens(student, val_text, max_length, "model") if val_text else None, loss,
        teacher=teacher_model.net().to(device),
        teacher_train=model_tokens(teacher_model, train_text, max_length, "teacher"),
        teacher_val=model_tokens(teacher_model, val_text, max_length, "teacher") if val_text else None,
        name=str(data))
    net = student.net().to(device)
    metrics_fh = None
    outputs = AtomicGroup()  # metrics and plot appear together when the run completes
    try:
        if metrics_out is not None:
            metrics_fh = open(outputs.temp(metrics_out), "w", encoding="utf-8")

        def on_epoch(record: dict) -> None:
            if metrics_fh is not None:
                metrics_fh.write(json.dumps(record) + "\n")
                metrics_fh.flush()

        result = finetune_objective(SentenceEncoder(net), objective, config, on_epoch=on_epoch, progress=progress)
        if metrics_fh is not None:
            metrics_fh.close()
        prefix = "encoder."
        state = {k[len(prefix):]: v.to(student.state_dict[k[len(prefix):]].dtype)
                 for k, v in result.best_state.items()}
        if not allow_nonfinite:
            refuse_nonfinite(state, "the finetuned weights (training diverged: try a lower --lr)")
        metadata = {"clafuse_version": clafuse.__version__, "finetuned_from": student.sha256,
                    "distilled_from": teacher_model.sha256, "best_epoch": str(result.best_epoch),
                    "history": json.dumps(untimed_history(result.history))}
        if plot is not None:
            from clafuse.plots import plot_history

            plot_history(result.history, plot, metric="cosine", group=outputs)
        save_text_model(out, state, student.spec, student, metadata)
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    finally:
        if metrics_fh is not None:
            metrics_fh.close()
    return {"input": str(path), "output": str(out), "metric": "cosine", "best_epoch": result.best_epoch,
            "history": result.history}


def embed(model: TextModel, sentences: list[str], max_length: int, what: str = "model") -> torch.Tensor:
    """Unnormalised mean-pooled sentence embeddings of ``model`` (float32, CPU)."""
    from clafuse.training.sentences import pooled_embeddings

    return pooled_embeddings(model.net(), model_tokens(model, sentences, max_length, what))


def evaluate_encoders(paths: Sequence[str | os.PathLike], data: str, teacher: str | os.PathLike | None = None,
                      max_length: int = DEFAULT_MAX_LENGTH, limit: int | None = None, heads: int | None = None,
                      tokenizer: str | os.PathLike | None = None) -> dict[str, Any]:
    """Label-free measures of each encoder on the sentences of ``data`` (the first ``limit``):
    agreement with ``teacher`` (mean cosine, Spearman of pairwise similarities) when given, and
    half-to-half retrieval (see :mod:`clafuse.textmetrics`)."""
    from clafuse.textmetrics import encoder_metrics, split_halves

    sentences = read_sentences(data, limit)
    first, second = split_halves(sentences)
    if len(first) < 2:
        raise DataError(f"{data}: retrieval needs at least 2 texts of 4 words or more")
    teacher_model = require_text_model(teacher, "teacher") if teacher is not None else None
    teacher_emb = embed(teacher_model, sentences, max_length, "teacher") if teacher_model is not None else None
    rows = []
    for path in paths:
        model = _load_student(path, teacher_model, heads, tokenizer)
        metrics = encoder_metrics(embed(model, sentences, max_length), embed(model, first, max_length),
                                  embed(model, second, max_length), teacher_emb)
        rows.append({"path": str(path), "layers": model.spec.layers, **metrics})
    doc: dict[str, Any] = {"data": data, "num_sentences": len(sentences), "retrieval_pairs": len(first),
                           "teacher": str(teacher) if teacher is not None else None, "models": rows}
    if teacher_model is not None:
        doc["teacher_metrics"] = encoder_metrics(teacher_emb, embed(teacher_model, first, max_length, "teacher"),
                                                 embed(teacher_model, second, max_length, "teacher"))
    return doc


_CLASSIFIER_DEFAULTS = {"arch": None, "teacher_arch": None, "augment": "none", "nesterov": False,
                        "label_smoothing": 0.0, "kd_alpha": 0.5, "kd_temperature": 4.0, "resume": False}


def refuse_classifier_options(**given: Any) -> None:
    """Raise ClafuseError naming the first option given away from its default that only applies to
    classifiers (architecture specs, augmentation, label smoothing, logit distillation, resuming)."""
    for name, default in _CLASSIFIER_DEFAULTS.items():
        if name in given and given[name] != default:
            raise ClafuseError(f"--{name.replace('_', '-')} applies to image classifiers, not to text encoders")


def is_encoder_input(path: str | os.PathLike) -> bool:
    """Whether ``path`` should be handled as a text encoder (a model folder or a BERT checkpoint)."""
    from clafuse.textmodels import is_text_model

    return Path(path).exists() and is_text_model(path)
