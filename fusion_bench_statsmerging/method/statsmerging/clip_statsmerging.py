"""StatsMerging and StatsMerging++ for CLIP vision pools.

Example::

    fusion_bench method=statsmerging modelpool=clip-vit-base-patch32_TA8 \\
        taskpool=clip-vit-classification_TA8

The StatsMergeLearner maps weight statistics of each task vector to merging coefficients and
is trained through the merged model by task-specific teacher distillation (each expert
labels unlabeled images of its own task). Only the learner is optimised.
"""

from __future__ import annotations

from fusion_bench import auto_register_config

from ..clip import CLIPCoefficientDistillation
from .coefficients import LearnerCoefficients, StatsMergingCoefficients, pool_statistics

__all__ = ["CLIPStatsMergingAlgorithm", "LearnerCoefficients", "pool_statistics"]


@auto_register_config
class CLIPStatsMergingAlgorithm(StatsMergingCoefficients, CLIPCoefficientDistillation):
    """StatsMerging (layer-wise by default, task-wise by ``mode``); StatsMerging++ is a config of it."""
