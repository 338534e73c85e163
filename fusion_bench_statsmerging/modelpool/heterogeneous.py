"""Heterogeneous experts: distil-then-merge (StatsMerging, Algorithm 1 lines 4-13; Sec. 4.2, Eq. 8).

:class:`HeterogeneousDistillationModelPool` wraps a CLIP vision model pool whose experts may
have other architectures and presents a homogeneous pool to any merging method (ours or the
host's). The target architecture is the pool's ``_pretrained_`` CLIP vision model. Each expert
of another architecture is distilled into a student initialised from the target's pretrained
weights, on unlabeled images of its own task::

    loss = alpha * CE(student, argmax teacher) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

with T = 4 and alpha = 0.7 by default. Each model sees an image through its own
preprocessing; the student's logits are the CLIP vision tower + the task's frozen zero-shot
head (only the vision tower trains). No human label is read: images are taken from the
dataset's ``image`` column only, from the train split by default (the test split only with
``distillation.allow_test_split``). The training loop and its settings are
:mod:`fusion_bench_statsmerging.engine.student_distillation`; this module holds the pool (expert
specs, the student cache) and the ``DistillHeterogeneousExperts`` pseudo-method.

Students are cached on disk, keyed by the teacher (file contents or hub snapshot), the target,
the task, the data and the settings; a later run loads them. Each cache entry holds the
student (``save_pretrained``) and ``distillation.json`` (settings, teacher, agreement of the
student with its teacher on held-out unlabeled images, loss history); TensorBoard scalars go
to ``<cache_dir>/tensorboard/<entry>/``.

Example::

    fusion_bench method=statsmerging modelpool=clip-vit-base-patch32_TA8_hetero \\
        taskpool=clip-vit-classification_TA8
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench import BaseAlgorithm
from fusion_bench.modelpool import CLIPVisionModelPool

from ..engine.distillation import _image_of, image_only_view
from ..engine.student_distillation import DistillationSettings, HeteroPoolError, clip_pixels, distill_student
from ..models.teachers import (
    CLIPZeroShotClassifier, ExpertSpec, HeteroExpertError, check_teacher_outputs, clip_zero_shot_head, load_teacher,
    rendered_templates, same_architecture, source_fingerprint, task_classes,
)
from ..utils.splits import SPLITS

__all__ = ["HeterogeneousDistillationModelPool", "DistillHeterogeneousExperts", "DistillationSettings",
           "DistilledExpertsMixin", "HeteroPoolError", "HeteroExpertError", "distill_student"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = "~/.cache/fusion_bench_statsmerging/hetero_students"
EXPERT_FILE = "expert.yaml"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def cache_key(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _publish(entry: Path, student: nn.Module, report: Dict[str, Any]) -> Dict[str, Any]:
    """Write the student (its ``save_pretrained``) and its report into a temporary sibling, then rename
    it into place in one step. If another process published the same entry meanwhile, keep theirs
    (same key, same settings) and return its report."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        student.save_pretrained(tmp)
        (tmp / "distillation.json").write_text(json.dumps(report, indent=2, default=str))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "distillation.json").is_file():
                raise
            log.info("Another run published %s first; using it.", entry)
            return json.loads((entry / "distillation.json").read_text())
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return report


# --------------------------------------------------------------------------- pool
def _as_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _is_spec(cfg: Any) -> bool:
    return (isinstance(cfg, (dict, DictConfig))) and "kind" in cfg


def expert_subdirs(experts_dir: str, builder: str) -> List[Path]:
    """The sub-folders of an ``experts_dir`` (one per task), sorted; ``builder`` is the script that writes it."""
    root = Path(os.path.expanduser(str(experts_dir)))
    if not root.is_dir():
        raise HeteroPoolError(f"experts_dir '{root}' is not a directory (build it with {builder}, "
                              "or set experts_dir: null).")
    return sorted(p for p in root.iterdir() if p.is_dir())


