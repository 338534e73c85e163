"""Fused merging engine: the same interface as :class:`~.merge.HostLayerWiseEngine`, far less work.

The host's ``LayerWiseMergedModel`` keeps K fine-tuned models as task vectors and merges with
a Python loop of K x L multiply-adds (and autograd replays that loop, per task, on every
backward). Here every task vector lives once in a few flat buffers, one per *group* of
tensors with the same number of elements and dtype (for CLIP ViT-B/32: 768, 3072, 38400,
768*768 and 768*3072 -- the fc1/fc2 matrices and the patch-embedding kernel share the last)::

    tv_g:   (n_g, K, numel)   task vectors, in ``task_vector_dtype`` (default: the weights' dtype)
    base_g: (n_g, numel)      pretrained weights (the pretrained module's parameters are views of it)

and the merge of a group is one batched matmul, ``base_g + coef_g[:, None, :] @ tv_g``. The
merged tensors handed to ``functional_call`` are views of its result, so the backward of the
whole merge is one batched matmul per group too.

Precision. With fp32 task vectors the merge is exact fp32 (``baddbmm``). With a lower
``task_vector_dtype`` (bf16/fp16) the weighted sum runs as a matmul in that dtype (fp32
accumulation inside the GEMM) and is added to the pretrained weights in their own dtype. The
coefficients are passed as a hi + lo pair of the storage dtype, so they are *not* rounded to
8 bits of mantissa; what remains is the storage rounding of the task vectors and the rounding
of each element of the weighted sum (both relative ~2^-9 of the task-vector part, random in
sign). The merge runs with autocast disabled, so an enclosing ``torch.autocast`` changes
only the model's forward, not the merged weights.

Statistics. :meth:`FusedLayerWiseEngine.layer_wise_statistics` computes them from the group
buffers, batched per group (:mod:`.fused_stats`, with the eigenvalue solvers of :mod:`.spectra`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .fused_stats import grouped_task_vector_stats
from .merge import check_same_architecture, trainable_names

__all__ = ["FusedLayerWiseEngine", "enable_activation_checkpointing"]

DTypeLike = Union[torch.dtype, str, None]


# --------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class TensorGroup:
    """Merged tensors with one flat size and dtype: they share one buffer and one matmul."""

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]
    positions: Tuple[int, ...]  # column of each tensor in the (K, L) coefficients
    numel: int
    dtype: torch.dtype


def plan_groups(names: Sequence[str], params: Dict[str, Tensor]) -> List[TensorGroup]:
    """Group tensors by (numel, dtype) in first-seen order; a group never mixes dtypes."""
    members: Dict[Tuple[int, torch.dtype], List[int]] = {}
    for pos, name in enumerate(names):
        p = params[name]
        members.setdefault((p.numel(), p.dtype), []).append(pos)
    return [
        TensorGroup(
            names=tuple(names[i] for i in idx),
            shapes=tuple(params[names[i]].shape for i in idx),
            positions=tuple(idx),
            numel=numel,
            dtype=dtype,
        )
        for (numel, dtype), idx in members.items()
    ]


def _shaped(group: TensorGroup, rows: Tensor) -> Dict[str, Tensor]:
    """A group's (n, numel) tensor as name -> view in each member's shape (one ``unbind``)."""
    return {name: row.view(shape) for name, shape, row in zip(group.names, group.shapes, rows.unbind(0))}


def resolve_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """Accept ``torch.bfloat16`` or ``"bfloat16"`` (configs hold strings)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"task_vector_dtype must be a floating dtype such as 'bfloat16', got {dtype!r}.")
    return resolved


def _release(param: Tensor) -> None:
    """Drop a consumed expert tensor's storage now, so peak memory stays near one model pool."""
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    """The merge's precision is ours to choose, not the caller's autocast region's."""
    try:
        ctx = torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type without autocast support
        ctx = contextlib.nullcontext()
    with ctx:
        yield


