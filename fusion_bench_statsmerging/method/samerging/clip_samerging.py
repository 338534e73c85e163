"""SAMerging for CLIP vision pools.

Example::

    fusion_bench method=samerging modelpool=clip-vit-base-patch32_TA8 \\
        taskpool=clip-vit-classification_TA8

Free layer-wise (or task-wise) coefficients over the task vectors, initialised at 0, fitted
by KL distillation from each expert's logits on unlabeled images of its own task (train split
by default), with Sharpness-Aware Minimization whose second pass re-merges the model at the
perturbed coefficients. Only the coefficients are optimised; heads and experts stay frozen.
"""

from __future__ import annotations

from fusion_bench import auto_register_config

from ..clip import CLIPCoefficientDistillation
from .coefficients import FreeCoefficients, SAMergingCoefficients

__all__ = ["CLIPSAMergingAlgorithm", "FreeCoefficients"]


@auto_register_config
class CLIPSAMergingAlgorithm(SAMergingCoefficients, CLIPCoefficientDistillation):
    """SAMerging (layer-wise by default, task-wise by ``mode``)."""
