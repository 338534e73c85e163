"""The training schedule in the paper's units: epochs over the fit set, StepLR every so many epochs.

The paper trains the StatsMergeLearner "for 500 epochs ... StepLR (factor 0.1 every 100
epochs)". A step of our trainer takes one batch of *every* task, so one epoch, a pass over
each task's fit subset, is as many steps as the largest subset needs batches. Explicit
``max_steps`` / ``lr_step_size`` still win over the epoch settings (benchmarks and quick runs
set steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Mapping, Optional

from ..utils.errors import UserError


@dataclass(frozen=True)
class Schedule:
    """What the training loop runs: steps, the StepLR period in steps, and where they came from."""

    max_steps: int
    lr_step_size: Optional[int]
    steps_per_epoch: int
    epochs: float

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def check_schedule(max_steps: Optional[int], max_epochs: Optional[float], lr_step_size: Optional[int],
                   lr_step_epochs: Optional[float]) -> None:
    """Refuse a schedule that cannot be resolved, before any model is loaded (a :class:`UserError`: the
    message ends a failed CLI run's output)."""
    if max_steps is None and max_epochs is None:
        raise UserError("Set max_epochs (passes over each task's fit set) or max_steps (an explicit override).")
    if max_steps is not None and int(max_steps) < 0:
        raise UserError(f"max_steps must be >= 0 (0: no training), got {max_steps}.")
    if max_epochs is not None and float(max_epochs) < 0:
        raise UserError(f"max_epochs must be >= 0 (0: no training), got {max_epochs}.")
    for key, value in (("lr_step_size", lr_step_size), ("lr_step_epochs", lr_step_epochs)):
        if value is not None and float(value) <= 0:
            raise UserError(f"{key} must be positive (or null: no StepLR), got {value}.")


def steps_per_epoch(fit_sizes: Mapping[str, int], batch_size: int) -> int:
    """Steps for one pass over every task's fit set (each step draws one batch per task)."""
    if not fit_sizes:
        return 1
    return max(1, max(math.ceil(int(n) / int(batch_size)) for n in fit_sizes.values()))


def resolve_schedule(fit_sizes: Mapping[str, int], batch_size: int, max_steps: Optional[int] = None,
                     max_epochs: Optional[float] = None, lr_step_size: Optional[int] = None,
                     lr_step_epochs: Optional[float] = None) -> Schedule:
    """Steps and StepLR period from the fit-set sizes; explicit step counts take precedence."""
    check_schedule(max_steps, max_epochs, lr_step_size, lr_step_epochs)
    per_epoch = steps_per_epoch(fit_sizes, batch_size)
    steps = int(max_steps) if max_steps is not None else int(round(float(max_epochs) * per_epoch))
    if lr_step_size is not None:
        period: Optional[int] = int(lr_step_size)
    elif lr_step_epochs is not None:
        period = max(1, int(round(float(lr_step_epochs) * per_epoch)))
    else:
        period = None
    return Schedule(steps, period, per_epoch, round(steps / per_epoch, 3))
