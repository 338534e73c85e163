"""Sharpness-Aware Minimization around any base optimizer, shared by SAMerging and StatsMerging.

A SAM step needs two gradients: at the current parameters w, and at the perturbed point
w + e with e = rho * g / ||g|| (ASAM, ``adaptive=True``: e = rho * w^2 g / ||w g||). The
second gradient is only meaningful if the loss is *recomputed at the perturbed point*; for
merging that means re-merging the model from the perturbed coefficients. The published
SAMerging code reused the merged weights cached before the perturbation, so its second
gradient equalled the first. Here the closure always re-merges, because it is the closure
that computes the coefficients and merges.

Where the perturbation lives (``OutputPerturbation``): for free coefficients (SAMerging) the
parameters *are* the merging coefficients. For StatsMerging the parameters are a learner's weights;
a radius-rho step in that space moves the coefficients by whatever the learner's Jacobian makes of
it, which on the real suites destabilised the learner (docs/benchmarks.md). Perturbing the learner's
*output* instead asks the question SAMerging asks -- is the loss flat around these coefficients? --
whatever produces them; the second gradient then flows back to the parameters through the output.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def perturbation(points: Sequence[Tensor], grads: Sequence[Optional[Tensor]], rho: float,
                 adaptive: bool) -> List[Tensor]:
    """e = rho * g / ||g|| over all tensors together (ASAM: e = rho * w^2 g / ||w g||)."""
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(points, grads)]
    scaled = [w.abs() * g if adaptive else g for w, g in zip(points, grads)]
    norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2)
    factor = rho / (norm + 1e-12)
    return [(w.abs() * s if adaptive else s) * factor for w, s in zip(points, scaled)]


class OutputPerturbation:
    """A coefficient module seen through SAM in coefficient space: ``self()`` returns the module's
    coefficients plus ``shift`` (None: unshifted) and keeps them in ``last`` with their gradient."""

    def __init__(self, module: Callable[[], Tensor]):
        self.module = module
        self.shift: Optional[Tensor] = None
        self.last: Optional[Tensor] = None

    def __call__(self) -> Tensor:
        coefficients = self.module()
        if coefficients.requires_grad:
            coefficients.retain_grad()
        self.last = coefficients
        return coefficients if self.shift is None else coefficients + self.shift


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

    def _run(self, closure: Callable[[], Tuple[Tensor, object]]) -> Tuple[Tensor, object]:
        self.zero_grad()
        with torch.enable_grad():
            loss, extras = closure()
            if loss.requires_grad:  # a closure may compute its gradients itself (per-task backward)
                loss.backward()
        return loss, extras

    def step(self, closure: Callable[[], Tuple[Tensor, object]], output: Optional[OutputPerturbation] = None,
             reduce: Optional[Callable[[List[Tensor]], None]] = None):
        """One SAM step. With ``output`` (the closure merges from ``output()``), the perturbation is
        applied to the coefficients ``output`` produces, from their gradient (averaged by ``reduce``
        across ranks when given); otherwise to the optimizer's parameters."""
        if output is not None:
            return self._step_in_output_space(closure, output, reduce)
        params = self._params()
        loss, extras = self._run(closure)
        self.last_first_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        with torch.no_grad():
            eps = perturbation(params, [p.grad for p in params], self.rho, self.adaptive)
        self.last_perturbation = eps
        # keep the exact starting point: w + e - e need not round back to w in floating point
        origin = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        self._run(closure)  # re-merges at w + e
        self.last_second_grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        with torch.no_grad():
            for p, w in zip(params, origin):
                p.copy_(w)
        self.base_optimizer.step()
        self.zero_grad()
        return loss, extras

    def _step_in_output_space(self, closure, output: OutputPerturbation, reduce) -> Tuple[Tensor, object]:
        output.shift = None
        loss, extras = self._run(closure)
        point = output.last
        grad = torch.zeros_like(point) if point.grad is None else point.grad.detach().clone()
        if reduce is not None:
            reduce([grad])
        with torch.no_grad():
            output.shift = perturbation([point.detach()], [grad], self.rho, self.adaptive)[0]
        self.last_perturbation = [output.shift]
        try:
            self._run(closure)  # re-merges at coefficients + e; the gradient reaches the parameters
        finally:
            output.shift = None
        self.base_optimizer.step()
        self.zero_grad()
        return loss, extras
