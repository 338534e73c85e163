"""StatsMergeLearner: a small MLP from weight statistics to merging coefficients.

One MLP is shared by every (expert, layer) entry: layer-wise, lambda_k^l = g(S_k^l, p_l)
where S_k^l are the normalised statistics of expert k's task vector at tensor l and p_l is
the tensor's relative depth in the model (0 = first, 1 = last), so the same learner can
score a pool with any number of experts or layers. Task-wise, lambda_k = g(S_k).

Output normalisation (``output``):

- ``sigmoid`` (default): lambda = max_coefficient * sigmoid(z). Bounded and non-negative,
  like AdaMerging's clamp to [0, 1] but with a gradient everywhere.
- ``softmax``: lambda_k^l = max_coefficient * softmax_k(z) over experts, so each layer's
  coefficients sum to ``max_coefficient`` (a convex combination when it is 1).
- ``unbounded``: lambda = init_coefficient + z (may go negative).

Initialisation: the last layer's bias is set so that every coefficient starts at
``init_coefficient`` (0.3 by default, task arithmetic's usual scale), and its weights are
small but non-zero, so the starting merge is task arithmetic at 0.3 while every learner
parameter already receives a gradient on the first step.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

OUTPUTS = ("sigmoid", "softmax", "unbounded")


def relative_depth(num_layers: int) -> Tensor:
    """Position of each tensor in the model in [0, 1]; comparable across architectures."""
    if num_layers == 1:
        return torch.zeros(1)
    return torch.linspace(0.0, 1.0, num_layers)


class StatsMergeLearner(nn.Module):
    """MLP mapping statistics (..., F) to one coefficient per row."""

    def __init__(
        self,
        in_features: int,
        hidden_dim: int = 128,
        num_layers: int = 2,
        output: Literal["sigmoid", "softmax", "unbounded"] = "sigmoid",
        init_coefficient: float = 0.3,
        max_coefficient: float = 1.0,
        use_depth: bool = True,
        num_experts: int | None = None,
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"Unknown learner output '{output}'; choose one of {list(OUTPUTS)}.")
        if num_layers < 1:
            raise ValueError(f"learner num_layers must be >= 1, got {num_layers}.")
        if output != "unbounded" and not 0 < init_coefficient < max_coefficient:
            raise ValueError(
                f"init_coefficient={init_coefficient} must lie strictly between 0 and "
                f"max_coefficient={max_coefficient} for output '{output}'."
            )
        self.output = output
        self.init_coefficient = float(init_coefficient)
        self.max_coefficient = float(max_coefficient)
        self.use_depth = use_depth
        width = in_features + (1 if use_depth else 0)
        layers: list[nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        self.head = nn.Linear(width, 1)
        self.body = nn.Sequential(*layers)
        nn.init.normal_(self.head.weight, std=1e-3)
        nn.init.constant_(self.head.bias, self._initial_bias(num_experts))

    def _initial_bias(self, num_experts: int | None) -> float:
        """Bias that makes every output start at ``init_coefficient``."""
        if self.output == "sigmoid":
            p = self.init_coefficient / self.max_coefficient
            return math.log(p / (1 - p))
        return 0.0  # softmax: uniform over experts; unbounded: init added explicitly

    def forward(self, features: Tensor, depth: Tensor | None = None) -> Tensor:
        """Coefficients for statistics of shape (K, F) -> (K,) or (K, L, F) -> (K, L)."""
        x = features
        if self.use_depth:
            if depth is None:
                depth = relative_depth(features.shape[-2]) if features.dim() == 3 else torch.zeros(features.shape[0])
            depth = depth.to(features)
            x = torch.cat([x, depth.expand(*features.shape[:-1]).unsqueeze(-1)], dim=-1)
        z = self.head(self.body(x)).squeeze(-1)
        if self.output == "sigmoid":
            return self.max_coefficient * torch.sigmoid(z)
        if self.output == "softmax":
            return self.max_coefficient * torch.softmax(z, dim=0)
        return self.init_coefficient + z
