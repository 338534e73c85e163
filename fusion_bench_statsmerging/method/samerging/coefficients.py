"""SAMerging's coefficient module and options, independent of the model family.

SAMerging learns the merging coefficients themselves (no learner): a free (K, L) parameter
layer-wise, or (K,) task-wise, expanded over the layers. It is fitted by KL distillation
from each expert's cached logits at temperature T, with Sharpness-Aware Minimization around
Adam. The SAM step lives in :mod:`fusion_bench_statsmerging.engine.sam` and is shared with
StatsMerging (``optimizer: sam``); its closure re-merges the model at the perturbed
coefficients, which the published SAMerging code did not do.

The paper's data budget, "``num_batches_per_task`` batches of ``batch_size`` unlabeled
samples per task for ``epochs`` epochs", is translated into the trainer's terms: exactly
``num_batches_per_task * batch_size`` samples per task (fewer if the split is smaller) and
``max_steps = epochs * num_batches_per_task`` steps, each step one batch of every task.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from ...utils.errors import UserError
from ..statsmerging.coefficients import MODES


class FreeCoefficients(nn.Module):
    """The coefficients as a parameter: (K, L) layer-wise, (K,) task-wise; ``forward()`` gives (K, L)."""

    def __init__(self, num_models: int, num_layers: int, mode: str = "layer_wise", init: float = 0.0):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"Unknown mode '{mode}'; choose one of {list(MODES)}.")
        self.mode = mode
        self.num_layers = num_layers
        shape = (num_models, num_layers) if mode == "layer_wise" else (num_models,)
        self.coefficients = nn.Parameter(torch.full(shape, float(init)))

    def forward(self) -> Tensor:
        if self.mode == "task_wise":
            return self.coefficients[:, None].expand(-1, self.num_layers)
        # a plain tensor, never the Parameter itself: an engine that stores the coefficients as a
        # module attribute (the host's wrapper does) would otherwise register it as its own parameter
        return self.coefficients.clone()


class SAMergingCoefficients:
    """Mixin: SAMerging's options and free coefficients, placed before a family trainer in the
    bases (e.g. ``class X(SAMergingCoefficients, CLIPCoefficientDistillation)``).

    The defaults are the paper's: coefficients start at 0 (the pretrained model), KL at T = 2,
    SAM with rho = 0.07 around Adam (lr 1e-3, weight decay 5e-4), 100 batches of 16 samples per
    task, 10 epochs, constant learning rate.
    """

    method_label = "SAMerging"
    report_name = "samerging_report.json"

    def __init__(
        self,
        mode: str = "layer_wise",
        init_coefficient: float = 0.0,
        num_batches_per_task: Optional[int] = 100,
        epochs: Optional[int] = 10,
        max_steps: Optional[int] = None,
        min_samples_per_task: Optional[int] = None,
        max_samples_per_task: Optional[int] = None,
        batch_size: int = 16,
        loss: str = "soft",
        temperature: float = 2.0,
        optimizer: str = "sam",
        sam_rho: float = 0.07,
        sam_adaptive: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        lr_step_size: Optional[int] = None,
        name: Optional[str] = None,
        **kwargs,
    ):
        if mode not in MODES:
            raise UserError(f"Unknown mode '{mode}'; choose one of {list(MODES)}.")
        if num_batches_per_task is not None:
            if int(num_batches_per_task) < 1:
                raise UserError(f"num_batches_per_task must be >= 1 (or null), got {num_batches_per_task}.")
            if min_samples_per_task is not None or max_samples_per_task is not None:
                raise UserError(
                    "num_batches_per_task fixes the samples per task (num_batches_per_task * batch_size); "
                    "set it to null to use data_fraction / min_samples_per_task / max_samples_per_task instead."
                )
            min_samples_per_task = max_samples_per_task = int(num_batches_per_task) * int(batch_size)
        if max_steps is None:
            if epochs is None or num_batches_per_task is None:
                raise UserError("Set max_steps, or both epochs and num_batches_per_task "
                                 "(max_steps = epochs * num_batches_per_task).")
            if int(epochs) < 0:
                raise UserError(f"epochs must be >= 0, got {epochs}.")
            max_steps = int(epochs) * int(num_batches_per_task)
        super().__init__(
            max_steps=max_steps, min_samples_per_task=min_samples_per_task,
            max_samples_per_task=max_samples_per_task, batch_size=batch_size, loss=loss,
            temperature=temperature, optimizer=optimizer, sam_rho=sam_rho, sam_adaptive=sam_adaptive,
            lr=lr, weight_decay=weight_decay, lr_step_size=lr_step_size, **kwargs,
        )
        if name:
            self.method_label = name

    def build_coefficient_module(self, engine: nn.Module, model_names: List[str]) -> nn.Module:
        return FreeCoefficients(engine.num_models, len(engine.param_names), self.mode, self.init_coefficient)

    def write_artifacts(self, out_dir, coefficients, param_names, names, *args, **kwargs):
        if self.mode == "task_wise":
            coefficients = coefficients[:, 0]
        return super().write_artifacts(out_dir, coefficients, param_names, names, *args, **kwargs)
