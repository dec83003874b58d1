"""The choices and numeric ranges of every option, checked in the library so that a bad value is
refused with the same one-line message from Python as from the shell.

Nothing heavy is imported here: the CLI builds its help text from these literals.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from clafuse.errors import ClafuseError

Metric = Literal["cka", "euclidean", "wd", "neuron"]
Balance = Literal["add", "merge"]
Signal = Literal["activations", "weights"]
Solver = Literal["emd", "sinkhorn"]
Ground = Literal["correlation", "euclidean"]
Inserted = Literal["keep", "average"]
Correction = Literal["regress", "repair", "none"]
OutputDtype = Literal["fp32", "fp16", "bf16"]
Scoring = Literal["kl", "accuracy", "cosine"]
Schedule = Literal["cosine", "step", "constant"]
Optimizer = Literal["sgd", "adamw"]
Augmentation = Literal["none", "crop", "crop-flip"]
Precision = Literal["fp32", "bf16", "fp16"]
SentenceLoss = Literal["cosine", "mse"]
SchemaName = Literal["map"]

# Sinkhorn's ``reg`` is relative to the largest cost; at or below this the kernel exp(-cost / reg)
# underflows for most entries and the iterations neither converge nor give a usable plan.
MIN_REG = 1e-4
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the seeds torch's generators take


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` type, in order."""
    return get_args(literal)


def one_of(literal: Any) -> str:
    """``a, b or c`` for help texts."""
    values = choices(literal)
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def check_choice(option: str, value: object, literal: Any, error: type[ClafuseError] = ClafuseError) -> None:
    """Raise ``error`` unless ``value`` is one of ``literal``'s values."""
    if value not in choices(literal):
        raise error(f"{option}: {value!r} is not one of {', '.join(choices(literal))}")


def check_number(option: str, value: object, *, above: float | None = None, at_least: float | None = None,
                 below: float | None = None, at_most: float | None = None,
                 error: type[ClafuseError] = ClafuseError) -> float:
    """``value`` as a float; raise ``error`` unless it is a finite real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{option} must be a number, got {value!r}")
    number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf
    if not math.isfinite(number):
        raise error(f"{option} must be a finite number, got {value!r}")
    if above is not None and not number > above:
        raise error(f"{option} must be greater than {above:g}, got {value!r}")
    if at_least is not None and not number >= at_least:
        raise error(f"{option} must be at least {at_least:g}, got {value!r}")
    if below is not None and not number < below:
        raise error(f"{option} must be less than {below:g}, got {value!r}")
    if at_most is not None and not number <= at_most:
        raise error(f"{option} must be at most {at_most:g}, got {value!r}")
    return number


def check_integer(option: str, value: object, *, at_least: int | None = None, at_most: int | None = None,
                  error: type[ClafuseError] = ClafuseError) -> int:
    """``value`` as an int; raise ``error`` unless it is an integer (not a bool) in the given range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{option} must be an integer, got {value!r}")
    if at_least is not None and value < at_least:
        raise error(f"{option} must be at least {at_least}, got {value}")
    if at_most is not None and value > at_most:
        raise error(f"{option} must be at most {at_most}, got {value}")
    return value


def check_seed(option: str, value: object, error: type[ClafuseError] = ClafuseError) -> int:
    """A seed torch's generators take: an integer from -2**63 to 2**64 - 1."""
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_MIN <= value <= SEED_MAX:
        raise error(f"{option} must be an integer from -2**63 to 2**64 - 1, got {value!r}")
    return value


def mixing_weights(values: list[float], option: str = "--weights") -> list[float]:
    """``values`` divided by their maximum (so the sum cannot overflow; the fusion normalises the
    sum itself); raise ClafuseError unless all are finite, non-negative and not all zero."""
    for v in values:
        if not math.isfinite(v):
            raise ClafuseError(f"{option} must be finite numbers: {v!r} is not (floats end near 1.8e308)")
        if v < 0:
            raise ClafuseError(f"{option} must be non-negative, got {v!r}")
    top = max(values, default=0.0)
    if top <= 0:
        raise ClafuseError(f"{option} must not all be zero")
    return [v / top for v in values]
