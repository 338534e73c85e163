"""Merging engines: merged weights = pretrained + sum_k lambda_k^l * task_vector_k^l, differentiably.

Every engine offers the same small interface, so the algorithms never care which one runs:

- ``param_names``: the merged tensors, in order (the "layers" l; one per trainable tensor);
- ``num_models``: K;
- ``task_vector(k)``: a name -> tensor mapping of expert k's task vector (for statistics);
- ``pretrained_tensors()``: name -> pretrained tensor of the merged tensors (for statistics
  relative to the pretrained weights);
- ``set_coefficients(coefficients)``: merge at a (K, L) coefficient tensor, keeping the graph
  so a loss on the model's output back-propagates into whatever produced the coefficients;
- ``forward(*args, **kwargs)``: run the model with the currently merged weights;
- ``merge_and_unload(coefficients)``: a plain ``nn.Module`` holding the final merged weights.

:class:`HostLayerWiseEngine` is the reference: it wraps the host's ``LayerWiseMergedModel``
(whose merge is a Python loop over tensors and experts). The fused engine
(:mod:`fusion_bench_statsmerging.engine.fused`) gives the same results much faster.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel

from ..utils.errors import UserError
from ..utils.preflight import check_finite_model


class ArchitectureMismatchError(UserError):
    """Experts whose tensors do not line up with the pretrained model's."""


def trainable_names(model: nn.Module) -> List[str]:
    """Names of the tensors that are merged, in the order the host's wrappers use."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def check_same_architecture(pretrained: nn.Module, finetuned: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Fail before any work when an expert's parameter names or shapes differ from the pretrained model."""
    reference = {n: p.shape for n, p in pretrained.named_parameters()}
    for idx, model in enumerate(finetuned):
        params = dict(model.named_parameters())
        missing = [n for n in reference if n not in params]
        extra = [n for n in params if n not in reference]
        shapes = [f"{n}: {tuple(params[n].shape)} vs {tuple(s)}" for n, s in reference.items()
                  if n in params and params[n].shape != s]
        if missing or extra or shapes:
            detail = "; ".join(filter(None, [
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shape {shapes[:3]}" if shapes else "",
            ]))
            raise ArchitectureMismatchError(
                f"Expert #{idx} ({getattr(model, '_statsmerging_name', type(model).__name__)}) does not "
                f"share the pretrained model's architecture ({detail}). Task-vector merging needs "
                "identical tensors; for experts of another architecture, wrap the pool in the "
                "heterogeneous-distillation adapter, which distils them into the target first."
            )
    check_finite_model(pretrained, "_pretrained_", names)
    for idx, model in enumerate(finetuned):
        check_finite_model(model, getattr(model, "_statsmerging_name", f"expert #{idx}"), names)


class HostLayerWiseEngine(nn.Module):
    """The host's ``LayerWiseMergedModel``, driven by externally computed coefficients."""

    def __init__(self, pretrained_model: nn.Module, finetuned_models: Sequence[nn.Module],
                 tie_weights: bool = True, strict: bool = False):
        super().__init__()
        names = trainable_names(pretrained_model)
        check_same_architecture(pretrained_model, finetuned_models, names)
        init = torch.zeros(len(finetuned_models), len(names))
        # The wrapper turns the fine-tuned models into task vectors in place.
        self.wrapper = LayerWiseMergedModel(
            layer_wise_weight=init, pretrained_model=pretrained_model,
            finetuned_models=list(finetuned_models), clamp_weights=False,
            tie_weights=tie_weights, strict=strict,
        )
        # Coefficients come from outside (a learner or a coefficient tensor), not from the
        # wrapper's own parameter: drop it so it can neither be optimised nor go stale.
        del self.wrapper._parameters["merge_weight"]
        self.wrapper.merge_weight = init
        self.param_names = names
        self.num_models = len(finetuned_models)

    def task_vector(self, k: int) -> Dict[str, Tensor]:
        return dict(self.wrapper.task_vectors[k].named_parameters())

    def pretrained_tensors(self) -> Dict[str, Tensor]:
        """The pretrained weights of the merged tensors (statistics such as ``relative_norm``
        need them); valid until :meth:`merge_and_unload` loads the merge into that module."""
        model = self.wrapper.pretrained_model
        return {name: model.get_parameter(name).detach() for name in self.param_names}

    def set_coefficients(self, coefficients: Tensor) -> None:
        self.wrapper.merge_weight = coefficients
        self.wrapper.merge_weights()

    def forward(self, *args, **kwargs):
        return self.wrapper(*args, **kwargs)

    @torch.no_grad()
    def merge_and_unload(self, coefficients: Tensor) -> nn.Module:
        self.set_coefficients(coefficients.detach())
        return self.wrapper.merge_and_unload()

