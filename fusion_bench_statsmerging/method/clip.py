"""The CLIP image-classification family of the coefficient-distillation trainer.

Task heads are the host's frozen zero-shot heads (text embeddings of each task's class
names), built by its ``CLIPClassificationMixin``; fit inputs are pixel tensors read from the
``image`` column only; all tasks' images go through the merged vision tower in one forward,
since they share the merged weights, and each task's slice is scored with its own head.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from fusion_bench import auto_register_config
from fusion_bench.mixins import CLIPClassificationMixin

from ..engine.distillation import load_pixels, teacher_logits
from ..utils.inputs import Inputs
from .base import CoefficientDistillation

TEACHER_BATCH = 64


@auto_register_config
class CLIPCoefficientDistillation(CLIPClassificationMixin, CoefficientDistillation):
    """Coefficient distillation on CLIP vision pools (the host's TA8/TALL pools, our suites)."""

    pool_family = "clip"

    def setup_task_heads(self, task_names: List[str]) -> None:
        self.setup_zero_shot_classification_head(task_names=task_names)

    def fit_inputs(self, dataset, indices: List[int]) -> Inputs:
        return load_pixels(dataset, indices, self.clip_processor)

    def teacher_targets(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        return teacher_logits(lambda px: self.compute_logits(expert, px, task), inputs, TEACHER_BATCH,
                              self.fabric.device)

    def teacher_features(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        """The expert vision tower's pooled output (what the projection and zero-shot head read)."""
        return teacher_logits(lambda px: expert(pixel_values=px)[1], inputs, TEACHER_BATCH, self.fabric.device)

    def merged_outputs(self, engine: nn.Module, inputs: Dict[str, Inputs]):
        device = self.fabric.device
        images = torch.cat(list(inputs.values())).to(device=device, dtype=torch.float32)
        embeds = engine(pixel_values=images)[1]
        logits, feats, start = {}, {}, 0
        for task, px in inputs.items():
            feats[task] = embeds[start : start + len(px)]
            logits[task] = self.compute_logits(None, None, task, image_embeds=feats[task])
            start += len(px)
        return logits, feats
