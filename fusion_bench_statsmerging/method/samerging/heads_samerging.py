"""SAMerging for shared-backbone pools with one head per task.

Example (a suite in the layout of :mod:`fusion_bench_statsmerging.modelpool.heads`)::

    fusion_bench method=samerging_heads modelpool=heads_suite taskpool=heads_suite \\
        modelpool.suite_dir=DIR taskpool.suite_dir=DIR

Free coefficients over the backbone's task vectors, SAM around Adam; every task keeps its own
frozen head, and BatchNorm statistics follow the ``batchnorm`` option (see
:mod:`fusion_bench_statsmerging.method.heads`).
"""

from __future__ import annotations

from fusion_bench import auto_register_config

from ..heads import HeadsCoefficientDistillation
from .coefficients import SAMergingCoefficients

__all__ = ["HeadsSAMergingAlgorithm"]


@auto_register_config
class HeadsSAMergingAlgorithm(SAMergingCoefficients, HeadsCoefficientDistillation):
    """SAMerging (free coefficients, SAM around Adam) on per-task-head pools."""
