"""The per-task-head family of the coefficient-distillation trainer (CNNs, BERT-style encoders).

The pool is a :class:`~fusion_bench_statsmerging.modelpool.heads.PerTaskHeadsModelPool` (or any pool
with ``load_head(task)``, ``load_processor()`` and ``input_column``). Task vectors cover the
backbone only; each task's own head is loaded frozen and scores that task's slice of one
forward of all tasks' inputs through the merged backbone. Fit inputs are read from the
``image``/``text`` column only. The merged result is a
:class:`~fusion_bench_statsmerging.models.heads.PerTaskHeadsModel` (merged backbone + the heads).

BatchNorm (``batchnorm``), what the running statistics of the merged backbone are, during
coefficient training and in the result:

- ``reestimate`` (default): during training BatchNorm normalises with the statistics of the
  current batch (all tasks' samples together; running stats untouched); after merging, the
  running statistics are re-estimated on the unlabeled fit inputs of all tasks (the
  protocol's split: train by default), mixed in batches of ``batchnorm_batch_size``.
- ``merge``: running statistics merged with the weights' per-layer coefficients,
  ``pre + sum_k lambda_k^l (stat_k - pre)`` (lambda^l: the BatchNorm layer's own weight
  column), differentiably during training and at the final coefficients in the result.
- ``pretrained``: the pretrained backbone's statistics, untouched (an ablation: what a
  merge that ignores buffers gives).

Backbones without BatchNorm (BERT, LayerNorm only) are unaffected by the option. With
BatchNorm, ``reestimate`` and ``merge`` change the forward in ways activation checkpointing's
recomputation would not repeat, so they refuse ``activation_checkpointing`` there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from fusion_bench import auto_register_config
from fusion_bench.mixins import LightningFabricMixin

from ..engine import distributed
from ..engine.batchnorm import (
    BatchNormMerger, batch_statistics, batchnorm_layers, batchnorm_with_stats, mixed_batches, reestimate_batchnorm,
    running_stats,
)
from ..modelpool.heads import save_backbone, save_head
from ..models.heads import PerTaskHeadsModel, concat_inputs, inputs_to, read_inputs
from ..utils import artifacts
from ..utils.errors import PoolError, UserError
from ..utils.inputs import Inputs, num_rows, take
from .base import CoefficientDistillation

log = logging.getLogger(__name__)

BATCHNORM_MODES = ("reestimate", "merge", "pretrained")
TEACHER_BATCH = 64


def engine_module(engine: nn.Module) -> nn.Module:
    """The module an engine runs (fused: ``model``; host: the wrapper's ``pretrained_model``)."""
    if hasattr(engine, "wrapper"):
        return engine.wrapper.pretrained_model
    return engine.model


def engine_coefficients(engine: nn.Module) -> Optional[Tensor]:
    """The (K, L) coefficients the engine last merged at (graph kept), or None before any merge."""
    for attr in ("coefficients", "_coefficients"):
        value = getattr(engine, attr, None)
        if isinstance(value, Tensor):
            return value
    wrapper = getattr(engine, "wrapper", None)
    return getattr(wrapper, "merge_weight", None) if wrapper is not None else None


def require_heads_pool(modelpool, clip_alternative: str) -> None:
    """Refuse a pool without per-task heads, naming what it lacks and what to use instead."""
    missing = [a for a in ("load_head", "load_processor", "input_column") if not hasattr(modelpool, a)]
    if missing:
        raise PoolError(
            f"{type(modelpool).__name__} is not a per-task-head pool (it lacks {missing}). Use "
            f"`modelpool=heads_suite` (PerTaskHeadsModelPool), or {clip_alternative} for CLIP pools."
        )


@auto_register_config
class HeadsCoefficientDistillation(LightningFabricMixin, CoefficientDistillation):
    """Coefficient distillation on shared-backbone pools with one frozen head per task."""

    pool_family = "heads"

    def __init__(self, batchnorm: str = "reestimate", batchnorm_batch_size: Optional[int] = None, **kwargs):
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"Unknown batchnorm '{batchnorm}'; choose one of {list(BATCHNORM_MODES)}.")
        if batchnorm_batch_size is not None and int(batchnorm_batch_size) < 2:
            raise ValueError(f"batchnorm_batch_size must be >= 2 (or null), got {batchnorm_batch_size}.")
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ checks
    def check_pool(self, modelpool):
        require_heads_pool(modelpool, "the CLIP methods")
        return super().check_pool(modelpool)

    # ------------------------------------------------------------------ family hooks
    def setup_task_heads(self, task_names: List[str]) -> None:
        pool = self.modelpool
        self._heads = nn.ModuleDict({t: pool.load_head(t) for t in task_names}).requires_grad_(False).eval()
        self._heads = self.fabric.to_device(self._heads)
        self._processor = pool.load_processor()
        self._column = pool.input_column
        self._bn_merger: Optional[BatchNormMerger] = None
        self._bn_experts = None
        self._fit_pixels = None
        self._final = None
        if self.batchnorm != "pretrained" and (self.batchnorm == "merge" or self.activation_checkpointing):
            pretrained = pool.load_pretrained_model()
            if batchnorm_layers(pretrained) and self.activation_checkpointing:
                raise PoolError(f"batchnorm: {self.batchnorm} changes how BatchNorm normalises during the forward, "
                                "which activation_checkpointing's recomputation would not repeat; set "
                                "activation_checkpointing: 0 (or batchnorm: pretrained) for this BatchNorm backbone.")
            if self.batchnorm == "merge" and batchnorm_layers(pretrained):
                # the experts' statistics, read before the engine consumes the experts
                self._bn_experts = [running_stats(pool.load_model(t)) for t in task_names]
                self._bn_pretrained_stats = running_stats(pretrained)

    def fit_inputs(self, dataset, indices: List[int]) -> Inputs:
        return read_inputs(dataset, indices, self._column, self._processor)

    def _expert_outputs(self, fn, inputs: Inputs) -> Tensor:
        """``fn`` over the inputs in teacher batches on the fabric's device; float32 on the CPU."""
        device = self.fabric.device
        return torch.cat([fn(inputs_to(take(inputs, slice(s, s + TEACHER_BATCH)), device)).float().cpu()
                          for s in range(0, num_rows(inputs), TEACHER_BATCH)])

    def teacher_targets(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        expert.eval()
        return self._expert_outputs(lambda x: self._heads[task](expert(x)), inputs)

    def teacher_features(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        """The expert backbone's output (what its head reads)."""
        expert.eval()
        return self._expert_outputs(expert, inputs)

    def merged_outputs(self, engine: nn.Module, inputs: Dict[str, Inputs]):
        device = self.fabric.device
        # each part to float32 first: autocast refuses to concatenate the compactly stored float16 images
        batch = concat_inputs([inputs_to(x, device) for x in inputs.values()])
        with self._batchnorm_context(engine):
            features = engine(batch)
        logits, feats, start = {}, {}, 0
        for task, x in inputs.items():
            n = num_rows(x)
            feats[task] = features[start:start + n]
            logits[task] = self._heads[task](feats[task])
            start += n
        return logits, feats

    # ------------------------------------------------------------------ BatchNorm
    def _prepare_engine(self, engine: nn.Module) -> None:
        """Once per engine: dropout off (eval mode), and the BatchNorm merger for ``batchnorm: merge``."""
        if getattr(self, "_prepared_engine", None) is engine:
            return
        engine_module(engine).eval()  # BatchNorm then follows `batchnorm` (see _batchnorm_context)
        if self.batchnorm == "merge" and getattr(self, "_bn_experts", None):
            self._bn_merger = BatchNormMerger(self._bn_pretrained_stats, self._bn_experts,
                                              engine.param_names).to(self.fabric.device)
            self._bn_experts = None
        self._prepared_engine = engine

    def _batchnorm_context(self, engine: nn.Module):
        self._prepare_engine(engine)
        module = engine_module(engine)
        if self.batchnorm == "reestimate":
            return batch_statistics(module)
        if self.batchnorm == "merge" and self._bn_merger is not None:
            coefficients = engine_coefficients(engine)
            if coefficients is None:
                return contextlib.nullcontext()
            return batchnorm_with_stats(module, self._bn_merger.merged(coefficients))
        return contextlib.nullcontext()

    def prepare_fit_data(self, datasets, experts):
        fit = super().prepare_fit_data(datasets, experts)
        self._fit_pixels = fit.inputs  # unlabeled inputs, reused to re-estimate BatchNorm statistics
        return fit

    def write_artifacts(self, out_dir, coefficients, param_names, names, *args, **kwargs):
        coef = coefficients if coefficients.dim() == 2 else coefficients[:, None].expand(-1, len(param_names))
        self._final = coef.detach().float().cpu().clone()
        return super().write_artifacts(out_dir, coefficients, param_names, names, *args, **kwargs)

    @torch.no_grad()
    def finalize_batchnorm(self, backbone: nn.Module) -> Dict[str, object]:
        """Give the merged backbone its BatchNorm statistics; returns what was done (for the report)."""
        layers = batchnorm_layers(backbone)
        info: Dict[str, object] = {"mode": self.batchnorm, "layers": len(layers)}
        if not layers:
            info["mode"] = "none (no BatchNorm layers)"
            return info
        if self.batchnorm == "merge":
            merged = self._bn_merger.to("cpu").merged(self._final)
            for name, value in merged.items():
                owner, _, key = name.rpartition(".")
                getattr(backbone.get_submodule(owner), key).copy_(value)
        elif self.batchnorm == "reestimate":
            k = len(self._fit_pixels)
            size = int(self.batchnorm_batch_size or self.batch_size * k)
            batches = mixed_batches(self._fit_pixels, size, self.seed)
            info["samples"] = reestimate_batchnorm(backbone, batches, self.fabric.device)
            info["batch_size"] = size
            info["split"] = self._protocol.split
        return info

    # ------------------------------------------------------------------ run
    def run(self, modelpool):
        if distributed.world_size(self.fabric) > 1:
            raise UserError("The per-task-head family runs in one process: its BatchNorm layers would see each "
                            "rank's share of the batch, not the global batch. Drop fabric.devices / strategy=ddp.")
        save = self.save_merged_model
        self.save_merged_model = False  # saved below, once BatchNorm statistics are final
        try:
            backbone = super().run(modelpool)
        finally:
            self.save_merged_model = save
        backbone = self.fabric.to_device(backbone)
        bn_info = self.finalize_batchnorm(backbone)
        log.info("BatchNorm statistics of the merged backbone: %s", bn_info)
        out_dir = Path(self.out_dir())
        report_path = out_dir / self.report_name
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            report["batchnorm"] = bn_info
            artifacts.save_json(report_path, report)
        model = PerTaskHeadsModel(backbone.eval(), {t: h for t, h in self._heads.items()})
        if save:
            directory = out_dir / "merged_model"
            save_backbone(backbone, directory)
            for task, head in model.heads.items():
                save_head(head, directory / "heads" / f"{task}.safetensors")
        self._fit_pixels = None
        self._prepared_engine = None
        return model
