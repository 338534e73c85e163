"""Classifiers with a shared backbone and one head per task: model pool, task pool, BatchNorm tools.

Merging here follows the per-task-head protocol (FusionBench's ResNet/GPT-2 pools, the
Task Arithmetic papers' CNN and BERT experiments): every expert is the pretrained backbone
fine-tuned on one task together with a new classification head for that task. Task vectors
are taken over the **backbone only**; each task keeps its own head, frozen, and puts it on
top of the merged backbone at evaluation time.

On-disk layout of a suite (``suite_dir``)::

    suite.json                 shared description (see below)
    tasks.json                 {task: {"classnames": [...]}} in task order
    pretrained/                the pretrained backbone (no head)
    experts/<task>/            the fine-tuned backbone of <task> + head.safetensors
    data/<task>/<split>/       datasets.save_to_disk; column "image" (PIL) or "text", and "label"
    tokenizer/                 text suites: a Hugging Face tokenizer (AutoTokenizer)

A backbone directory holds ``model.safetensors`` (the backbone's full state dict: parameters
and buffers, BatchNorm running statistics included); for ``kind: transformers`` it is a
``save_pretrained`` directory (``config.json`` + ``model.safetensors``). A head is
``head.safetensors`` with ``weight`` (C, D) and ``bias`` (C,): a linear layer on the
backbone's D features. ``suite.json``::

    {
      "format": "per_task_heads/1",
      "input": "image" | "text",
      "backbone": one of
        {"kind": "torchvision", "arch": "mobilenet_v2", "kwargs": {}, "remove": "classifier"}
        {"kind": "timm", "arch": "resnet18", "kwargs": {}}          (built with num_classes=0)
        {"kind": "transformers", "pooling": "cls" | "pooler" | "mean"}
        {"kind": "module", "target": "package.module:Factory", "kwargs": {...}},
      "preprocessing": image: {"image_size": 224 | [H, W], "mode": "RGB" | "L",
                               "mean": [...], "std": [...]}
                       text:  {"max_length": 128}
    }

``load_model(name)`` returns a :class:`HeadsBackbone` (features (N, D) from preprocessed
inputs), so the host's weight-space baselines (simple average, task arithmetic, TIES) merge
backbones unchanged; :class:`PerTaskHeadsTaskPool` puts each task's head on whatever
backbone it is given. A merged model may also carry its heads (:class:`PerTaskHeadsModel`,
what this plugin's methods return).

The models and their input preprocessing are in :mod:`fusion_bench_statsmerging.models.heads`,
BatchNorm under merging in :mod:`fusion_bench_statsmerging.engine.batchnorm` and the task pool in
:mod:`fusion_bench_statsmerging.taskpool.heads`.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench import BaseModelPool

from ..models.heads import INPUT_KINDS, HeadsBackbone, ImageProcessor, PerTaskHeadsModel, TextProcessor
from ..utils.preflight import check_loaded_model, check_model_files
from .clip_suite import SuiteError, _select

FORMAT = "per_task_heads/1"
BACKBONE_KINDS = ("torchvision", "timm", "transformers", "module")
POOLINGS = ("cls", "pooler", "mean")
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"


class HeadsSuiteError(SuiteError):
    """A per-task-head suite that cannot be used, with what is wrong."""



# --------------------------------------------------------------------------- suite files
# module paths that suites built before the package was laid out by concern name in suite.json / expert.json
MOVED_MODULES = {"fusion_bench_statsmerging.backbones": "fusion_bench_statsmerging.models.backbones"}


def _import(target: str):
    module, _, attr = target.partition(":")
    if not attr:
        module, _, attr = target.rpartition(".")
    if module in MOVED_MODULES:
        warnings.warn(f"'{target}' names the old module '{module}'; it is now '{MOVED_MODULES[module]}' "
                      "(rebuild the suite or edit its suite.json to silence this).", DeprecationWarning, stacklevel=2)
        module = MOVED_MODULES[module]
    return getattr(importlib.import_module(module), attr)


def build_backbone(spec: Mapping[str, Any], input_kind: str, directory: Optional[Path] = None) -> HeadsBackbone:
    """The backbone described by ``spec``; with ``directory``, its weights loaded from there."""
    kind = spec.get("kind")
    if kind not in BACKBONE_KINDS:
        raise HeadsSuiteError(f"backbone.kind must be one of {BACKBONE_KINDS}, got {kind!r}.")
    kwargs = dict(spec.get("kwargs") or {})
    if kind == "transformers":
        from transformers import AutoModel

        pooling = spec.get("pooling", "cls")
        if pooling not in POOLINGS:
            raise HeadsSuiteError(f"backbone.pooling must be one of {POOLINGS}, got {pooling!r}.")
        if directory is None:
            raise HeadsSuiteError("a transformers backbone is always loaded from a directory.")
        if not (directory / "config.json").is_file():
            raise HeadsSuiteError(f"'{directory}' has no config.json (a save_pretrained directory).")
        model = float_batch_counters(AutoModel.from_pretrained(str(directory), **kwargs))
        if pooling == "pooler" and getattr(model, "pooler", None) is None:
            raise HeadsSuiteError(f"pooling 'pooler' needs a model with a pooler; '{directory}' has none.")
        return HeadsBackbone(model.eval(), input_kind, pooling)
    if kind == "torchvision":
        try:
            import torchvision
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise HeadsSuiteError("this suite's backbone needs torchvision: pip install torchvision") from e
        model = torchvision.models.get_model(spec["arch"], weights=None, **kwargs)
        remove = spec.get("remove") or next(
            (a for a in ("fc", "classifier", "head", "heads") if hasattr(model, a)), None)
        if remove is None:
            raise HeadsSuiteError(f"no head attribute to remove on torchvision '{spec['arch']}'; set backbone.remove.")
        setattr(model, remove, nn.Identity())
    elif kind == "timm":
        try:
            import timm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise HeadsSuiteError("this suite's backbone needs timm: pip install timm") from e
        model = timm.create_model(spec["arch"], pretrained=False, num_classes=0, **kwargs)
    else:
        model = _import(spec["target"])(**kwargs)
    if directory is not None:
        from safetensors.torch import load_file

        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise HeadsSuiteError(f"backbone weights '{path}' are missing.")
        float_batch_counters(model)
        model.load_state_dict(load_file(str(path)), strict=True)
    return HeadsBackbone(float_batch_counters(model).eval(), input_kind)


def float_batch_counters(model: nn.Module) -> nn.Module:
    """Store BatchNorm's ``num_batches_tracked`` step counters as float32 (in place).

    The counter is not a statistic (it only drives ``momentum=None`` averaging in training,
    which :func:`reestimate_batchnorm` does not rely on), but it is part of the state dict,
    and as int64 it breaks weight-space merges of the whole state dict: the host's task
    arithmetic and TIES scale it into float32 and then refuse the dtype mismatch. As float32
    it merges like every other buffer, and loading an int64 counter still works (cast on copy).
    """
    for m in model.modules():
        counter = getattr(m, "num_batches_tracked", None)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and counter is not None and not counter.is_floating_point():
            m.num_batches_tracked = counter.float()
    return model


def save_backbone(backbone: HeadsBackbone, directory: str | os.PathLike) -> Path:
    """Write a backbone in the suite layout (``model.safetensors``; transformers: save_pretrained)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(backbone.model, "save_pretrained"):
        backbone.model.save_pretrained(str(directory))
    else:
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
    return directory


