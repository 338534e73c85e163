"""Task pool of per-task-head suites: each task's frozen head on a (merged) backbone, scored on a split."""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench import BaseTaskPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin

from ..engine.batchnorm import batchnorm_layers, mixed_batches, reestimate_batchnorm
from ..engine.distillation import sample_indices
from ..modelpool.heads import HeadsSuite, HeadsSuiteError, load_head
from ..models.heads import HeadsBackbone, PerTaskHeadsModel, inputs_to, read_inputs

log = logging.getLogger(__name__)


@auto_register_config
class PerTaskHeadsTaskPool(LightningFabricMixin, BaseTaskPool):
    """Accuracy and loss of each task's head on a (merged) backbone, over a suite split.

    Heads come from the model itself (:class:`PerTaskHeadsModel`), else from the run's model
    pool (``load_head``), else from this suite's ``experts/<task>/head.safetensors``. With
    ``batchnorm_reestimate: true`` the backbone's BatchNorm statistics are re-estimated on
    ``reestimate_samples`` unlabeled train images per task before evaluating (on a copy),
    whichever method produced it: a label-free correction one can apply to every baseline.
    ``extra_splits`` (e.g. ``[validation]``) are scored too, each under ``"<split>_split"`` in the
    report, so one run gives the validation scores that choose a configuration and the test
    scores that report it; the main entries stay those of ``split``.
    """

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None, split: str = "test",
                 batch_size: int = 128, batchnorm_reestimate: bool = False, reestimate_samples: int = 256,
                 seed: int = 0, extra_splits: Sequence[str] = (), **kwargs):
        super().__init__(**kwargs)
        self.suite = HeadsSuite(suite_dir)
        self.suite_dir = str(self.suite.root)
        self.tasks = self.suite.select(tasks)
        self.split = split
        self.batch_size = int(batch_size)
        self.batchnorm_reestimate = bool(batchnorm_reestimate)
        self.reestimate_samples = int(reestimate_samples)
        self.seed = seed
        self.extra_splits = [str(x) for x in (extra_splits or ())]
        for name in [split, *self.extra_splits]:
            missing = [t for t in self.tasks if not (self.suite.root / "data" / t / name).is_dir()]
            if missing:
                raise HeadsSuiteError(f"tasks {missing} have no '{name}' split under {self.suite.root / 'data'}.")

    def _heads(self, model: nn.Module) -> Dict[str, nn.Module]:
        if isinstance(model, PerTaskHeadsModel):
            missing = [t for t in self.tasks if t not in model.heads]
            if missing:
                raise HeadsSuiteError(f"the model carries no head for {missing}.")
            return {t: model.heads[t] for t in self.tasks}
        pool = getattr(getattr(self, "_program", None), "modelpool", None)
        if pool is not None and hasattr(pool, "load_head"):
            return {t: pool.load_head(t) for t in self.tasks}
        return {t: load_head(self.suite.head_path(t)) for t in self.tasks}

    def _load(self, task: str, split: str):
        import datasets

        return datasets.load_from_disk(str(self.suite.root / "data" / task / split))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *args, **kwargs) -> Dict[str, Any]:
        import copy

        heads = self._heads(model)
        backbone = model.backbone if isinstance(model, PerTaskHeadsModel) else model
        if not isinstance(backbone, HeadsBackbone):
            raise TypeError(f"expected a HeadsBackbone or PerTaskHeadsModel, got {type(backbone).__name__}.")
        device = self.fabric.device
        processor = self.suite.processor()
        column = self.suite.input_column
        report: Dict[str, Any] = {}
        if self.batchnorm_reestimate and batchnorm_layers(backbone):
            backbone = copy.deepcopy(backbone)
            report["batchnorm"] = {"reestimated_on": "train (unlabeled)",
                                   "samples": self._reestimate(backbone, processor, column, device)}
        backbone = backbone.to(device).eval()
        report.update(self._score_split(backbone, heads, self.split, processor, column, device))
        for extra in self.extra_splits:
            report[f"{extra}_split"] = self._score_split(backbone, heads, extra, processor, column, device)
        n_params = sum(p.numel() for p in backbone.parameters())
        report["model_info"] = {"backbone_params": n_params, "tasks": list(self.tasks)}
        log.info("per-task-head evaluation: %s", {t: report[t]["accuracy"] for t in self.tasks})
        return report

    def _score_split(self, backbone, heads, split: str, processor, column: str, device) -> Dict[str, Any]:
        """Accuracy and loss of every task's head on ``split``, and their averages."""
        scores: Dict[str, Any] = {}
        for task in self.tasks:
            ds = self._load(task, split)
            head = heads[task].to(device).eval()
            correct, loss_sum = 0, 0.0
            for start in range(0, len(ds), self.batch_size):
                rows = ds[start:start + self.batch_size]
                inputs = inputs_to(processor(rows[column]), device)
                labels = torch.as_tensor(rows["label"], device=device)
                logits = head(backbone(inputs)).float()
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(-1) == labels).sum())
            scores[task] = {"accuracy": correct / len(ds), "loss": loss_sum / len(ds)}
        scores["average"] = {k: sum(scores[t][k] for t in self.tasks) / len(self.tasks) for k in ("accuracy", "loss")}
        return scores

    def _reestimate(self, backbone: HeadsBackbone, processor, column: str, device) -> int:
        inputs = {}
        for i, task in enumerate(self.tasks):
            ds = self._load(task, "train")
            idx = sample_indices(len(ds), min(self.reestimate_samples, len(ds)), self.seed + i)
            inputs[task] = read_inputs(ds, idx, column, processor)
        backbone.to(device)
        return reestimate_batchnorm(backbone, mixed_batches(inputs, self.batch_size, self.seed), device)
