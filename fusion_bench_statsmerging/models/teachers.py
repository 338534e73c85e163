"""Teachers of heterogeneous distillation: experts of other architectures, described in YAML.

An expert entry has a ``kind`` and says how to load the model and its preprocessing::

    # (a) a CLIP vision model of another size, with its own zero-shot head
    svhn:
      kind: clip
      path: tanganke/clip-vit-base-patch16_svhn      # CLIPVisionModel (or a full CLIPModel)
      clip_model: openai/clip-vit-base-patch16        # text tower, projection, logit scale (default: path)
      processor: openai/clip-vit-base-patch16         # default: clip_model
    # (b) a transformers image classifier with its own head
    dtd:
      kind: hf_image_classifier
      path: /models/resnet50-dtd                      # AutoModelForImageClassification
      processor: null                                 # AutoImageProcessor (default: path)
    # (b') a torchvision classifier from a state dict
    cars:
      kind: torchvision
      arch: resnet50                                  # a builder in torchvision.models
      path: /models/resnet50-cars.pt                  # state dict (or a checkpoint, see state_dict_key)
      num_classes: null                               # default: the task's number of classes
      preprocessing: {resize: 256, crop_size: 224}    # or processor: <AutoImageProcessor>
    # any nn.Module: instantiate config + state dict
    gtsrb:
      kind: torch
      model: {_target_: my_pkg.MyNet, num_classes: 43}
      path: /models/mynet-gtsrb.pt

``kind: auto`` (or a plain path string) reads the directory's ``config.json``: a CLIP model
is ``clip``, anything else ``hf_image_classifier``. Every teacher maps its *own* pixel
values to task logits; :func:`load_teacher` checks the head size against the task.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..utils.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("auto", "clip", "hf_image_classifier", "torchvision", "torch")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HeteroExpertError(UserError):
    """An expert that cannot serve as a teacher of its task, with what to change."""


# --------------------------------------------------------------------------- spec
@dataclass
class ExpertSpec:
    """How to load one expert of another architecture (see the module docstring)."""

    kind: str = "auto"
    path: Optional[str] = None
    processor: Optional[str] = None
    clip_model: Optional[str] = None
    arch: Optional[str] = None
    model: Optional[Dict[str, Any]] = None
    num_classes: Optional[int] = None
    preprocessing: Optional[Dict[str, Any]] = None
    state_dict_key: Optional[str] = None
    name: str = field(default="", compare=False)

    @classmethod
    def parse(cls, name: str, cfg: Any, base_dir: Optional[str | os.PathLike] = None) -> "ExpertSpec":
        """From a YAML entry (a mapping, or a bare path); relative paths resolve against ``base_dir``."""
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if isinstance(cfg, (str, os.PathLike)):
            cfg = {"kind": "auto", "path": str(cfg)}
        if not isinstance(cfg, Mapping):
            raise HeteroExpertError(f"Expert '{name}': expected a mapping with a `kind`, got {cfg!r}.")
        known = {f.name for f in fields(cls)} - {"name"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise HeteroExpertError(f"Expert '{name}': unknown keys {unknown}; known keys are {sorted(known)}.")
        spec = cls(**dict(cfg), name=name)
        if spec.kind not in KINDS:
            raise HeteroExpertError(f"Expert '{name}': unknown kind '{spec.kind}'; choose one of {list(KINDS)}.")
        if base_dir is not None:
            for key in ("path", "processor", "clip_model"):
                value = getattr(spec, key)
                if value is not None and (Path(base_dir) / value).exists():
                    setattr(spec, key, str((Path(base_dir) / value).resolve()))
        if spec.kind == "auto":
            spec.kind = detect_kind(name, spec.path)
        required = {"clip": ["path"], "hf_image_classifier": ["path"], "torchvision": ["arch", "path"],
                    "torch": ["model"]}[spec.kind]
        missing = [k for k in required if getattr(spec, k) is None]
        if missing:
            raise HeteroExpertError(f"Expert '{name}' (kind {spec.kind}) needs {missing}.")
        return spec

    def describe(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "name"}

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies the teacher: its settings and the contents (or hub revisions) of its files."""
        out = self.describe()
        for key in ("path", "processor", "clip_model"):
            if getattr(self, key) is not None:
                out[key] = source_fingerprint(getattr(self, key))
        return out


