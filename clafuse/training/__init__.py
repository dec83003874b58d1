"""Evaluate and finetune any ``torch.nn.Module`` classifier on a :class:`~clafuse.data.Dataset`.

Inputs go to the model exactly as the dataset holds them; models that need flat vectors flatten
themselves. Model selection during finetuning uses the validation set only, never test data.

Modules: config (settings and their checks), evaluation, batches (shuffling, augmentation,
distillation loss), state (saving and resuming), objectives (what a run optimises and selects on:
classification), sentences (distilling sentence encoders), loop (``finetune``,
``finetune_objective``); this package re-exports the public names.
"""

from clafuse.training.batches import augment_batch, distillation_loss
from clafuse.training.config import (
    AUGMENTATIONS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    FinetuneConfig,
    FinetuneResult,
    check_precision,
)
from clafuse.training.evaluation import evaluate, evaluate_ensemble, predict_logits
from clafuse.training.loop import finetune, finetune_objective
from clafuse.training.objectives import Classification, Objective
from clafuse.training.state import STATE_VERSION, load_train_state, save_train_state

__all__ = [
    "AUGMENTATIONS",
    "Classification",
    "OPTIMIZERS",
    "PRECISIONS",
    "SCHEDULES",
    "STATE_VERSION",
    "FinetuneConfig",
    "FinetuneResult",
    "Objective",
    "augment_batch",
    "check_precision",
    "distillation_loss",
    "evaluate",
    "evaluate_ensemble",
    "finetune",
    "finetune_objective",
    "load_train_state",
    "predict_logits",
    "save_train_state",
]
