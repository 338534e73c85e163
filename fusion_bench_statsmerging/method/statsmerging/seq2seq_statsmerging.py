"""StatsMerging and StatsMerging++ for seq2seq LM pools (Flan-T5 on GLUE, full or LoRA experts).

Example::

    fusion_bench method=statsmerging_flan_t5 modelpool=Seq2SeqLMPool/flan-t5-base_glue \\
        taskpool=flan-t5_glue_text_generation

The StatsMergeLearner maps statistics of each T5 weight tensor's task vector to merging
coefficients and is trained through the merged model by task-specific teacher distillation:
each expert labels unlabeled prompts of its own task with its label-word scores (see
:mod:`fusion_bench_statsmerging.method.seq2seq`). Only the learner is optimised.
"""

from __future__ import annotations

from fusion_bench import auto_register_config

from ..seq2seq import Seq2SeqCoefficientDistillation
from .coefficients import StatsMergingCoefficients

__all__ = ["Seq2SeqStatsMergingAlgorithm"]


@auto_register_config
class Seq2SeqStatsMergingAlgorithm(StatsMergingCoefficients, Seq2SeqCoefficientDistillation):
    """StatsMerging (layer-wise by default, task-wise by ``mode``); StatsMerging++ is a config of it."""