def detect_kind(name: str, path: Optional[str]) -> str:
    """``clip`` for CLIP checkpoints, ``hf_image_classifier`` for other transformers models."""
    if path is None:
        raise HeteroExpertError(f"Expert '{name}': `kind: auto` needs a `path`.")
    config_file = Path(path) / "config.json"
    if config_file.is_file():
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    else:
        try:
            from transformers import AutoConfig

            model_type = AutoConfig.from_pretrained(path).model_type
        except Exception as exc:
            raise HeteroExpertError(
                f"Expert '{name}': cannot read a transformers config at '{path}' to detect its kind "
                f"({exc}); give `kind:` explicitly.") from exc
    return "clip" if model_type in ("clip", "clip_vision_model") else "hf_image_classifier"


# --------------------------------------------------------------------------- fingerprints
_HASHES: Dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[memo] = h.hexdigest()
    return _HASHES[memo]


def source_fingerprint(source: Any) -> str:
    """Content hash of a local file or directory; ``hub:<id>@<snapshot>`` for a hub name."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(source) or isinstance(source, Mapping):
        data = OmegaConf.to_container(source, resolve=True) if OmegaConf.is_config(source) else dict(source)
        path = data.get("pretrained_model_name_or_path")
        return json.dumps({"config": data, "source": source_fingerprint(path) if path else None},
                          sort_keys=True, default=str)
    p = Path(str(source))
    if p.is_file():
        return f"file:{_file_sha256(p)}"
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(f"{f.relative_to(p).as_posix()}:{_file_sha256(f)}\n".encode())
        return f"dir:{h.hexdigest()}"
    return f"hub:{source}@{_hub_snapshot(str(source))}"


def _hub_snapshot(repo_id: str) -> str:
    """The cached snapshot (commit) of a hub model, without network; 'unresolved' if not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
        if isinstance(found, str):
            return Path(found).parent.name
    except Exception:
        pass
    return "unresolved"


# --------------------------------------------------------------------------- heads
class CLIPZeroShotClassifier(nn.Module):
    """A CLIP vision tower + frozen projection + frozen zero-shot head: pixel values -> task logits.

    Computes exactly what the host's ``CLIPClassificationMixin.compute_logits`` computes.
    """

    def __init__(self, vision_model: nn.Module, projection: nn.Module, head: Tensor, logit_scale: Tensor):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection.requires_grad_(False)
        self.register_buffer("head", head.detach().clone())
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale).detach().clone().float())

    def forward(self, pixel_values: Tensor) -> Tensor:
        embeds = self.projection(self.vision_model(pixel_values=pixel_values)[1])
        embeds = embeds / embeds.norm(p=2, dim=-1, keepdim=True)
        return self.logit_scale * embeds @ self.head.t().to(embeds.dtype)


@torch.no_grad()
def clip_zero_shot_head(clip_model, processor, classnames: Sequence[str],
                        templates: Sequence[Callable[[str], str]]) -> Tensor:
    """The task's zero-shot head, built by the host's ``HFCLIPClassifier`` (as the host's methods do)."""
    from fusion_bench.models.hf_clip import HFCLIPClassifier

    classifier = HFCLIPClassifier(clip_model, processor)
    classifier.set_classification_task(list(classnames), list(templates))
    return classifier.zeroshot_weights.detach().float().cpu()


def task_classes(task: str):
    """Class names and templates the host knows for ``task`` (the suite registers its own)."""
    from fusion_bench.tasks.clip_classification import get_classnames_and_templates

    try:
        return get_classnames_and_templates(task)
    except Exception as exc:
        raise HeteroExpertError(
            f"Task '{task}' has no class names registered with the host (fusion_bench.tasks."
            f"clip_classification), so its zero-shot head cannot be built ({exc!r}).") from exc


