"""BatchNorm under merging: running statistics merged like the weights, re-estimated, or per batch.

Running statistics are buffers, not task-vector parameters, so a merge must decide what they
become: :class:`BatchNormMerger` combines them with the same per-layer coefficients as the
weights (differentiably, with :func:`batchnorm_with_stats`), :func:`reestimate_batchnorm`
recomputes them on unlabeled inputs through the merged backbone (:func:`mixed_batches` mixes the
tasks' inputs into its batches), and :func:`batch_statistics` normalises with each batch's own
statistics while training.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..models.heads import Inputs, concat_inputs, inputs_to


def batchnorm_layers(module: nn.Module) -> Dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that keep running statistics, by module name."""
    return {n: m for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None}


def running_stats(module: nn.Module) -> Dict[str, Tensor]:
    """``{"<bn>.running_mean": ..., "<bn>.running_var": ...}`` (copies) of every BatchNorm layer."""
    out = {}
    for name, bn in batchnorm_layers(module).items():
        out[f"{name}.running_mean"] = bn.running_mean.detach().clone()
        out[f"{name}.running_var"] = bn.running_var.detach().clone()
    return out


class BatchNormMerger:
    """Running statistics merged like the weights: pre + sum_k lambda_k^l (stat_k - pre).

    lambda^l is the coefficient column of the layer's own affine ``weight`` (else ``bias``);
    a layer without merged affine parameters uses each expert's mean coefficient. The merged
    variance is clamped at 0 (BatchNorm adds its eps). Differentiable in the coefficients, so
    with ``batchnorm: merge`` the statistics take part in training too.
    """

    def __init__(self, pretrained: Dict[str, Tensor], experts: Sequence[Dict[str, Tensor]],
                 param_names: Sequence[str]):
        self.names = list(pretrained)
        self.base = {n: pretrained[n].float() for n in self.names}
        self.delta = {n: torch.stack([e[n].float() - self.base[n] for e in experts]) for n in self.names}
        index = {p: i for i, p in enumerate(param_names)}
        self.column: Dict[str, Optional[int]] = {}
        for n in self.names:
            layer = n.rsplit(".", 1)[0]
            self.column[n] = index.get(f"{layer}.weight", index.get(f"{layer}.bias"))

    def to(self, device) -> "BatchNormMerger":
        self.base = {n: t.to(device) for n, t in self.base.items()}
        self.delta = {n: t.to(device) for n, t in self.delta.items()}
        return self

    def merged(self, coefficients: Tensor) -> Dict[str, Tensor]:
        out = {}
        fallback = coefficients.mean(dim=1)
        for n in self.names:
            col = self.column[n]
            lam = coefficients[:, col] if col is not None else fallback
            value = self.base[n] + torch.einsum("k,kc->c", lam.to(self.base[n].dtype), self.delta[n])
            out[n] = value.clamp_min(0.0) if n.endswith("running_var") else value
        return out


def _eval_batchnorm(x: Tensor, mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float) -> Tensor:
    """Inference-mode BatchNorm written out, so gradients reach ``mean`` and ``var``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.to(x.dtype).view(shape)) * torch.rsqrt(var.to(x.dtype).view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


@contextlib.contextmanager
def batchnorm_with_stats(module: nn.Module, values: Mapping[str, Tensor]) -> Iterator[None]:
    """BatchNorm layers normalise with ``values`` (``<bn>.running_mean``/``running_var``), differentiably.

    The layers' own buffers are left untouched; their affine parameters are read at call
    time, so merged weights installed by ``functional_call`` are used.
    """
    patched = []
    try:
        for name, bn in batchnorm_layers(module).items():
            mean, var = values.get(f"{name}.running_mean"), values.get(f"{name}.running_var")
            if mean is None or var is None:
                continue

            def forward(x, bn=bn, mean=mean, var=var):
                return _eval_batchnorm(x, mean, var, bn.weight, bn.bias, bn.eps)

            bn.forward = forward
            patched.append(bn)
        yield
    finally:
        for bn in patched:
            del bn.forward


@contextlib.contextmanager
def batch_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the current batch's statistics, leaving running stats as they are."""
    layers = batchnorm_layers(module)
    state = [(bn, bn.training, bn.momentum) for bn in layers.values()]
    try:
        for bn in layers.values():
            bn.train()
            bn.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
        yield
    finally:
        for bn, training, momentum in state:
            bn.train(training)
            bn.momentum = momentum


@torch.no_grad()
def reestimate_batchnorm(backbone: nn.Module, batches: Iterable[Inputs], device=None) -> int:
    """Recompute every BatchNorm layer's running statistics on ``batches`` (unlabeled inputs).

    Running stats are reset and accumulated as a cumulative average over the batches (as
    ``torch.optim.swa_utils.update_bn`` with ``momentum=None``, without needing the batch
    counter), with only the BatchNorm layers in training mode. Returns the number of samples seen (0: no BatchNorm, untouched).
    """
    layers = batchnorm_layers(backbone)
    if not layers:
        return 0
    state = [(bn, bn.training, bn.momentum) for bn in layers.values()]
    seen = 0
    try:
        for bn in layers.values():
            bn.reset_running_stats()
            bn.train()
        for i, batch in enumerate(batches):
            for bn in layers.values():  # cumulative average: the i-th batch weighs 1/(i+1)
                bn.momentum = 1.0 / (i + 1)
            backbone(inputs_to(batch, device) if device is not None else batch)
            seen += len(batch["input_ids"]) if isinstance(batch, dict) else len(batch)
    finally:
        for bn, training, momentum in state:
            bn.train(training)
            bn.momentum = momentum
    return seen


def mixed_batches(inputs: Mapping[str, Inputs], batch_size: int, seed: int = 0) -> List[Inputs]:
    """All tasks' inputs shuffled together into batches (so each batch mixes the tasks)."""
    everything = concat_inputs(list(inputs.values()))
    n = len(everything["input_ids"]) if isinstance(everything, dict) else len(everything)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        # a one-sample batch cannot be normalised in training mode at 1x1 resolution: fold it in
        starts.pop()
    ends = starts[1:] + [n]
    return [_rows(everything, order[a:b]) for a, b in zip(starts, ends)]


def _rows(inputs: Inputs, index) -> Inputs:
    return {k: v[index] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[index]