class DistilledExpertsMixin:
    """What every distil-then-merge pool shares: the student cache, the unlabeled data of a task,
    and the distillation reports. The pool sets ``settings``, ``_specs`` ({task: expert spec with a
    ``kind``}), ``_cache_dir``, ``_student_paths`` and ``distillation_reports``, and implements
    ``student_path(task)``; ``STUDENT_MARKER`` is a file every complete student directory holds."""

    STUDENT_MARKER = "config.json"
    settings: DistillationSettings
    _specs: Dict[str, Any]
    _cache_dir: Optional[str]

    @property
    def cache_root(self) -> Path:
        return Path(os.path.expanduser(str(self._cache_dir or os.environ.get(
            "STATSMERGING_HETERO_CACHE", DEFAULT_CACHE_DIR))))

    @property
    def heterogeneous_model_names(self) -> List[str]:
        return list(self._specs)

    def expert_spec(self, name: str) -> Optional[Any]:
        return self._specs.get(name)

    def student_path(self, task: str) -> str:  # pragma: no cover - each pool implements it
        raise NotImplementedError

    def prepare(self) -> Dict[str, str]:
        """Distil (or load from the cache) every other-architecture expert now; name -> student path."""
        return {name: self.student_path(name) for name in self._specs}

    def _unlabeled_dataset(self, task: str):
        """The images a task's student is distilled on (``distillation.split``; labels are never read)."""
        split = self.settings.split
        key = SPLITS[split].config_key
        if task not in SPLITS[split].names(self):
            raise HeteroPoolError(
                f"Task '{task}' has no unlabeled data to distil its {self._specs[task].kind} expert on: the "
                f"pool's `{key}` has no entry for it (distillation.split={split}). Add one, or choose "
                "another `distillation.split`.")
        dataset = SPLITS[split].load(self, task)
        if len(dataset) < 2:
            raise HeteroPoolError(
                f"Task '{task}' has {len(dataset)} unlabeled image(s) in its {split} split; distillation "
                "needs at least two (fitting + held-out).")
        return dataset

    def _data_key(self, task: str, dataset) -> Dict[str, Any]:
        """What identifies a task's distillation data in the cache key."""
        data_cfg = SPLITS[self.settings.split].config(self)[task]
        return {"split": self.settings.split, "size": len(dataset),
                "fingerprint": getattr(dataset, "_fingerprint", None) or json.dumps(_as_plain(data_cfg), default=str)}

    def _cached(self, entry: Path) -> Optional[Dict[str, Any]]:
        report = entry / "distillation.json"
        if report.is_file() and (entry / self.STUDENT_MARKER).is_file():
            return json.loads(report.read_text())
        return None

    def _tensorboard_dir(self, entry: Path) -> str:
        return str(self.cache_root / "tensorboard" / entry.name)

    def _publish_student(self, entry: Path, student: nn.Module, report: Dict[str, Any],
                         expert: Dict[str, Any]) -> Dict[str, Any]:
        """Complete a distillation report (expert, target, settings, entry, time) and publish the student."""
        report.update({"expert": expert, "target": str(_as_plain(self._models["_pretrained_"])),
                       "settings": asdict(self.settings), "cache_entry": str(entry),
                       "created": time.strftime("%Y-%m-%d %H:%M:%S")})
        return _publish(entry, student, report)


