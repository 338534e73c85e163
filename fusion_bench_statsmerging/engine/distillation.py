"""Task-specific teacher distillation: each expert labels unlabeled images of its own task.

The data protocol decides which split the images come from and whether human labels are
read at all. Under the label-free protocols the image loader below touches only the
``image`` field of each row, so a dataset whose labels are missing or unreadable works.
Teacher outputs are computed once, before training, and cached as logits.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """Where fitting data comes from, and what labels the loss uses."""

    name: str
    split: str  # "train", "validation" or "test"
    ground_truth: bool  # human labels instead of teacher pseudo labels
    description: str


PROTOCOLS: Dict[str, Protocol] = {
    p.name: p
    for p in [
        Protocol("train_unlabeled", "train", False,
                 "label-free: unlabeled train-split images, teacher pseudo labels"),
        Protocol("validation_unlabeled", "validation", False,
                 "label-free: unlabeled validation-split images, teacher pseudo labels"),
        Protocol("test_time_adaptation", "test", False,
                 "test-time adaptation: unlabeled TEST images, teacher pseudo labels (AdaMerging's protocol)"),
        Protocol("train_ground_truth", "train", True,
                 "uses human labels: train-split images with ground-truth labels (the paper's GT ablation)"),
    ]
}

LOSSES = ("hard", "soft")


def get_protocol(name: str) -> Protocol:
    """Resolve a protocol name, or say which names exist."""
    if name not in PROTOCOLS:
        raise ValueError(
            f"Unknown data protocol '{name}'. Choose one of {list(PROTOCOLS)}: "
            + "; ".join(f"{p.name} = {p.description}" for p in PROTOCOLS.values())
        )
    return PROTOCOLS[name]


def num_fit_samples(dataset_size: int, fraction: float, min_samples: int,
                    max_samples: Optional[int] = None) -> int:
    """How many images of a task to use: a fraction of the split, at least one batch."""
    n = max(math.ceil(fraction * dataset_size), min_samples)
    if max_samples is not None:
        n = min(n, max_samples)
    return min(n, dataset_size)


def sample_indices(dataset_size: int, n: int, seed: int) -> List[int]:
    """A fixed random subset, so reruns with the same seed fit on the same images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(dataset_size, generator=g)[:n].sort().values.tolist()


def _image_of(row: Any):
    """The image of a dataset row, without touching its label."""
    if isinstance(row, (tuple, list)):
        return row[0]
    return row["image"]


def _label_of(row: Any) -> int:
    if isinstance(row, (tuple, list)):
        return int(row[1])
    return int(row["label"])


def image_only_view(dataset):
    """For Hugging Face datasets, drop every column but ``image`` before any row is read."""
    if hasattr(dataset, "select_columns") and "image" in getattr(dataset, "column_names", []):
        return dataset.select_columns(["image"])
    return dataset


def preprocessing_threads() -> int:
    """Threads for image preprocessing: decoding and resizing run in PIL and numpy, which release the
    GIL, so a few threads divide the wait (tens of seconds for thousands of images) by about as many."""
    return max(1, min(8, os.cpu_count() or 1))


def load_pixels(dataset, indices: Sequence[int], processor, batch_size: int = 64,
                dtype: torch.dtype = torch.float16, threads: Optional[int] = None) -> Tensor:
    """Preprocess the chosen images once (stored compactly; cast back per batch). Chunks are
    preprocessed in parallel threads and concatenated in order: the result does not depend on
    ``threads``."""
    view = image_only_view(dataset)

    def chunk(start: int) -> Tensor:
        images = [_image_of(view[i]) for i in indices[start : start + batch_size]]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        return processor(images=images, return_tensors="pt")["pixel_values"].to(dtype)

    starts = range(0, len(indices), batch_size)
    threads = preprocessing_threads() if threads is None else max(1, int(threads))
    if threads == 1 or len(starts) == 1:
        return torch.cat([chunk(s) for s in starts])
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return torch.cat(list(pool.map(chunk, starts)))


def load_labels(dataset, indices: Sequence[int]) -> Tensor:
    """Human labels: only ever called under a ground-truth protocol (never on a test split)."""
    return torch.tensor([_label_of(dataset[i]) for i in indices], dtype=torch.long)


@torch.no_grad()
def teacher_logits(logits_fn: Callable[[Tensor], Tensor], pixels: Tensor, batch_size: int,
                   device: torch.device) -> Tensor:
    """Run a frozen teacher over cached pixels; logits are kept on the CPU in float32."""
    out = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(device=device, dtype=torch.float32)
        out.append(logits_fn(batch).float().cpu())
    return torch.cat(out)


def distillation_loss(student_logits: Tensor, targets: Tensor, loss: str = "hard",
                      temperature: float = 1.0) -> Tensor:
    """Cross-entropy on the teacher's argmax (``hard``) or T^2-scaled KL to its softened output (``soft``).

    ``targets`` are teacher logits (float) or class indices (long, hard labels given directly).
    """
    if targets.dtype == torch.long:
        return F.cross_entropy(student_logits, targets)
    if loss == "hard":
        return F.cross_entropy(student_logits, targets.argmax(dim=-1))
    if loss == "soft":
        t = temperature
        return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(targets / t, dim=-1),
                        log_target=True, reduction="batchmean") * t * t
    raise ValueError(f"Unknown distillation loss '{loss}'; choose one of {list(LOSSES)}.")


def feature_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Relative squared error ||s - t||^2 / ||t||^2 per sample, averaged: scale-free, so one weight
    serves a CNN's 1280-d pooled features and a text encoder's 384-d sentence embedding alike."""
    return ((student - teacher).square().sum(-1) / teacher.square().sum(-1).clamp_min(1e-8)).mean()


def agreement(student_logits: Tensor, targets: Tensor) -> float:
    """Share of samples where the student's class equals the target class."""
    target_class = targets if targets.dtype == torch.long else targets.argmax(-1)
    return float((student_logits.argmax(-1) == target_class).float().mean())