def load_head(path: str | os.PathLike) -> nn.Linear:
    """A frozen linear head from ``head.safetensors``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HeadsSuiteError(f"head '{path}' is missing (every expert directory needs {HEAD_FILE}).")
    state = load_file(str(path))
    weight = state["weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False)


def save_head(head: nn.Linear, path: str | os.PathLike) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))
    return path


def save_expert(backbone: HeadsBackbone, head: nn.Linear, directory: str | os.PathLike) -> Path:
    """Write an expert directory (backbone + ``head.safetensors``); the head goes last, so its file
    marks a complete directory."""
    save_backbone(backbone, directory)
    save_head(head, Path(directory) / HEAD_FILE)
    return Path(directory)


# --------------------------------------------------------------------------- suite
def check_description(spec: Mapping[str, Any], source: str) -> str:
    """Validate a suite.json-style description (format, input, backbone); returns its input kind."""
    if spec.get("format", FORMAT) != FORMAT:
        raise HeadsSuiteError(f"{source} format {spec.get('format')!r} is not {FORMAT!r}.")
    input_kind = spec.get("input")
    if input_kind not in INPUT_KINDS:
        raise HeadsSuiteError(f"{source} 'input' must be one of {INPUT_KINDS}, got {input_kind!r}.")
    if "backbone" not in spec:
        raise HeadsSuiteError(f"{source} has no 'backbone' description.")
    return input_kind


class HeadsSuite:
    """A per-task-head suite directory: its description, tasks, models, heads and data."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        spec_path, tasks_path = self.root / "suite.json", self.root / "tasks.json"
        if not spec_path.is_file() or not tasks_path.is_file():
            raise HeadsSuiteError(
                f"No per-task-head suite at '{root}': suite.json and tasks.json are needed "
                "(see fusion_bench_statsmerging.modelpool.heads for the layout; build the tiny one with "
                "`python -m fusion_bench_statsmerging.fixtures.heads DIR`)."
            )
        self.spec: Dict[str, Any] = json.loads(spec_path.read_text())
        self.tasks: Dict[str, dict] = json.loads(tasks_path.read_text())
        self.input_kind = check_description(self.spec, "suite.json")

    @property
    def input_column(self) -> str:
        return self.input_kind

    def expert_dir(self, task: str) -> Path:
        return self.root / "experts" / task

    def load_backbone(self, directory: str | os.PathLike) -> HeadsBackbone:
        return build_backbone(self.spec["backbone"], self.input_kind, Path(directory))

    def head_path(self, task: str) -> Path:
        return self.expert_dir(task) / HEAD_FILE

    def processor(self):
        pre = dict(self.spec.get("preprocessing") or {})
        if self.input_kind == "image":
            return ImageProcessor(**pre)
        from transformers import AutoTokenizer

        tok_dir = self.root / pre.pop("tokenizer", "tokenizer")
        if not tok_dir.is_dir():
            raise HeadsSuiteError(f"text suite without tokenizer: '{tok_dir}' is missing.")
        return TextProcessor(AutoTokenizer.from_pretrained(str(tok_dir)), **pre)

    def dataset_configs(self, tasks: Sequence[str], split: str) -> Optional[DictConfig]:
        present = [t for t in tasks if (self.root / "data" / t / split).is_dir()]
        if not present:
            return None
        return OmegaConf.create({
            t: {"_target_": "datasets.load_from_disk", "dataset_path": str(self.root / "data" / t / split)}
            for t in present
        })

    def select(self, tasks: Optional[Sequence[str]]) -> List[str]:
        try:
            return _select(list(self.tasks), tasks)
        except SuiteError as e:
            raise HeadsSuiteError(str(e)) from None


