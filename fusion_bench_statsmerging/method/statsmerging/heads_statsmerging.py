"""StatsMerging and StatsMerging++ for shared-backbone pools with one head per task.

Example (a suite in the layout of :mod:`fusion_bench_statsmerging.modelpool.heads`)::

    fusion_bench method=statsmerging_heads modelpool=heads_suite taskpool=heads_suite \\
        modelpool.suite_dir=DIR taskpool.suite_dir=DIR

Task vectors are over the backbone only; every task keeps its own frozen head. BatchNorm
statistics follow the ``batchnorm`` option (``reestimate`` by default; see
:mod:`fusion_bench_statsmerging.method.heads`). Only the coefficient module is optimised.
"""

from __future__ import annotations

from fusion_bench import auto_register_config

from ..heads import HeadsCoefficientDistillation
from .coefficients import StatsMergingCoefficients

__all__ = ["HeadsStatsMergingAlgorithm"]


@auto_register_config
class HeadsStatsMergingAlgorithm(StatsMergingCoefficients, HeadsCoefficientDistillation):
    """StatsMerging (layer-wise by default, task-wise by ``mode``); StatsMerging++ is a config of it."""

