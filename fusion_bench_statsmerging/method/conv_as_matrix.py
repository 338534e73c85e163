"""The host's data-free matrix mergers (WUDI, Iso-C, Iso-CTS, TSV-M) with convolutions seen as matrices.

Why. The host's WUDI, Iso-C/Iso-CTS and Task Singular Vector merging transform only 2-D
tensors and *average* everything else. On a CLIP pool that is every linear layer; on a CNN
(MobileNetV2, ResNet, ...) almost every weight is a 4-D convolution, so the host's methods
reduce to simple averaging there. The methods themselves are architecture-agnostic: they act
on the matrix of a linear map, and a convolution is a linear map from patches to output
channels. Here each convolution weight ``(out, in/groups, *kernel)`` is seen as the matrix
``out x (in/groups * prod(kernel))`` (the im2col view), handed to the host's functional core
together with the 2-D tensors, and reshaped back afterwards. Grouped and depthwise
convolutions use the same per-group view (``(C, 1, 3, 3)`` -> ``C x 9``): the weights of all
groups side by side, which is what the host's core sees for a 2-D weight too.

What is not changed: the host's function does all the merging (nothing of it is copied here);
tensors other than convolution weights reach it as they are, so it treats them exactly as
the host's own method would (2-D: transformed, the rest: averaged); the scaling after the
merge is the host's (Iso: ``scaling_factor``, TSV-M: ``alpha``). On a model without
convolutions (a BERT-style encoder, CLIP's transformer layers) the result is the host
method's. BatchNorm running statistics are buffers in the state dict and are averaged, as
in the host's methods (``taskpool.batchnorm_reestimate=true`` corrects them label-free).

    fusion_bench method=conv_as_matrix/iso_c modelpool=heads_suite taskpool=heads_suite
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import Tensor, nn

from fusion_bench import BaseAlgorithm, BaseModelPool
from fusion_bench.method.isotropic_merging.iso_utils import check_parameterNamesMatch, iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.wudi.wudi import wudi_merging
from fusion_bench.mixins import LightningFabricMixin
from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_mul, state_dict_sub

log = logging.getLogger(__name__)

StateDict = Dict[str, Tensor]
# the host's functional core: task vectors (one state dict each) -> the merged task vector
MatrixMerger = Callable[[List[StateDict]], StateDict]


def conv_weight_names(model: nn.Module) -> Set[str]:
    """State-dict names of the weights of (non-transposed) convolutions, whatever their dimension."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed}


def as_matrices(state_dict: StateDict, names: Iterable[str]) -> StateDict:
    """``state_dict`` with each tensor of ``names`` viewed as ``out x rest`` (others unchanged)."""
    names = set(names)
    return {k: v.reshape(v.shape[0], -1) if k in names else v for k, v in state_dict.items()}


def merge_conv_as_matrix(task_vectors: Sequence[StateDict], merger: MatrixMerger,
                         conv_names: Iterable[str]) -> StateDict:
    """Run the host's ``merger`` with the convolution weights ``conv_names`` seen as matrices.

    Every task vector's convolution weight is reshaped to ``out x (in/groups * kernel)``, the
    merger gets the reshaped task vectors, and its result for those names is reshaped back to
    the convolution's shape. Names that are not in the state dicts are ignored.
    """
    shapes = {k: v.shape for k, v in task_vectors[0].items() if k in set(conv_names) and v.dim() > 2}
    merged = merger([as_matrices(tv, shapes) for tv in task_vectors])
    return {k: v.detach().reshape(shapes[k]) if k in shapes else v.detach() for k, v in merged.items()}


class ConvAsMatrixMerging(LightningFabricMixin, BaseAlgorithm):
    """Base: task vectors of the whole state dict (as the host's methods), merged by :meth:`merger`
    with convolutions as matrices, scaled by :meth:`scale`, added to the pretrained model."""

    def __init__(self, exclude_keys: Optional[List[str]] = None, **kwargs):
        super().__init__(**kwargs)
        self.exclude_keys = list(exclude_keys or [])

    def merger(self) -> MatrixMerger:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale(self, merged: StateDict) -> StateDict:
        return merged

    def task_vectors(self, modelpool: BaseModelPool) -> Tuple[nn.Module, List[StateDict]]:
        pretrained = modelpool.load_pretrained_model()
        base = pretrained.state_dict()
        vectors = [state_dict_sub(modelpool.load_model(name).state_dict(), base) for name in modelpool.model_names]
        check_parameterNamesMatch(vectors)
        return pretrained, vectors

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        if not isinstance(modelpool, BaseModelPool):
            modelpool = BaseModelPool(modelpool)
        pretrained, vectors = self.task_vectors(modelpool)
        convs = conv_weight_names(pretrained) - set(self.exclude_keys)
        log.info("%s: %d convolution weights merged as matrices", type(self).__name__, len(convs))
        with torch.enable_grad():  # WUDI optimises its merged matrices with Adam
            merged = merge_conv_as_matrix(vectors, self.merger(), convs)
        pretrained.load_state_dict(state_dict_add(pretrained.state_dict(), self.scale(merged)))
        return pretrained


