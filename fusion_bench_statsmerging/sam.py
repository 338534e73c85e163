"""Sharpness-Aware Minimization around any base optimizer, shared by SAMerging and StatsMerging.

A SAM step needs two gradients: at the current parameters w, and at the perturbed point
w + e with e = rho * g / ||g|| (ASAM, ``adaptive=True``: e = rho * w^2 g / ||w g||). The
second gradient is only meaningful if the loss is *recomputed at the perturbed point*; for
merging that means re-merging the model from the perturbed coefficients. The published
SAMerging code reused the merged weights cached before the perturbation, so its second
gradient equalled the first. Here the closure always re-merges, because it is the closure
that computes the coefficients and merges.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
from torch import Tensor


class SAM:
    """``step(closure)``: closure() -> (loss, extras) must merge and evaluate from scratch."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}.")
        self.base_optimizer = base_optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.last_first_grads: List[Tensor] = []
        self.last_second_grads: List[Tensor] = []
        self.last_perturbation: List[Tensor] = []

    @property
    def param_groups(self):
        return self.base_optimizer.param_groups

    def _params(self) -> List[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def _perturbation(self, params: List[torch.nn.Parameter]) -> List[Tensor]:
        scaled = [(p.abs() * p.grad if self.adaptive else p.grad) if p.grad is not None else torch.zeros_like(p)
                  for p in params]
        norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2)
        factor = self.rho / (norm + 1e-12)
        return [(p.abs() * s if self.adaptive else s) * factor for p, s in zip(params, scaled)]

    def step(self, closure: Callable[[], Tuple[Tensor, object]]):
        params = self._params()
        self.zero_grad()
        with torch.enable_grad():
            loss, extras = closure()
            if loss.requires_grad:  # a closure may compute its gradients itself (per-task backward)
                loss.backward()
        self.last_first_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        eps = self._perturbation(params)
        self.last_perturbation = eps
        # keep the exact starting point: w + e - e need not round back to w in floating point
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        self.zero_grad()
        with torch.enable_grad():
            perturbed_loss, _ = closure()  # re-merges at w + e
            if perturbed_loss.requires_grad:
                perturbed_loss.backward()
        self.last_second_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        with torch.no_grad():
            for p, w in zip(params, origin):
                p.copy_(w)
        self.base_optimizer.step()
        self.zero_grad()
        return loss, extras