# --------------------------------------------------------------------------- model pool
class PerTaskHeadsModelPool(BaseModelPool):
    """Pretrained backbone + fine-tuned backbones, one frozen head per task, from a suite directory.

    ``load_model(name)`` gives a :class:`HeadsBackbone` (what every merging method merges);
    ``load_head(task)`` the task's frozen head; ``load_processor()`` the input preprocessing.
    ``experts: {task: directory}`` swaps in other fine-tuned backbones (their directory must
    hold the matching ``head.safetensors``).
    """

    def __init__(self, suite_dir: str, tasks: Optional[Sequence[str]] = None,
                 experts: Optional[Dict[str, str]] = None, **kwargs):
        self.suite = HeadsSuite(suite_dir)
        names = self.suite.select(tasks)
        models = {"_pretrained_": str(self.suite.root / "pretrained")}
        models.update({t: str(self.suite.expert_dir(t)) for t in names})
        for task, directory in dict(experts or {}).items():
            if task not in models:
                raise HeadsSuiteError(f"experts override for unknown task '{task}'; tasks are {names}.")
            models[task] = str(directory)
        super().__init__(
            OmegaConf.create(models),
            train_datasets=self.suite.dataset_configs(names, "train"),
            val_datasets=self.suite.dataset_configs(names, "validation"),
            test_datasets=self.suite.dataset_configs(names, "test"),
            **kwargs,
        )
        self.suite_dir = str(self.suite.root)

    @property
    def input_kind(self) -> str:
        return self.suite.input_kind

    @property
    def input_column(self) -> str:
        return self.suite.input_column

    def dataset_dir(self, task: str, split: str) -> Path:
        """The folder a task's split is read from (named in errors about a missing split)."""
        return self.suite.root / "data" / task / split

    def load_model(self, model_name_or_config, *args, **kwargs) -> nn.Module:
        """Strict: a tensor missing from a checkpoint or a NaN weight is an error naming model and tensor;
        a weight file cut short, one naming model and file before anything reads it."""
        if isinstance(model_name_or_config, str) and isinstance(self._models.get(model_name_or_config), str):
            check_model_files(self, [model_name_or_config])
            backbone = self.suite.load_backbone(self._models[model_name_or_config])
            return check_loaded_model(backbone, model_name_or_config,
                                      pretrained=model_name_or_config == "_pretrained_")
        return super().load_model(model_name_or_config, *args, **kwargs)

    def load_head(self, task: str) -> nn.Linear:
        if task not in self.model_names:
            raise HeadsSuiteError(f"no head for '{task}': the pool's tasks are {self.model_names}.")
        return load_head(Path(self._models[task]) / HEAD_FILE)

    def load_heads(self, tasks: Optional[Sequence[str]] = None) -> Dict[str, nn.Linear]:
        return {t: self.load_head(t) for t in (tasks or self.model_names)}

    def load_processor(self, *args, **kwargs):
        return self.suite.processor()

    def save_model(self, model: nn.Module, path: str, *args, **kwargs):
        """Save in the suite layout: a backbone directory (plus heads/<task>.safetensors when carried)."""
        backbone = model.backbone if isinstance(model, PerTaskHeadsModel) else model
        if not isinstance(backbone, HeadsBackbone):
            return super().save_model(model, path, *args, **kwargs)
        save_backbone(backbone, path)
        if isinstance(model, PerTaskHeadsModel):
            for task, head in model.heads.items():
                save_head(head, Path(path) / "heads" / f"{task}.safetensors")
        return path
