"""Distil-then-merge on per-task-head suites: experts of another backbone architecture.

:class:`HeterogeneousHeadsModelPool` is a :class:`~fusion_bench_statsmerging.modelpool.heads.PerTaskHeadsModelPool`
in which some tasks' experts have another architecture (an EfficientNet expert in a MobileNetV2
suite, say). Each such expert is the teacher of a **student = the suite's pretrained backbone +
a fresh linear head** for its task, trained on unlabeled images of the task (train split; no
label is read) with the loss, settings, cache and report of :mod:`.heterogeneous`::

    loss = alpha * CE(student, argmax teacher) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

BatchNorm is in training mode while distilling, so the student's running statistics follow
the task's images. The student then stands in for the expert (backbone and head), so every
merging method, ours or the host's, runs on the pool unchanged.

An expert of another architecture is a directory in the suite's expert layout plus a
description of its own architecture (``expert.json``, with the keys of ``suite.json``)::

    <experts_dir>/<task>/expert.json        {"format": "per_task_heads/1", "input": "image",
                                              "backbone": {...}, "preprocessing": {...}}
    <experts_dir>/<task>/model.safetensors  its backbone weights
    <experts_dir>/<task>/head.safetensors   its head for the task's classes (in the task's order)

or a description in the config: ``experts: {task: {path: DIR, backbone: {...}, preprocessing:
{...}}}`` (keys given there override the directory's ``expert.json``). A directory whose
description is the suite's own architecture and preprocessing passes through unchanged.

Example (``benchmarks/real_suites/build_hetero_vision.py`` builds the experts)::

    fusion_bench method=statsmerging_heads modelpool=heads_suite_hetero taskpool=heads_suite \\
        modelpool.suite_dir=DIR
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..engine.distillation import _image_of, image_only_view
from ..engine.student_distillation import DistillationSettings, HeteroPoolError, distill_student
from ..models.heads import HeadsBackbone, ImageProcessor
from ..models.teachers import HeteroExpertError, Teacher, _check_head, check_teacher_outputs, source_fingerprint
from .heads import (
    FORMAT, HEAD_FILE, HeadsSuite, PerTaskHeadsModelPool, build_backbone, check_description, load_head, save_expert,
)
from .heterogeneous import DistilledExpertsMixin, _as_plain, _safe, cache_key, expert_subdirs

__all__ = ["HeterogeneousHeadsModelPool", "HeadsExpert", "HeadsClassifier", "load_heads_teacher"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
EXPERT_FILE = "expert.json"
DESCRIPTION_KEYS = ("input", "backbone", "preprocessing")


def architecture_name(backbone: Mapping[str, Any]) -> str:
    """A short name of a backbone description, for messages and cache entry names."""
    if backbone.get("arch"):
        return str(backbone["arch"])
    if backbone.get("target"):
        return str(backbone["target"]).replace(":", ".").rsplit(".", 1)[-1]
    return str(backbone.get("kind", "backbone"))


class HeadsClassifier(nn.Module):
    """Backbone + one linear head (inputs -> logits), saved in the suite's expert layout by
    ``save_pretrained`` so the student cache can publish it like a transformers model."""

    def __init__(self, backbone: HeadsBackbone, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.backbone(inputs))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        save_expert(self.backbone, self.head, directory)  # head last: the cache's completeness marker


# --------------------------------------------------------------------------- experts
@dataclass
class HeadsExpert:
    """One task's expert: a directory (backbone weights + ``head.safetensors``) and, for an expert of
    another architecture, the suite.json-style description of its backbone and preprocessing
    (``backbone`` None: the suite's own architecture)."""

    name: str
    path: str
    backbone: Optional[Dict[str, Any]] = None
    preprocessing: Optional[Dict[str, Any]] = None
    input: str = "image"

    @property
    def kind(self) -> str:
        return architecture_name(self.backbone or {})

    @classmethod
    def parse(cls, task: str, cfg: Any) -> "HeadsExpert":
        """From a directory path, or a mapping with ``path`` and description keys (which override
        the directory's ``expert.json``)."""
        cfg = _as_plain(cfg)
        if isinstance(cfg, (str, os.PathLike)):
            cfg = {"path": str(cfg)}
        if not isinstance(cfg, Mapping) or not cfg.get("path"):
            raise HeteroExpertError(f"Expert '{task}': expected a directory or a mapping with `path`, got {cfg!r}.")
        unknown = sorted(set(cfg) - {"path", *DESCRIPTION_KEYS})
        if unknown:
            raise HeteroExpertError(f"Expert '{task}': unknown keys {unknown}; known keys are "
                                    f"['path', {', '.join(repr(k) for k in DESCRIPTION_KEYS)}].")
        path = Path(os.path.expanduser(str(cfg["path"]))).resolve()
        if not path.is_dir():
            raise HeteroExpertError(f"Expert '{task}': '{path}' is not a directory (an expert directory holds "
                                    f"model.safetensors and {HEAD_FILE}).")
        description: Dict[str, Any] = {}
        if (path / EXPERT_FILE).is_file():
            description = json.loads((path / EXPERT_FILE).read_text())
        description.update({k: cfg[k] for k in DESCRIPTION_KEYS if k in cfg})
        if "backbone" not in description:  # a plain directory: the suite's own architecture
            return cls(task, str(path))
        description.setdefault("input", "image")
        check_description(description, f"expert '{task}' ({path / EXPERT_FILE})")
        return cls(task, str(path), dict(description["backbone"]), dict(description.get("preprocessing") or {}),
                   description["input"])

    def has_suite_architecture(self, suite: HeadsSuite) -> bool:
        """Same backbone description, preprocessing and input as the suite: merge it as it is."""
        return self.backbone is None or (
            self.backbone == suite.spec["backbone"] and self.input == suite.input_kind
            and self.preprocessing == dict(suite.spec.get("preprocessing") or {}))

    def describe(self) -> Dict[str, Any]:
        return {"format": FORMAT, "path": self.path, "input": self.input, "backbone": self.backbone,
                "preprocessing": self.preprocessing}

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies the teacher: its description and the contents of its directory."""
        return {**self.describe(), "path": source_fingerprint(self.path)}


def load_heads_teacher(expert: HeadsExpert, task: str, num_classes: int) -> Teacher:
    """The expert (its backbone + head, frozen, in eval mode) as a teacher seeing images through
    its own preprocessing; its head must have ``num_classes`` outputs."""
    directory = Path(expert.path)
    try:
        backbone = build_backbone(expert.backbone or {}, expert.input, directory)
    except RuntimeError as exc:  # load_state_dict(strict=True): description and weights disagree
        raise HeteroExpertError(
            f"Expert '{task}': the weights in '{directory}' do not fit its backbone description "
            f"{expert.backbone}: {str(exc).splitlines()[0]}") from exc
    head = load_head(directory / HEAD_FILE)
    _check_head(expert, task, head.out_features, num_classes)
    processor = ImageProcessor(**(expert.preprocessing or {}))
    model = HeadsClassifier(backbone, head).eval().requires_grad_(False)
    return Teacher(expert, model, lambda images, **_: {"pixel_values": processor(images)}, lambda m, px: m(px))


# --------------------------------------------------------------------------- pool
class HeterogeneousHeadsModelPool(DistilledExpertsMixin, PerTaskHeadsModelPool):
    """A per-task-head pool whose other-architecture experts are distilled into the suite's backbone on load.

    Args:
        suite_dir, tasks: as for :class:`PerTaskHeadsModelPool`.
        experts: ``{task: directory or {path, backbone, preprocessing, input}}`` replacing experts.
        experts_dir: optional folder of ``<task>/`` expert directories with an ``expert.json``.
        distillation: :class:`~fusion_bench_statsmerging.engine.student_distillation.DistillationSettings` fields.
        cache_dir: where students are cached (default ``~/.cache/fusion_bench_statsmerging/hetero_students``).
    """

    STUDENT_MARKER = HEAD_FILE

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None, experts: Optional[Mapping] = None,
                 experts_dir: Optional[str] = None, distillation: Optional[Mapping] = None,
                 cache_dir: Optional[str] = None, **kwargs):
        self._cache_dir = cache_dir
        self.settings = DistillationSettings.from_config(distillation)
        suite = HeadsSuite(suite_dir)
        names = suite.select(tasks)
        found = self._scan_experts_dir(experts_dir, suite, names)
        for task, cfg in (_as_plain(experts) or {}).items():
            if task not in names:
                raise HeteroPoolError(f"experts entry for unknown task '{task}'; the pool's tasks are {names}.")
            found[task] = HeadsExpert.parse(task, cfg)
        specs = {t: e for t, e in found.items() if not e.has_suite_architecture(suite)}
        if specs and suite.input_kind != "image":
            raise HeteroPoolError(f"experts of another architecture ({sorted(specs)}) are distilled on unlabeled "
                                  f"images, but '{suite.root}' is a {suite.input_kind} suite.")
        same = {t: e.path for t, e in found.items() if t not in specs}
        super().__init__(suite_dir, tasks, experts=same, **kwargs)
        self._specs: Dict[str, HeadsExpert] = specs
        for task, spec in specs.items():
            self._models[task] = spec.describe()
        self._student_paths: Dict[str, str] = {}
        self.distillation_reports: Dict[str, Dict[str, Any]] = {}
        if specs:
            log.info("Heterogeneous heads pool: %s distilled into the suite's %s on first load (cache: %s)",
                     {t: e.kind for t, e in specs.items()}, architecture_name(suite.spec["backbone"]), self.cache_root)

    @staticmethod
    def _scan_experts_dir(experts_dir: Optional[str], suite: HeadsSuite, names: List[str]) -> Dict[str, HeadsExpert]:
        if not experts_dir:
            return {}
        found = {}
        for sub in expert_subdirs(experts_dir, "benchmarks/real_suites/build_hetero_vision.py"):
            if not (sub / EXPERT_FILE).is_file():
                log.warning("experts_dir: '%s' has no %s; skipped.", sub, EXPERT_FILE)
            elif sub.name not in suite.tasks:
                raise HeteroPoolError(f"experts_dir holds an expert for '{sub.name}', which is not a task of "
                                      f"'{suite.root}' (tasks: {list(suite.tasks)}); rename or remove it.")
            elif sub.name in names:
                found[sub.name] = HeadsExpert.parse(sub.name, str(sub))
        return found

    # ------------------------------------------------------------------ host API
    def load_model(self, model_name_or_config, *args, **kwargs) -> nn.Module:
        if isinstance(model_name_or_config, str) and model_name_or_config in self._specs:
            return self.suite.load_backbone(self.student_path(model_name_or_config))
        return super().load_model(model_name_or_config, *args, **kwargs)

    def load_head(self, task: str) -> nn.Linear:
        if task in self._specs:
            return load_head(Path(self.student_path(task)) / HEAD_FILE)
        return super().load_head(task)

    # ------------------------------------------------------------------ distillation
    def _key_parts(self, task: str, spec: HeadsExpert, dataset, classnames: List[str]) -> Dict[str, Any]:
        return {
            "format": CACHE_FORMAT, "pool": "per_task_heads", "task": task, "classnames": classnames,
            "teacher": spec.fingerprint(),
            "target": {"backbone": self.suite.spec["backbone"], "preprocessing": self.suite.spec.get("preprocessing"),
                       "weights": source_fingerprint(self._models["_pretrained_"])},
            "data": self._data_key(task, dataset),
            "settings": self.settings.keyed(),
        }

    def student_path(self, task: str) -> str:
        """The directory (suite backbone + head) of the student standing for expert ``task``."""
        if task in self._student_paths:
            return self._student_paths[task]
        spec = self._specs[task]
        classnames = [str(c) for c in self.suite.tasks[task]["classnames"]]
        dataset = self._unlabeled_dataset(task)
        key = cache_key(self._key_parts(task, spec, dataset, classnames))
        entry = self.cache_root / f"{_safe(task)}-{_safe(spec.kind)}-{key[:16]}"
        report = self._cached(entry)
        if report is None:
            # host methods may load experts under no_grad / inference mode; distillation needs gradients
            with torch.inference_mode(False), torch.enable_grad():
                report = self._distill(task, spec, dataset, classnames, entry)
        else:
            log.info("Loading the cached student of '%s' from %s (no distillation).", task, entry)
        self.distillation_reports[task] = report
        self._student_paths[task] = str(entry)
        return str(entry)

    def _distill(self, task: str, spec: HeadsExpert, dataset, classnames: List[str], entry: Path) -> Dict[str, Any]:
        log.info("Distilling the %s expert of '%s' into the suite's backbone (cache miss: %s).", spec.kind, task, entry)
        teacher = load_heads_teacher(spec, task, len(classnames))
        device = self.settings.torch_device()
        probe = [_image_of(image_only_view(dataset)[i]) for i in range(2)]
        teacher.model.to(device)
        check_teacher_outputs(teacher, probe, task, len(classnames), device)
        processor = self.suite.processor()
        backbone = self.load_pretrained_model()
        with torch.no_grad():
            dim = backbone(processor(probe)).shape[-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.settings.seed)
            head = nn.Linear(dim, len(classnames))
        student = HeadsClassifier(backbone, head)
        report = distill_student(teacher, student, processor, dataset, self.settings, task,
                                 tensorboard_dir=self._tensorboard_dir(entry),
                                 target_name=architecture_name(self.suite.spec["backbone"]))
        return self._publish_student(entry, student, report, spec.describe())
