"""The library entry points behind each CLI command: inspect, align, fuse, evaluate, finetune.

Each function takes paths and options and returns plain data (dicts / pydantic models), so it can
be used from Python as well as from the shell. One module per command; this package re-exports
their public names, so ``from clafuse import api; api.fuse(...)`` works.
"""

from clafuse.api.alignment import align
from clafuse.api.common import DEFAULT_SAMPLES, log, model_letter
from clafuse.api.evaluation import evaluate_checkpoints
from clafuse.api.finetuning import finetune_checkpoint, train_state_path
from clafuse.api.fusing import DTYPES, cast_state, check_output, fuse, parse_weights, resolve_target
from clafuse.api.models import LoadedModel, check_fits, inspect_checkpoint, load_model, nonfinite_keys

__all__ = [
    "DEFAULT_SAMPLES",
    "DTYPES",
    "LoadedModel",
    "align",
    "cast_state",
    "check_fits",
    "check_output",
    "evaluate_checkpoints",
    "finetune_checkpoint",
    "fuse",
    "inspect_checkpoint",
    "load_model",
    "log",
    "model_letter",
    "nonfinite_keys",
    "parse_weights",
    "resolve_target",
    "train_state_path",
]
