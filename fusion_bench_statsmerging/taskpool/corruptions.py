"""Corrupted test images for robustness evaluation, and a suite task pool that uses them.

Three corruptions in the style of ImageNet-C (Hendrycks & Dietterich, 2019), the ones of
the StatsMerging paper's Table 10, re-implemented with numpy (no ImageMagick / Wand):

- ``gaussian_noise``: x + N(0, c^2) on [0, 1] pixels, c = (0.08, 0.12, 0.18, 0.26, 0.38);
- ``impulse_noise``: salt-and-pepper on a fraction c = (0.03, 0.06, 0.09, 0.17, 0.27) of the
  pixel values (each channel value independently, half white, half black);
- ``motion_blur``: a one-sided linear blur along a random angle in [-45, 45] degrees, with
  Gaussian weights exp(-k^2 / 2 sigma^2) at offsets k = 0..n along the line, n = round(min(2
  radius, 3 sigma)) pixels; (radius, sigma) = (10, 3), (15, 5), (15, 8), (15, 12), (20, 15)
  are ImageNet-C's values at 224 px and are scaled to the image's size (the offline suite's
  images are 16-32 px), with sigma >= 0.5 px and n >= 1; edges replicated. Noise levels are
  per pixel value and not scaled.

``severity`` is 1..5 as in ImageNet-C. Every random draw comes from a generator keyed by
``(seed, corruption, severity, index of the image)``, so a corrupted test set is the same in
every run, whatever the data-loader order or number of workers. ``clean`` is the identity.

The task pool (:class:`CLIPSuiteCorruptedTaskPool`, config ``taskpool=clip_suite_corrupted``)
is the suite's test-split task pool with the corruption applied to each test image before
the CLIP processor. ``corruption`` is one name (the report then looks exactly like the clean
task pool's) or a list of names, in which case the model is evaluated under each condition
and the report holds ``<condition>/<task>`` entries, a per-condition average, and an overall
``average``. Only the evaluation images change: fitting data (the model pool) stays clean.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from omegaconf import ListConfig, OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from ..modelpool.clip_suite import CLIPSuiteTaskPool, SuiteError

log = logging.getLogger(__name__)

CLEAN = "clean"
CORRUPTIONS = ("motion_blur", "impulse_noise", "gaussian_noise")
SEVERITIES = (1, 2, 3, 4, 5)
_GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)
_IMPULSE = (0.03, 0.06, 0.09, 0.17, 0.27)
_MOTION = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))
_REFERENCE_SIZE = 224  # ImageNet-C's image size, at which the motion-blur parameters hold
_IDS = {name: i for i, name in enumerate(CORRUPTIONS)}


def check_corruption(name: str, severity: int) -> None:
    if name != CLEAN and name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption '{name}'; choose one of {[CLEAN, *CORRUPTIONS]}.")
    if int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be one of {list(SEVERITIES)}, got {severity}.")


def _rng(name: str, severity: int, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _IDS[name], int(severity), int(index)])


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, _GAUSSIAN[severity - 1], x.shape)


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(x.shape) < _IMPULSE[severity - 1]
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = _MOTION[severity - 1]
    scale = min(x.shape[0], x.shape[1]) / _REFERENCE_SIZE
    sigma = max(sigma * scale, 0.5)
    length = max(1, int(round(min(radius * scale * 2, 3 * sigma))))
    angle = math.radians(rng.uniform(-45.0, 45.0))
    steps = np.arange(length + 1)
    weights = np.exp(-(steps ** 2) / (2 * sigma ** 2))
    weights /= weights.sum()
    dy = np.rint(steps * math.sin(angle)).astype(int)
    dx = np.rint(steps * math.cos(angle)).astype(int)
    pad = length
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    out = np.zeros_like(x)
    for wgt, oy, ox in zip(weights, dy, dx):
        out += wgt * padded[pad + oy : pad + oy + h, pad + ox : pad + ox + w]
    return out


_FUNCTIONS = {"gaussian_noise": gaussian_noise, "impulse_noise": impulse_noise, "motion_blur": motion_blur}


def corrupt_image(image: Image.Image, name: str, severity: int = 3, index: int = 0, seed: int = 0) -> Image.Image:
    """The ``index``-th image of a set under ``name`` at ``severity`` (same inputs, same pixels)."""
    check_corruption(name, severity)
    if name == CLEAN:
        return image
    x = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    y = _FUNCTIONS[name](x, int(severity), _rng(name, severity, index, seed))
    return Image.fromarray(np.uint8(np.clip(y, 0.0, 1.0) * 255.0 + 0.5))


class CorruptedImageDataset(Dataset):
    """A dataset of ``{'image', 'label', ...}`` items (or ``(image, label)`` pairs) whose images
    are corrupted on access; labels pass through untouched (they are only used for scoring)."""

    def __init__(self, dataset: Any, corruption: str, severity: int = 3, seed: int = 0):
        check_corruption(corruption, severity)
        self.dataset, self.corruption, self.severity, self.seed = dataset, corruption, int(severity), int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if isinstance(item, dict):
            return {**item, "image": corrupt_image(item["image"], self.corruption, self.severity, index, self.seed)}
        image, label = item
        return corrupt_image(image, self.corruption, self.severity, index, self.seed), label


def _conditions(corruption: Union[str, Sequence[str]]) -> List[str]:
    if isinstance(corruption, (list, tuple, ListConfig)):
        names = [str(c) for c in corruption]
    else:
        names = [str(corruption)]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"corruption must be a name or a list of distinct names, got {names}.")
    return names


class CLIPSuiteCorruptedTaskPool(CLIPSuiteTaskPool):
    """The suite's test-split task pool with corrupted images (see the module docstring)."""

    def __init__(self, suite_dir: str, corruption: Union[str, Sequence[str]] = "gaussian_noise", severity: int = 3,
                 seed: int = 0, tasks: Optional[Sequence[str]] = None, split: str = "test", **kwargs):
        self.conditions = _conditions(corruption)
        for c in self.conditions:
            check_corruption(c, severity)
        super().__init__(suite_dir, tasks=tasks, split=split, **kwargs)
        self.corruption, self.severity, self.seed = corruption, int(severity), int(seed)
        if not self._test_datasets:
            raise SuiteError(f"The suite at '{suite_dir}' has no '{split}' split to corrupt.")
        self._plain_datasets = self._test_datasets
        self._set_condition(self.conditions[0])

    def _set_condition(self, condition: str) -> None:
        """Point the host's dataset configs at ``condition`` (instantiated by its ``setup``)."""
        self._test_datasets = OmegaConf.create({
            task: {"_target_": f"{__name__}.CorruptedImageDataset", "dataset": cfg, "corruption": condition,
                   "severity": self.severity, "seed": self.seed}
            for task, cfg in self._plain_datasets.items()})

    def evaluate(self, model, name=None, **kwargs):
        if len(self.conditions) == 1:
            return super().evaluate(model, name=name, **kwargs)
        report: Dict[str, Any] = {}
        per_condition: Dict[str, Dict[str, float]] = {}
        for condition in self.conditions:
            self._set_condition(condition)
            self.setup()  # new datasets and loaders for this condition (same CLIP and processor files)
            log.info("Evaluating under '%s' (severity %d)", condition, self.severity)
            sub = super().evaluate(model, name=name, **kwargs)
            report.setdefault("model_info", sub.get("model_info"))
            for task, result in sub.items():
                if task not in ("model_info", "average") and isinstance(result, dict):
                    report[f"{condition}/{task}"] = result
            per_condition[condition] = dict(sub.get("average", {}))
        accs = [v["accuracy"] for k, v in report.items() if "/" in k and "accuracy" in v]
        report["conditions"] = {c: {"severity": self.severity if c != CLEAN else None, **avg}
                                for c, avg in per_condition.items()}
        report["average"] = {"accuracy": sum(accs) / len(accs)} if accs else {}
        return report


def condition_accuracies(report: Dict[str, Any]) -> Dict[str, Dict[str, float]]:
    """``{condition: {task: accuracy}}`` from a multi-condition report (or accuracies keyed
    ``<condition>/<task>``)."""
    out: Dict[str, Dict[str, float]] = {}
    for key, value in report.items():
        if "/" not in key:
            continue
        acc = value.get("accuracy") if isinstance(value, dict) else value
        if acc is None:
            continue
        condition, task = key.split("/", 1)
        out.setdefault(condition, {})[task] = float(acc)
    return out
