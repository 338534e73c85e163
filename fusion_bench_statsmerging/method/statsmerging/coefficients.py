"""StatsMerging's coefficient module, independent of the model family.

Statistics of each task vector (per layer, or of the whole vector) are normalised and fed
to the StatsMergeLearner; its outputs are the merging coefficients. The
:class:`StatsMergingCoefficients` mixin adds StatsMerging's options and artefacts to any
model family's trainer (``CLIPCoefficientDistillation`` for CLIP, others alike).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ... import artifacts
from ...learner import StatsMergeLearner, relative_depth
from ...stats import (
    FeatureNormalizer, layer_wise_statistics, num_features, task_wise_statistics, validate_features,
)

log = logging.getLogger(__name__)

MODES = ("layer_wise", "task_wise")


class LearnerCoefficients(nn.Module):
    """Coefficients as a function of fixed statistics: gradients reach only the learner."""

    def __init__(self, learner: StatsMergeLearner, features: Tensor, num_layers: int, mode: str):
        super().__init__()
        self.learner = learner
        self.mode = mode
        self.num_layers = num_layers
        self.register_buffer("features", features)
        self.register_buffer("depth", relative_depth(num_layers) if mode == "layer_wise" else torch.zeros(features.shape[0]))

    def forward(self) -> Tensor:
        coef = self.learner(self.features, self.depth)
        if self.mode == "task_wise":
            coef = coef[:, None].expand(-1, self.num_layers)
        return coef


def pool_statistics(engine: nn.Module, mode: str, features: Sequence[str], rank: int) -> Tensor:
    """Raw statistics of the engine's task vectors: (K, L, F) layer-wise or (K, F) task-wise."""
    task_vectors = [engine.task_vector(k) for k in range(engine.num_models)]
    if mode == "task_wise":
        return task_wise_statistics(task_vectors, features, rank)
    batched = getattr(engine, "layer_wise_statistics", None)
    if batched is not None:
        return batched(features, rank)
    return layer_wise_statistics(task_vectors, features, rank)


class StatsMergingCoefficients:
    """Mixin: StatsMerging's options, learner and artefacts, placed before a family trainer in the
    bases (e.g. ``class X(StatsMergingCoefficients, CLIPCoefficientDistillation)``)."""

    method_label = "StatsMerging"

    def __init__(
        self,
        mode: str = "layer_wise",
        features: Sequence[str] = ("mean", "variance", "norm", "singular_values"),
        rank: int = 3,
        hidden_dim: int = 128,
        learner_layers: int = 2,
        output: str = "sigmoid",
        init_coefficient: float = 0.3,
        max_coefficient: float = 1.0,
        use_depth: bool = True,
        name: Optional[str] = None,
        **kwargs,
    ):
        if mode not in MODES:
            raise ValueError(f"Unknown mode '{mode}'; choose one of {list(MODES)}.")
        validate_features(features)
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}.")
        # Build a throwaway learner to validate output/init/depth settings up front.
        StatsMergeLearner(1, hidden_dim, learner_layers, output, init_coefficient, max_coefficient)
        super().__init__(**kwargs)
        if name:
            self.method_label = name

    def build_coefficient_module(self, engine: nn.Module, model_names: List[str]) -> nn.Module:
        feats = list(self.features)
        raw = pool_statistics(engine, self.mode, feats, self.rank)
        self._normalizer = FeatureNormalizer.fit(raw)
        learner = StatsMergeLearner(
            num_features(feats, self.rank), self.hidden_dim, self.learner_layers, self.output,
            self.init_coefficient, self.max_coefficient,
            use_depth=self.use_depth and self.mode == "layer_wise",
        )
        log.info("StatsMergeLearner: %d parameters; statistics %s", sum(p.numel() for p in learner.parameters()),
                 tuple(raw.shape))
        self._raw_statistics = raw.cpu()
        return LearnerCoefficients(learner, self._normalizer(raw).float(), len(engine.param_names), self.mode)

    def write_artifacts(self, out_dir, coefficients, param_names, names, *args, **kwargs):
        if self.mode == "task_wise":
            coefficients = coefficients[:, 0]
        return super().write_artifacts(out_dir, coefficients, param_names, names, *args, **kwargs)

    def extra_artifacts(self, coefficient_module: LearnerCoefficients, out_dir: str) -> Dict[str, str]:
        learner = coefficient_module.learner
        state = {
            "learner_state_dict": {k: v.cpu() for k, v in learner.state_dict().items()},
            "normalizer": self._normalizer.state_dict(),
            "raw_statistics": self._raw_statistics,
            "learner_config": {
                "in_features": num_features(list(self.features), self.rank), "hidden_dim": self.hidden_dim,
                "num_layers": self.learner_layers, "output": self.output,
                "init_coefficient": self.init_coefficient, "max_coefficient": self.max_coefficient,
                "use_depth": learner.use_depth,
            },
            "mode": self.mode, "features": list(self.features), "rank": self.rank,
        }
        return {"learner": str(artifacts.save_torch(f"{out_dir}/learner.pt", state))}
