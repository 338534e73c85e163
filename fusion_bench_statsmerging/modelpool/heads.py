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

BatchNorm. Running statistics are buffers, not task-vector parameters, so a merge must
decide what they become: :func:`merged_running_stats` combines them with the same per-layer
coefficients as the weights, :func:`reestimate_batchnorm` recomputes them on unlabeled
images through the merged backbone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fusion_bench import BaseModelPool, BaseTaskPool, auto_register_config
from fusion_bench.mixins import LightningFabricMixin

from ..utils.preflight import check_loaded_model
from .clip_suite import SuiteError, _select

log = logging.getLogger(__name__)

FORMAT = "per_task_heads/1"
INPUT_KINDS = ("image", "text")
BACKBONE_KINDS = ("torchvision", "timm", "transformers", "module")
POOLINGS = ("cls", "pooler", "mean")
WEIGHTS_FILE = "model.safetensors"
HEAD_FILE = "head.safetensors"

Inputs = Union[Tensor, Dict[str, Tensor]]


class HeadsSuiteError(SuiteError):
    """A per-task-head suite that cannot be used, with what is wrong."""


# --------------------------------------------------------------------------- models
class HeadsBackbone(nn.Module):
    """A backbone without head: preprocessed inputs -> features (N, D).

    ``model`` is the wrapped network: without ``pooling`` (torchvision, timm, own modules) it
    maps images to features itself; with ``pooling`` it is a transformers model (token ids,
    or ``pixel_values`` for vision models) whose output is pooled (``cls``: first token,
    ``pooler``: its pooler output, ``mean``: mean over tokens/positions). Task vectors and
    the host's baselines see its parameters under the ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, input_kind: str = "image", pooling: Optional[str] = None):
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}.")
        self.model = model
        self.input_kind = input_kind
        self.pooling = pooling

    def forward(self, inputs: Inputs) -> Tensor:
        if self.pooling is None:  # torchvision / timm / own modules: images -> features
            return self.model(inputs)
        if self.input_kind == "image":  # a transformers vision model (ViT, ResNet, ConvNeXt, ...)
            out = self.model(pixel_values=inputs)
        else:
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            if self.input_kind == "image" or "attention_mask" not in inputs:
                return hidden.flatten(2).mean(-1) if hidden.dim() == 4 else hidden.mean(1)
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return hidden[:, 0]


class PerTaskHeadsModel(nn.Module):
    """A (merged) backbone with the frozen head of every task: ``forward(inputs, task)`` gives logits."""

    def __init__(self, backbone: HeadsBackbone, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads)).requires_grad_(False)

    def forward(self, inputs: Inputs, task: str) -> Tensor:
        return self.heads[task](self.backbone(inputs))


def _import(target: str):
    module, _, attr = target.partition(":")
    if not attr:
        module, _, attr = target.rpartition(".")
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


# --------------------------------------------------------------------------- preprocessing
class ImageProcessor:
    """PIL images -> normalised (N, C, H, W) float tensor (resize, mode, mean/std), no torchvision."""

    def __init__(self, image_size: Union[int, Sequence[int]] = 224, mode: str = "RGB",
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.size = (int(size[0]), int(size[1]))  # (H, W)
        self.mode = mode
        channels = 1 if mode == "L" else 3
        self.mean = torch.tensor(mean if mean is not None else [0.0] * channels).view(-1, 1, 1)
        self.std = torch.tensor(std if std is not None else [1.0] * channels).view(-1, 1, 1)

    def __call__(self, images: Sequence[Any]) -> Tensor:
        from PIL import Image

        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im))
            im = im.convert(self.mode)
            if im.size != (self.size[1], self.size[0]):
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
            if arr.ndim == 2:
                arr = arr[..., None]
            out.append(torch.from_numpy(arr.transpose(2, 0, 1).copy()))
        return (torch.stack(out) - self.mean) / self.std


class TextProcessor:
    """Strings -> {"input_ids", "attention_mask"} padded to ``max_length`` (so tasks concatenate)."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def __call__(self, texts: Sequence[str]) -> Dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def concat_inputs(parts: Sequence[Inputs]) -> Inputs:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(list(parts))


def inputs_to(inputs: Inputs, device, float_dtype: torch.dtype = torch.float32) -> Inputs:
    """Move inputs to ``device``; image tensors (stored compactly) become ``float_dtype``."""
    if isinstance(inputs, dict):
        return {k: v.to(device) for k, v in inputs.items()}
    return inputs.to(device=device, dtype=float_dtype)


def column_only_view(dataset, column: str):
    """A Hugging Face dataset reduced to one column before any row is read (labels never touched)."""
    if hasattr(dataset, "select_columns") and column in getattr(dataset, "column_names", []):
        return dataset.select_columns([column])
    return dataset


def _value_of(row: Any, column: str):
    if isinstance(row, (tuple, list)):
        return row[0]
    return row[column]


def read_inputs(dataset, indices: Sequence[int], column: str, processor, batch_size: int = 64,
                image_dtype: torch.dtype = torch.float16) -> Inputs:
    """Preprocess rows ``indices`` reading only ``column`` (images stored in ``image_dtype``)."""
    view = column_only_view(dataset, column)
    chunks = []
    for start in range(0, len(indices), batch_size):
        values = [_value_of(view[int(i)], column) for i in indices[start:start + batch_size]]
        out = processor(values)
        chunks.append(out.to(image_dtype) if isinstance(out, Tensor) else out)
    return concat_inputs(chunks)


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
        """Strict: a tensor missing from a checkpoint or a NaN weight is an error naming model and tensor."""
        if isinstance(model_name_or_config, str) and isinstance(self._models.get(model_name_or_config), str):
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


# --------------------------------------------------------------------------- BatchNorm
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


# --------------------------------------------------------------------------- task pool
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
        from ..engine.distillation import sample_indices

        inputs = {}
        for i, task in enumerate(self.tasks):
            ds = self._load(task, "train")
            idx = sample_indices(len(ds), min(self.reestimate_samples, len(ds)), self.seed + i)
            inputs[task] = read_inputs(ds, idx, column, processor)
        backbone.to(device)
        return reestimate_batchnorm(backbone, mixed_batches(inputs, self.batch_size, self.seed), device)
