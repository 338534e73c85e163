"""The coefficient-distillation settings, validated in one place before any model is loaded.

:class:`TrainingSettings` holds the options every coefficient-distillation method shares (the keys of
``config/method/statsmerging.yaml`` below the learner's): data protocol and fit set, loss, schedule,
optimiser and SAM, selection, engine and precision, checkpoints and profiling. A method's constructor
takes them as keyword arguments (so Hydra configs compose unchanged) and builds one of these; a typo or an
impossible combination fails here with a :class:`~..utils.errors.UserError` naming what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Union

import torch

from ..utils.errors import UserError
from .distillation import LOSSES, Protocol, get_protocol
from .schedule import check_schedule
from .selection import SELECTIONS

ENGINES = ("fused", "host")
OPTIMIZERS = ("adam", "sam")
# where SAM perturbs: the optimised parameters (learner weights, or free coefficients), or the merging
# coefficients they produce (sam.OutputPerturbation; the same thing for free coefficients)
SAM_SPACES = ("parameters", "coefficients")
TASK_VECTOR_DTYPES = (None, "float32", "bfloat16", "float16")
AUTOCAST_DTYPES = {None: None, "none": None, "auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}


def _choice(name: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise UserError(f"Unknown {name} '{value}'; choose one of {list(allowed)}.")


@dataclass
class TrainingSettings:
    protocol: str = "train_unlabeled"
    loss: str = "hard"
    temperature: float = 1.0
    feature_weight: float = 0.0
    data_fraction: float = 0.01
    min_samples_per_task: Optional[int] = None
    max_samples_per_task: Optional[int] = None
    batch_size: int = 16
    max_steps: Optional[int] = 500
    max_epochs: Optional[float] = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_step_size: Optional[int] = 100
    lr_step_epochs: Optional[float] = None
    lr_gamma: float = 0.1
    select_by: str = "last"
    select_every: int = 100
    select_samples: int = 256
    optimizer: str = "adam"
    sam_rho: float = 0.05
    sam_adaptive: bool = False
    sam_space: str = "parameters"
    merge_engine: str = "fused"
    task_vector_dtype: Optional[str] = None
    autocast: Optional[str] = None
    activation_checkpointing: float = 0.0
    per_task_backward: bool = False
    tie_weights: bool = True
    strict: bool = False
    seed: int = 0
    log_every: int = 10
    artifact_dir: Optional[str] = None
    save_merged_model: bool = False
    checkpoint_every: int = 100
    resume: Union[bool, str, None] = False
    fit_data_on_device: Union[bool, str] = "auto"
    profile_steps: int = 0

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> "TrainingSettings":
        """The settings among ``values`` (a method's keyword arguments; other keys are left out)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]

    @property
    def data_protocol(self) -> Protocol:
        return get_protocol(self.protocol)

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __post_init__(self) -> None:
        """Everything a typo could break, before any model is loaded."""
        protocol = get_protocol(self.protocol)
        _choice("loss", self.loss, LOSSES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("sam_space", self.sam_space, SAM_SPACES)
        _choice("merge_engine", self.merge_engine, ENGINES)
        if self.task_vector_dtype not in TASK_VECTOR_DTYPES:
            raise UserError("task_vector_dtype must be null, float32, bfloat16 or float16, got "
                            f"'{self.task_vector_dtype}'.")
        if self.autocast not in AUTOCAST_DTYPES:
            raise UserError(f"autocast must be auto, null, bf16 or fp16, got '{self.autocast}'.")
        if not 0.0 <= float(self.activation_checkpointing) <= 1.0:
            raise UserError("activation_checkpointing is the fraction of layers to checkpoint, in [0, 1]; "
                            f"got {self.activation_checkpointing}.")
        if (self.activation_checkpointing or self.per_task_backward) and self.merge_engine != "fused":
            raise UserError("activation_checkpointing and per_task_backward need merge_engine: fused.")
        if int(self.batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}.")
        check_schedule(self.max_steps, self.max_epochs, self.lr_step_size, self.lr_step_epochs)
        _choice("select_by", self.select_by, SELECTIONS)
        if int(self.checkpoint_every) < 0:
            raise UserError("checkpoint_every must be >= 0 (0: only on SIGINT/SIGTERM), got "
                            f"{self.checkpoint_every}.")
        if self.fit_data_on_device not in (True, False, "auto"):
            raise UserError(f"fit_data_on_device must be true, false or auto, got {self.fit_data_on_device!r}.")
        if int(self.profile_steps) < 0:
            raise UserError(f"profile_steps must be >= 0 (0: no profile), got {self.profile_steps}.")
        if int(self.select_every) < 1 or int(self.select_samples) < 1:
            raise UserError(f"select_every and select_samples must be >= 1, got {self.select_every} and "
                            f"{self.select_samples}.")
        if not 0 < self.data_fraction <= 1:
            raise UserError(f"data_fraction must be in (0, 1], got {self.data_fraction}.")
        if float(self.feature_weight) < 0:
            raise UserError(f"feature_weight must be >= 0 (0: logits only), got {self.feature_weight}.")
        if float(self.feature_weight) > 0 and protocol.ground_truth:
            raise UserError("feature_weight distils the experts' features; protocol train_ground_truth has no "
                            "teacher. Set feature_weight: 0 or choose a label-free protocol.")
        for key in ("temperature", "lr"):  # each named alone: the message names what the user set
            if getattr(self, key) <= 0:
                raise UserError(f"{key} must be positive, got {getattr(self, key)}.")