class WUDIConvAsMatrix(ConvAsMatrixMerging):
    """The host's WUDI (``wudi_merging``: per-matrix Adam on the interference loss), convolutions as matrices."""

    def __init__(self, iter_num: int = 400, exclude_keys: Optional[List[str]] = None, **kwargs):
        super().__init__(exclude_keys=exclude_keys, **kwargs)
        self.iter_num = int(iter_num)

    def merger(self) -> MatrixMerger:
        return lambda tvs: wudi_merging(tvs, accelerator=self.fabric.device, iter_num=self.iter_num,
                                        exclude_keys=self.exclude_keys)


class IsoCConvAsMatrix(ConvAsMatrixMerging):
    """The host's Iso-C (``iso_c``: flattened spectrum of the summed task matrices), convolutions as matrices."""

    def __init__(self, scaling_factor: float = 1.0, exclude_keys: Optional[List[str]] = None, **kwargs):
        super().__init__(exclude_keys=exclude_keys, **kwargs)
        self.scaling_factor = float(scaling_factor)

    def merger(self) -> MatrixMerger:
        return lambda tvs: iso_c(tvs, accelerator=self.fabric.device, exclude_keys=self.exclude_keys)

    def scale(self, merged: StateDict) -> StateDict:
        return state_dict_mul(merged, self.scaling_factor)


class IsoCTSConvAsMatrix(IsoCConvAsMatrix):
    """The host's Iso-CTS (``iso_cts``: common + task-specific subspaces), convolutions as matrices."""

    def __init__(self, scaling_factor: float = 1.0, common_space_fraction: float = 0.8,
                 exclude_keys: Optional[List[str]] = None, **kwargs):
        super().__init__(scaling_factor=scaling_factor, exclude_keys=exclude_keys, **kwargs)
        self.common_space_fraction = float(common_space_fraction)

    def merger(self) -> MatrixMerger:
        return lambda tvs: iso_cts(tvs, common_space_fraction=self.common_space_fraction,
                                   accelerator=self.fabric.device, exclude_keys=self.exclude_keys)


class TSVMConvAsMatrix(ConvAsMatrixMerging):
    """The host's TSV-M (``compute_and_sum_svd_mem_reduction``: each task's top 1/K singular
    vectors, orthogonalised), convolutions as matrices. ``alpha``: a float scales the merged
    task vector, a list scales each task vector first (as the host's TaskSingularVectorMerging)."""

    def __init__(self, alpha: Union[float, Sequence[float], None] = 1.0, exclude_keys: Optional[List[str]] = None,
                 **kwargs):
        super().__init__(exclude_keys=exclude_keys, **kwargs)
        self.alpha = alpha

    def task_vectors(self, modelpool: BaseModelPool) -> Tuple[nn.Module, List[StateDict]]:
        pretrained, vectors = super().task_vectors(modelpool)
        if self.alpha is not None and not isinstance(self.alpha, (int, float)):
            alphas = list(self.alpha)
            if len(alphas) != len(vectors):
                raise ValueError(f"alpha has {len(alphas)} values for {len(vectors)} models.")
            vectors = [state_dict_mul(tv, float(a)) for tv, a in zip(vectors, alphas)]
        return pretrained, vectors

    def merger(self) -> MatrixMerger:
        return lambda tvs: compute_and_sum_svd_mem_reduction(tvs, exclude_keys=self.exclude_keys,
                                                             accelerator=self.fabric.device)

    def scale(self, merged: StateDict) -> StateDict:
        if isinstance(self.alpha, (int, float)):
            return state_dict_mul(merged, float(self.alpha))
        return merged