def rendered_templates(templates: Sequence[Callable[[str], str]]) -> List[str]:
    """Templates as text, for cache keys."""
    out = []
    for t in templates:
        try:
            out.append(t("{}"))
        except Exception:
            out.append(repr(t))
    return out


# --------------------------------------------------------------------------- preprocessing
class ImageTransform:
    """Resize the shorter side, centre-crop, scale to [0, 1] and normalise (torchvision's eval
    transform, written with PIL so torchvision is not needed). Callable like an HF processor."""

    def __init__(self, resize: Optional[int] = 256, crop_size: Optional[int] = 224,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 interpolation: str = "bilinear"):
        from PIL import Image

        methods = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
        if interpolation not in methods:
            raise HeteroExpertError(f"preprocessing.interpolation must be one of {list(methods)}.")
        self.resize, self.crop_size, self.resample = resize, crop_size, methods[interpolation]
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def _one(self, image) -> Tensor:
        image = image.convert("RGB")
        if self.resize:
            w, h = image.size
            scale = self.resize / min(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), self.resample)
        if self.crop_size:
            w, h = image.size
            left, top = (w - self.crop_size) // 2, (h - self.crop_size) // 2
            image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def __call__(self, images, return_tensors: str = "pt", **_) -> Dict[str, Tensor]:
        return {"pixel_values": torch.stack([self._one(im) for im in images])}


# --------------------------------------------------------------------------- teachers
@dataclass
class Teacher:
    """A frozen expert: ``model(pixel_values) -> logits`` on pixels from ``preprocess(images=...)``.

    ``spec`` describes it for messages and reports: an :class:`ExpertSpec`, or any description
    with ``name``, ``kind`` and ``path`` (a per-task-head suite's expert, say).
    """

    spec: Any
    model: nn.Module
    preprocess: Callable[..., Mapping[str, Tensor]]
    logits_fn: Callable[[nn.Module, Tensor], Tensor]

    def pixels(self, images) -> Tensor:
        return self.preprocess(images=images, return_tensors="pt")["pixel_values"]

    def logits(self, pixel_values: Tensor) -> Tensor:
        return self.logits_fn(self.model, pixel_values)


def _check_head(spec: ExpertSpec, task: str, outputs: int, num_classes: int) -> None:
    if outputs != num_classes:
        raise HeteroExpertError(
            f"Expert '{spec.name}' (kind {spec.kind}, {spec.path or spec.model}) has a {outputs}-way head, "
            f"but task '{task}' has {num_classes} classes, so it cannot produce the task's logits. An expert "
            "must classify its own task's classes, in the order of the task's class names.")


def _load_state_dict(spec: ExpertSpec, module: nn.Module, task: str, num_classes: int) -> None:
    state = torch.load(spec.path, map_location="cpu", weights_only=True)
    if spec.state_dict_key:
        state = state[spec.state_dict_key]
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise HeteroExpertError(
                f"Expert '{spec.name}': its state dict does not fit a {num_classes}-class model for task "
                f"'{task}' (head size != number of classes?): {str(exc).splitlines()[-1].strip()}") from exc
        raise


def _load_clip(spec: ExpertSpec, task: str, classnames, templates) -> Teacher:
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    source = spec.clip_model or spec.path
    try:
        clip_model = CLIPModel.from_pretrained(source)
    except Exception as exc:
        raise HeteroExpertError(
            f"Expert '{spec.name}' (kind clip): cannot load a full CLIPModel from '{source}' for its "
            "zero-shot head; set `clip_model:` to the CLIP model the expert was fine-tuned from.") from exc
    processor = CLIPProcessor.from_pretrained(spec.processor or source)
    head = clip_zero_shot_head(clip_model, processor, classnames, templates)
    vision = CLIPVisionModel.from_pretrained(spec.path)
    model = CLIPZeroShotClassifier(vision, clip_model.visual_projection, head, clip_model.logit_scale.exp())
    return Teacher(spec, model.eval(), processor.image_processor, lambda m, px: m(px))