class HeterogeneousDistillationModelPool(DistilledExpertsMixin, CLIPVisionModelPool):
    """A CLIP vision pool whose other-architecture experts are distilled into the target on load.

    Args:
        models: the host's ``models`` mapping; an entry with a ``kind`` is an expert of another
            architecture (see :mod:`fusion_bench_statsmerging.models.teachers`).
        base_pool: optional config (or instance) of another pool to wrap: its models, datasets
            and processor are taken, then ``models`` / ``experts_dir`` / ``experts`` override them.
        experts_dir: optional folder of ``<task>/`` experts (each with an ``expert.yaml``, or a
            transformers checkpoint whose kind is detected); only tasks of the pool are replaced.
        experts: ``{task: spec}`` replacing (or adding) experts.
        distillation: :class:`DistillationSettings` fields.
        cache_dir: where students are cached (default ``~/.cache/fusion_bench_statsmerging/hetero_students``).
    """

    _config_mapping = CLIPVisionModelPool._config_mapping | {
        "_base_pool": "base_pool", "_experts_dir": "experts_dir", "_experts": "experts",
        "_distillation": "distillation", "_cache_dir": "cache_dir",
    }

    def __init__(self, models: Optional[DictConfig] = None, *, processor=None, base_pool=None,
                 experts: Optional[DictConfig] = None, experts_dir: Optional[str] = None,
                 distillation: Optional[DictConfig] = None, cache_dir: Optional[str] = None,
                 train_datasets=None, val_datasets=None, test_datasets=None, platform: str = "hf", **kwargs):
        self._base_pool, self._experts, self._experts_dir = base_pool, experts, experts_dir
        self._distillation, self._cache_dir = distillation, cache_dir
        self.settings = DistillationSettings.from_config(distillation)
        merged: Dict[str, Any] = {}
        if base_pool is not None:
            base = base_pool
            if isinstance(base_pool, (dict, DictConfig)):
                from fusion_bench.utils import instantiate

                base = instantiate(base_pool)
            merged.update(dict(base._models.items()))
            processor = processor if processor is not None else base._processor
            train_datasets = train_datasets if train_datasets is not None else base._train_datasets
            val_datasets = val_datasets if val_datasets is not None else base._val_datasets
            test_datasets = test_datasets if test_datasets is not None else base._test_datasets
            platform = getattr(base, "_platform", platform)
        merged.update(dict((models or {}).items()))
        specs: Dict[str, ExpertSpec] = {k: ExpertSpec.parse(k, v) for k, v in merged.items() if _is_spec(v)}
        specs.update(self._scan_experts_dir(experts_dir, merged))
        for name, cfg in (_as_plain(experts) or {}).items():
            if cfg is not None:
                specs[name] = ExpertSpec.parse(name, cfg)
        for name, spec in specs.items():
            merged[name] = spec.describe()
        if specs and "_pretrained_" not in merged:
            raise HeteroPoolError(
                f"The pool has experts of other architectures ({sorted(specs)}) but no `_pretrained_` "
                "model: the target architecture (and the students' initial weights) is the pool's "
                "`_pretrained_` CLIP model. Add `_pretrained_: <CLIP model>` under `models:`.")
        if "_pretrained_" in specs:
            raise HeteroPoolError("`_pretrained_` is the target architecture; it cannot be a distilled expert.")
        self._specs = specs
        super().__init__(OmegaConf.create(merged), processor=processor, platform=platform,
                         train_datasets=train_datasets, val_datasets=val_datasets,
                         test_datasets=test_datasets, **kwargs)
        self._student_paths: Dict[str, str] = {}
        self.distillation_reports: Dict[str, Dict[str, Any]] = {}
        self._target: Optional[Dict[str, Any]] = None
        if specs:
            log.info("Heterogeneous pool: %s distilled into the `_pretrained_` architecture on first load "
                     "(cache: %s)", {k: v.kind for k, v in specs.items()}, self.cache_root)

    @staticmethod
    def _scan_experts_dir(experts_dir: Optional[str], models: Dict[str, Any]) -> Dict[str, ExpertSpec]:
        if not experts_dir:
            return {}
        found = {}
        for sub in expert_subdirs(experts_dir, "benchmarks/build_hetero_experts.py"):
            if sub.name not in models:
                log.info("experts_dir: '%s' is not a task of this pool; skipped.", sub.name)
                continue
            spec_file = sub / EXPERT_FILE
            cfg = OmegaConf.load(spec_file) if spec_file.is_file() else {"kind": "auto", "path": "."}
            found[sub.name] = ExpertSpec.parse(sub.name, cfg, base_dir=sub)
        return found

    # ------------------------------------------------------------------ host API
    def load_model(self, model_name_or_config, *args, **kwargs):
        if isinstance(model_name_or_config, str) and model_name_or_config in self._specs:
            from transformers import CLIPVisionModel

            return CLIPVisionModel.from_pretrained(self.student_path(model_name_or_config), *args, **kwargs)
        return super().load_model(model_name_or_config, *args, **kwargs)

    def get_model_path(self, model_name: str) -> str:
        if model_name in self._specs:
            return self.student_path(model_name)
        return super().get_model_path(model_name)

    # ------------------------------------------------------------------ distillation
    def _load_target(self) -> Dict[str, Any]:
        if self._target is None:
            clip_model = self.load_clip_model("_pretrained_")
            self._target = {"clip_model": clip_model, "processor": self.load_processor()}
        return self._target

    def _key_parts(self, task: str, spec: ExpertSpec, dataset, classnames, templates) -> Dict[str, Any]:
        return {
            "format": CACHE_FORMAT, "task": task, "classnames": list(map(str, classnames)),
            "templates": rendered_templates(templates), "teacher": spec.fingerprint(),
            "target": source_fingerprint(self._models["_pretrained_"]),
            "processor": source_fingerprint(self._processor) if self._processor is not None else None,
            "data": self._data_key(task, dataset),
            "settings": self.settings.keyed(),
        }

    def _has_target_architecture(self, path: str) -> bool:
        """Whether a CLIP checkpoint has the target's parameter names and shapes (configs first, cheaply)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel

        target = self.load_pretrained_model()
        fields_ = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "patch_size", "image_size", "num_channels")
        config = CLIPVisionConfig.from_pretrained(path)
        if any(getattr(config, f) != getattr(target.config, f) for f in fields_):
            return False
        return same_architecture(CLIPVisionModel.from_pretrained(path), target)

    def student_path(self, task: str) -> str:
        """The directory of the target-architecture model standing for expert ``task``."""
        if task in self._student_paths:
            return self._student_paths[task]
        spec = self._specs[task]
        if spec.kind == "clip" and self._has_target_architecture(spec.path):
            log.info("Expert '%s' has the target architecture: it passes through unchanged.", task)
            self._student_paths[task] = spec.path
            return spec.path
        classnames, templates = task_classes(task)
        dataset = self._unlabeled_dataset(task)

        def entry_for() -> Path:
            key = cache_key(self._key_parts(task, spec, dataset, classnames, templates))
            return self.cache_root / f"{_safe(task)}-{spec.kind}-{key[:16]}"

        entry = entry_for()
        report = self._cached(entry)
        if report is None:
            teacher = load_teacher(spec, task, classnames, templates)
            self._load_target()
            entry = entry_for()  # hub snapshots of teacher and target are known once they are downloaded
            report = self._cached(entry)
            if report is None:
                report = self._distill(task, spec, teacher, dataset, classnames, templates, entry)
        else:
            log.info("Loading the cached student of '%s' from %s (no distillation).", task, entry)
        self.distillation_reports[task] = report
        self._student_paths[task] = str(entry)
        if all(name in self._student_paths for name in self._specs):
            self._target = None  # the target CLIP model (text tower included) is no longer needed
        return str(entry)

    def _distill(self, task, spec, teacher, dataset, classnames, templates, entry: Path) -> Dict[str, Any]:
        log.info("Distilling the %s expert of '%s' into the target architecture (cache miss: %s).",
                 spec.kind, task, entry)
        target = self._load_target()
        device = self.settings.torch_device()
        probe = [_image_of(image_only_view(dataset)[i]) for i in range(min(2, len(dataset)))]
        teacher.model.to(device)
        check_teacher_outputs(teacher, probe, task, len(classnames), device)
        clip_model, processor = target["clip_model"], target["processor"]
        head = clip_zero_shot_head(clip_model, processor, classnames, templates)
        vision = self.load_pretrained_model()
        student = CLIPZeroShotClassifier(vision, copy.deepcopy(clip_model.visual_projection), head,
                                         clip_model.logit_scale.exp())
        # host methods may load experts under no_grad / inference mode; distillation needs gradients
        with torch.inference_mode(False), torch.enable_grad():
            report = distill_student(teacher, student, clip_pixels(processor.image_processor), dataset,
                                     self.settings, task, tensorboard_dir=self._tensorboard_dir(entry))
        return self._publish_student(entry, vision, report, spec.describe())


class DistillHeterogeneousExperts(BaseAlgorithm):
    """Distil (or load from the cache) every other-architecture expert of the pool, then return the
    pretrained model. Run it once before a comparison so no method's time includes distillation::

        fusion_bench method=dummy method._target_=fusion_bench_statsmerging.modelpool.heterogeneous.DistillHeterogeneousExperts \\
            modelpool=clip_suite_hetero
    """

    def run(self, modelpool):
        if isinstance(modelpool, DistilledExpertsMixin):
            paths = modelpool.prepare()
            for name, path in paths.items():
                rep = modelpool.distillation_reports.get(name, {})
                print(f"{name}: {path} (held-out agreement with teacher: "
                      f"{rep.get('agreement_with_teacher', {}).get('held_out')})")
        return modelpool.load_pretrained_model()