class _LowPrecisionWeightedSum(torch.autograd.Function):
    """``base + coef @ tv`` with ``tv`` in a lower precision than ``base``, in few memory passes.

    Forward: one GEMM of the hi and lo parts of the coefficients against ``tv`` (tv read once),
    then two mixed-dtype adds into ``base``'s dtype (no casted temporaries). Backward: one GEMM
    in the storage dtype (fp32 accumulation), the lo part's exact derivative being 0.
    """

    @staticmethod
    def forward(ctx, base: Tensor, coef: Tensor, tv: Tensor) -> Tensor:
        hi = coef.to(tv.dtype)
        lo = (coef - hi.to(coef.dtype)).to(tv.dtype)
        parts = torch.bmm(torch.cat([hi, lo], dim=1), tv)  # (n, 2, s)
        ctx.save_for_backward(tv)
        ctx.coef_dtype = coef.dtype
        out = (base + parts[:, 0]) + parts[:, 1]  # promotes to the wider dtype
        return out if out.dtype == base.dtype else out.to(base.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (tv,) = ctx.saved_tensors
        grad_coef = None
        if ctx.needs_input_grad[1]:
            grad_coef = torch.bmm(grad.to(tv.dtype).unsqueeze(1), tv.mT).to(ctx.coef_dtype)
        return None, grad_coef, None


def weighted_sum(base: Tensor, coef: Tensor, tv: Tensor) -> Tensor:
    """``base + coef @ tv`` for a group: base (n, s), coef (n, 1, K), tv (n, K, s) -> (n, s).

    Same dtype: one fused ``baddbmm``. Lower-precision task vectors: the coefficients go in as
    hi + lo parts of the storage dtype, so they are not rounded; the sum is added to ``base``
    in ``base``'s dtype (:class:`_LowPrecisionWeightedSum`). ``base`` gets no gradient.
    """
    if tv.dtype == base.dtype:
        return torch.baddbmm(base.unsqueeze(1), coef.to(base.dtype), tv).squeeze(1)
    return _LowPrecisionWeightedSum.apply(base, coef, tv)


# --------------------------------------------------------------------------- engine
class FusedLayerWiseEngine(nn.Module):
    """Layer-wise merging with grouped task-vector buffers and batched-matmul merges.

    Interface identical to :class:`~.merge.HostLayerWiseEngine`. The fine-tuned models are
    consumed: their merged tensors are released group by group as they are copied into the
    buffers (like the host, which turns them into task vectors in place), so do not use them
    afterwards. The pretrained model's module structure is reused for the forward.
    """

    def __init__(self, pretrained_model: nn.Module, finetuned_models: Sequence[nn.Module],
                 tie_weights: bool = True, strict: bool = False, task_vector_dtype: DTypeLike = None):
        super().__init__()
        finetuned_models = list(finetuned_models)
        names = trainable_names(pretrained_model)
        check_same_architecture(pretrained_model, finetuned_models, names)
        self.param_names: List[str] = names
        self.num_models = len(finetuned_models)
        self.tie_weights = tie_weights
        self.strict = strict
        self.task_vector_dtype = resolve_dtype(task_vector_dtype)
        params = dict(pretrained_model.named_parameters())
        self.groups = plan_groups(names, params)
        self.model = pretrained_model.requires_grad_(False)
        self._coefficients: Optional[Tensor] = None
        self._merged: Optional[Dict[str, Tensor]] = None
        self._active: Optional[Dict[str, Tensor]] = None
        self._linked = True
        self._slot_cache: Optional[Dict[str, List[Tuple[Dict[str, Optional[Tensor]], str]]]] = None
        for i, group in enumerate(self.groups):
            base, tv = self._build_group(group, params, finetuned_models)
            self.register_buffer(f"base_{i}", base, persistent=False)
            self.register_buffer(f"tv_{i}", tv, persistent=False)
            self.register_buffer(f"pos_{i}", torch.tensor(group.positions, dtype=torch.long,
                                                          device=base.device), persistent=False)
        self._link_pretrained()

    # ---------------------------------------------------------------- construction
    def _build_group(self, group: TensorGroup, params: Dict[str, Tensor],
                     finetuned: Sequence[nn.Module]) -> Tuple[Tensor, Tensor]:
        """Copy one group's pretrained weights and task vectors into fresh flat buffers."""
        device = params[group.names[0]].device
        base = torch.empty(len(group.names), group.numel, dtype=group.dtype, device=device)
        tv = torch.empty(len(group.names), self.num_models, group.numel,
                         dtype=self.task_vector_dtype or group.dtype, device=device)
        for j, name in enumerate(group.names):
            base[j].copy_(params[name].detach().reshape(-1))
        pretrained_ids = {id(p) for p in params.values()}
        consumed: List[Tensor] = []
        for k, model in enumerate(finetuned):
            expert = dict(model.named_parameters())
            for j, name in enumerate(group.names):
                p = expert[name]
                # Difference in the weights' dtype (like the host), then cast into storage.
                tv[j, k].copy_(p.detach().reshape(-1).to(device=device, dtype=group.dtype) - base[j])
                if id(p) not in pretrained_ids:
                    consumed.append(p)
        for p in consumed:  # after all experts: an expert passed twice is still read whole
            _release(p)
        return base, tv

    def _link_pretrained(self) -> None:
        """Make the pretrained module's merged parameters views of ``base``: no second copy."""
        for i, group in enumerate(self.groups):
            base = getattr(self, f"base_{i}")
            for j, (name, shape) in enumerate(zip(group.names, group.shapes)):
                self.model.get_parameter(name).data = base[j].view(shape)

    def _apply(self, fn, *args, **kwargs):
        """After ``.to()``/``.half()``, re-link the parameters (moved one by one) to the moved buffers."""
        super()._apply(fn, *args, **kwargs)
        if self._linked:
            self._link_pretrained()
        self._slot_cache = None
        self._merged = None  # merged views point at the old tensors; re-merge lazily
        return self

    # ---------------------------------------------------------------- interface
    def group_buffers(self) -> Iterator[Tuple[TensorGroup, Tensor, Tensor, Tensor]]:
        """(group, base (n, s), task vectors (n, K, s), coefficient columns (n,)) per group."""
        for i, group in enumerate(self.groups):
            yield group, getattr(self, f"base_{i}"), getattr(self, f"tv_{i}"), getattr(self, f"pos_{i}")

    @property
    def device(self) -> torch.device:
        return self.base_0.device if self.groups else torch.device("cpu")

    def task_vector(self, k: int) -> Dict[str, Tensor]:
        """Expert k's task vector as views of the buffers (storage dtype), in ``param_names`` order."""
        if not 0 <= k < self.num_models:
            raise IndexError(f"expert index {k} out of range for {self.num_models} experts")
        views: Dict[str, Tensor] = {}
        for group, _, tv, _ in self.group_buffers():
            views.update(_shaped(group, tv[:, k]))
        return {name: views[name] for name in self.param_names}

    def pretrained_tensors(self) -> Dict[str, Tensor]:
        """The pretrained weights as views of ``base`` (valid even after :meth:`merge_and_unload`)."""
        views: Dict[str, Tensor] = {}
        for group, base, _, _ in self.group_buffers():
            views.update(_shaped(group, base))
        return {name: views[name] for name in self.param_names}

    def merge(self, coefficients: Tensor) -> Dict[str, Tensor]:
        """Merged tensors (name -> view of its group's result), differentiable in ``coefficients``."""
        merged: Dict[str, Tensor] = {}
        for group, result in self._merge_groups(coefficients):
            merged.update(_shaped(group, result))
        return merged

    def _merge_groups(self, coefficients: Tensor) -> List[Tuple[TensorGroup, Tensor]]:
        """One (n, numel) merged tensor per group: pretrained + sum_k coef[k, l] * tau_k[l]."""
        expected = (self.num_models, len(self.param_names))
        if tuple(coefficients.shape) != expected:
            raise ValueError(f"coefficients must have shape (num_models, num_tensors) = {expected}, "
                             f"got {tuple(coefficients.shape)}.")
        columns = coefficients.to(self.device).t()  # (L, K)
        out = []
        with _no_autocast(self.device):
            for group, base, tv, pos in self.group_buffers():
                coef = columns.index_select(0, pos).unsqueeze(1)  # (n, 1, K)
                out.append((group, weighted_sum(base, coef, tv)))
        return out

    def set_coefficients_detached(self, coefficients: Tensor) -> Callable[[], None]:
        """Merge once with the merged tensors as graph leaves; returns ``finish()``.

        Forward/backward passes that follow (e.g. one per task, so that only one task's
        activations are alive at a time) accumulate gradients on the merged tensors; ``finish()``
        then sends them through the merge to the coefficients in one backward. Same gradients
        as a single pass over all tasks, with the activation memory of one task.
        """
        self._coefficients = coefficients
        outputs, leaves, merged = [], [], {}
        for group, result in self._merge_groups(coefficients):
            leaf = result.detach().requires_grad_(True)
            outputs.append(result)
            leaves.append(leaf)
            merged.update(_shaped(group, leaf))
        self._merged = merged

        def finish() -> None:
            grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
            if any(out.requires_grad for out in outputs):
                torch.autograd.backward(outputs, grads)
            self._merged = None  # the leaves' graph is spent; the next forward merges again

        return finish

    def set_coefficients(self, coefficients: Tensor) -> None:
        """Merge at ``coefficients`` (K, L), keeping the graph to whatever produced them."""
        self._merged = self.merge(coefficients)
        self._coefficients = coefficients

    def _call_params(self) -> Dict[str, Tensor]:
        """The tensors ``functional_call`` swaps in: merged ones, plus the rest when ``strict``."""
        if self._merged is None:
            if self._coefficients is not None:  # moved since the last merge
                self._merged = self.merge(self._coefficients)
            else:  # like the host before any merge: coefficients 0, i.e. the pretrained weights
                self._merged = self.pretrained_tensors()
        if not self.strict:
            return self._merged
        return self._with_unmerged(self._merged)

    def _with_unmerged(self, merged: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """All parameters and buffers (strict mode) with merged values for the merged names.

        Aliases of a merged tensor get the merged value when ``tie_weights`` (functional_call
        rejects differing values for tied names), else they keep the pretrained one.
        """
        module_params = dict(self.model.named_parameters())
        merged_by_id = {id(module_params[n]): merged[n] for n in merged}
        full: Dict[str, Tensor] = {}
        for name, t in [*self.model.named_parameters(remove_duplicate=False),
                        *self.model.named_buffers(remove_duplicate=False)]:
            if name in merged:
                full[name] = merged[name]
            elif self.tie_weights and id(t) in merged_by_id:
                full[name] = merged_by_id[id(t)]
            else:
                full[name] = t
        return full

    def forward(self, *args, **kwargs):
        params = self._call_params()
        self._active = params
        return functional_call(self.model, params, args, kwargs,
                               tie_weights=self.tie_weights, strict=self.strict)

    def _slots(self) -> Dict[str, List[Tuple[Dict[str, Optional[Tensor]], str]]]:
        """name -> the (``_parameters``/``_buffers`` dict, key) pairs holding it, aliases included."""
        if self._slot_cache is None:
            slots: Dict[str, List[Tuple[Dict[str, Optional[Tensor]], str]]] = {}
            owners: Dict[int, List[Tuple[Dict[str, Optional[Tensor]], str]]] = {}
            for prefix, module in self.model.named_modules(remove_duplicate=False):
                for table in (module._parameters, module._buffers):
                    for key, tensor in table.items():
                        name = f"{prefix}.{key}" if prefix else key
                        slots.setdefault(name, []).append((table, key))
                        if tensor is not None:
                            owners.setdefault(id(tensor), []).append((table, key))
            if self.tie_weights:  # a merged value also replaces the tensor's aliases
                for name in self.param_names:
                    slots[name] = owners[id(self.model.get_parameter(name))]
            self._slot_cache = slots
        return self._slot_cache

    @contextlib.contextmanager
    def _installed(self, params: Dict[str, Tensor]) -> Iterator[None]:
        """Put ``params`` into the module (as ``functional_call`` does) and restore on exit.

        Cheap (dict assignments, slots cached) because recomputation enters it once per
        checkpointed segment per step.
        """
        slots = self._slots()
        swapped: List[Tuple[Dict[str, Optional[Tensor]], str, Optional[Tensor]]] = []
        try:
            for name, value in params.items():
                for table, key in slots[name]:
                    swapped.append((table, key, table[key]))
                    table[key] = value
            yield
        finally:
            for table, key, original in reversed(swapped):
                table[key] = original

    def recompute_context(self) -> Tuple[ContextManager, ContextManager]:
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint`` inside :meth:`forward`.

        A checkpointed segment is recomputed during backward, after ``functional_call`` has
        put the pretrained tensors back; recomputing with those fails torch's saved-tensor
        check (or, were the pretrained tensors trainable, gives wrong gradients silently). The
        second context re-installs the merged tensors of the forward that created the segment.
        """
        params = self._active if self._active is not None else self._call_params()
        return contextlib.nullcontext(), self._installed(params)

    @torch.no_grad()
    def merge_and_unload(self, coefficients: Tensor) -> nn.Module:
        """The pretrained module holding the merged weights, each in its own storage.

        Own storage (not views of the group buffers) so ``save_pretrained``/safetensors see
        ordinary untied tensors; the engine stops re-linking the module to its buffers.
        """
        merged = self.merge(coefficients.detach())
        self._linked = False
        for name in self.param_names:
            param = self.model.get_parameter(name)
            param.data = merged[name].detach().clone(memory_format=torch.contiguous_format)
            param.requires_grad_(False)
        self._merged = None
        self._coefficients = None
        return self.model

    # ---------------------------------------------------------------- statistics
    def layer_wise_statistics(self, features: Sequence[str], rank: int, info: Optional[Dict[str, int]] = None) -> Tensor:
        """Batched :func:`~.stats.layer_wise_statistics` (looked up by ``pool_statistics``); ``info``
        receives the eigenvalue solver's counts (:func:`~.fused_stats.grouped_task_vector_stats`)."""
        groups = [(group.shapes, group.positions, tv, base) for group, base, tv, _ in self.group_buffers()]
        return grouped_task_vector_stats(groups, len(self.param_names), features, rank, info)


def enable_activation_checkpointing(engine: FusedLayerWiseEngine, fraction: float = 1.0) -> int:
    """Turn on a Hugging Face model's gradient checkpointing so that it recomputes correctly.

    Non-reentrant checkpointing with :meth:`FusedLayerWiseEngine.recompute_context`. Only
    ``fraction`` of the checkpointable layers (evenly spaced) recompute: activation memory
    and recomputation time both scale with it. Returns the number of checkpointed layers.
    Hugging Face only checkpoints in training mode, so call ``engine.train()``.
    """
    model = engine.model
    enable = getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable().")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    enable(gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": engine.recompute_context})
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: checkpointing is switched per encoder, all layers
        return -1
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = {round(i * len(layers) / max(1, round(fraction * len(layers))))
              for i in range(round(fraction * len(layers)))} if layers else set()
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return len(chosen)