def _load_hf(spec: ExpertSpec, task: str, classnames, templates) -> Teacher:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(spec.path)
    _check_head(spec, task, model.config.num_labels, len(classnames))
    id2label = [str(model.config.id2label.get(i, "")) for i in range(model.config.num_labels)]
    if not all(n.startswith("LABEL_") for n in id2label) and id2label != [str(c) for c in classnames]:
        log.warning("Expert '%s': its labels %s differ from task '%s' class names %s; class i of the "
                    "expert is taken as class i of the task.", spec.name, id2label[:5], task, list(classnames)[:5])
    processor = AutoImageProcessor.from_pretrained(spec.processor or spec.path)
    return Teacher(spec, model.eval(), processor, lambda m, px: m(pixel_values=px).logits)


def _module_preprocessing(spec: ExpertSpec):
    if spec.processor is not None:
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(spec.processor)
    return ImageTransform(**(spec.preprocessing or {}))


def _load_torchvision(spec: ExpertSpec, task: str, classnames, templates) -> Teacher:
    try:
        import torchvision.models as tv_models
    except ImportError as exc:
        raise HeteroExpertError(
            f"Expert '{spec.name}' is a torchvision model; install torchvision (matching your torch) "
            "or export it as a transformers model (kind hf_image_classifier).") from exc
    builder = getattr(tv_models, str(spec.arch), None)
    if not callable(builder):
        raise HeteroExpertError(f"Expert '{spec.name}': torchvision.models has no '{spec.arch}'.")
    num_classes = len(classnames)
    _check_head(spec, task, spec.num_classes or num_classes, num_classes)
    model = builder(weights=None, num_classes=num_classes)
    _load_state_dict(spec, model, task, num_classes)
    return Teacher(spec, model.eval(), _module_preprocessing(spec), lambda m, px: m(px))


def _load_torch(spec: ExpertSpec, task: str, classnames, templates) -> Teacher:
    from fusion_bench.utils import instantiate

    model = instantiate(dict(spec.model))
    if not isinstance(model, nn.Module):
        raise HeteroExpertError(f"Expert '{spec.name}': `model` built a {type(model)}, not an nn.Module.")
    if spec.path is not None:
        _load_state_dict(spec, model, task, len(classnames))
    return Teacher(spec, model.eval(), _module_preprocessing(spec), lambda m, px: m(px))


LOADERS = {"clip": _load_clip, "hf_image_classifier": _load_hf, "torchvision": _load_torchvision,
           "torch": _load_torch}


def load_teacher(spec: ExpertSpec, task: str, classnames: Sequence[str], templates) -> Teacher:
    """Load a frozen teacher for ``task``; raises :class:`HeteroExpertError` if it cannot serve."""
    teacher = LOADERS[spec.kind](spec, task, classnames, templates)
    teacher.model.requires_grad_(False)
    return teacher


@torch.no_grad()
def check_teacher_outputs(teacher: Teacher, images, task: str, num_classes: int, device) -> None:
    """Run the teacher on a few real images: its logits must be (N, num_classes)."""
    try:
        out = teacher.logits(teacher.pixels(images).to(device))
    except Exception as exc:
        raise HeteroExpertError(
            f"Expert '{teacher.spec.name}' failed on task '{task}' images through its own preprocessing: "
            f"{exc!r}") from exc
    if out.ndim != 2:
        raise HeteroExpertError(f"Expert '{teacher.spec.name}' returned {tuple(out.shape)}, not (batch, classes).")
    _check_head(teacher.spec, task, out.shape[-1], num_classes)


def same_architecture(a: nn.Module, b: nn.Module) -> bool:
    """Same parameter names and shapes (what merging methods need)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
