"""Task datasets: deterministic split planning, real-image sampling and parallel generation.

Splits never share source pixels: Fashion-MNIST test comes from the official t10k file and
train/validation from disjoint slices of the training file; sklearn digits are partitioned
stratified; scene patches are cut from disjoint cells of each photograph.  Pretraining draws
only from the leftovers (see ``pretrain_data``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from . import render as R
from .sources import FashionMNIST, load_fashion_mnist, load_scene_images, load_sklearn_digits
from .tasks import SYNTHETIC_DRAW, TaskSpec

SPLITS: Tuple[str, ...] = ("train", "validation", "test")
SCENE_GRID = 4
# Cells of the 4x4 grid of every scene photograph, by role: 3 + 8 + 2 + 3 = 16.
SCENE_CELL_ROLES: Tuple[Tuple[str, int], ...] = (("pretrain", 3), ("train", 8), ("validation", 2), ("test", 3))

ImagesLabels = Tuple[np.ndarray, np.ndarray]


@dataclass
class Resources:
    """Real source arrays plus the fixed partition of them into task splits and pretraining."""

    size: int
    fashion: Optional[FashionMNIST] = None
    fashion_index: Dict[str, np.ndarray] = field(default_factory=dict)
    digits: Optional[Tuple[np.ndarray, np.ndarray]] = None
    digits_index: Dict[str, np.ndarray] = field(default_factory=dict)
    scenes: Dict[str, np.ndarray] = field(default_factory=dict)
    scene_cells: Dict[str, Dict[str, List[Tuple[int, int]]]] = field(default_factory=dict)


# Forked workers read resources from here instead of pickling large arrays per job.
_WORKER_RES: Dict[str, Resources] = {}


def stratified_partition(labels: np.ndarray, sizes: Sequence[int], rng: np.random.Generator) -> List[np.ndarray]:
    """Split indices into consecutive parts of the given sizes with near-equal class balance."""
    order = rng.permutation(len(labels))
    classes = np.unique(labels)
    per_class = [order[labels[order] == c] for c in classes]
    interleaved = np.stack([p[: min(map(len, per_class))] for p in per_class], 1).reshape(-1)
    rest = np.setdiff1d(order, interleaved, assume_unique=False)
    merged = np.concatenate([interleaved, rng.permutation(rest)])
    parts, start = [], 0
    for s in sizes:
        parts.append(rng.permutation(merged[start:start + s]))
        start += s
    return parts


def capped_sizes(total: int, sizes: Sequence[int]) -> List[int]:
    """Shrink requested split sizes proportionally when a real source is too small."""
    want = sum(sizes)
    if want <= total:
        return list(sizes)
    return [int(s * total / want) for s in sizes]


def plan_resources(size: int, seed: int, split_sizes: Dict[str, Dict[str, int]],
                   fashion_dir: Optional[str], task_names: Sequence[str]) -> Resources:
    """Load the real sources needed by ``task_names`` and fix which pixels go to which split."""
    res = Resources(size=size)
    rng = np.random.default_rng([seed, 11])
    need_fashion = "syn_fashion" in task_names
    if need_fashion:
        res.fashion = load_fashion_mnist(fashion_dir)
        s = split_sizes["syn_fashion"]
        tr_lab = res.fashion.train_labels
        tr, va, pre = stratified_partition(tr_lab, [s["train"], s["validation"], len(tr_lab) - s["train"] - s["validation"]], rng)
        (te,) = stratified_partition(res.fashion.test_labels, [s["test"]], rng)
        res.fashion_index = {"train": tr, "validation": va, "test": te, "pretrain": pre}
    if "syn_digits" in task_names:
        res.digits = load_sklearn_digits()
        s = split_sizes["syn_digits"]
        sizes = capped_sizes(len(res.digits[1]), [s["train"], s["validation"], s["test"]])
        parts = stratified_partition(res.digits[1], sizes, rng)
        res.digits_index = dict(zip(SPLITS, parts))
    res.scenes = load_scene_images()
    for name in res.scenes:
        cells = [(i, j) for i in range(SCENE_GRID) for j in range(SCENE_GRID)]
        perm = rng.permutation(len(cells))
        roles, start = {}, 0
        for role, count in SCENE_CELL_ROLES:
            roles[role] = [cells[k] for k in perm[start:start + count]]
            start += count
        res.scene_cells[name] = roles
    return res


def scene_patch(img: np.ndarray, cell: Tuple[int, int], rng: np.random.Generator, size: int) -> np.ndarray:
    """Random square crop inside one grid cell of a photograph, resized to ``size``."""
    h, w = img.shape[:2]
    ch, cw = h / SCENE_GRID, w / SCENE_GRID
    side = min(ch, cw) * rng.uniform(0.6, 1.0)
    y0 = cell[0] * ch + rng.uniform(0, ch - side)
    x0 = cell[1] * cw + rng.uniform(0, cw - side)
    crop = Image.fromarray(img).crop((int(x0), int(y0), int(x0 + side), int(y0 + side)))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None), dtype=np.uint8)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels 0..C-1 repeated to length ``n`` then shuffled: balanced synthetic splits."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def chunk_rng(seed: int, stream: int, chunk: int) -> np.random.Generator:
    """Independent generator per (stream, chunk): results do not depend on the worker count."""
    return np.random.default_rng([seed, stream, chunk])


def _synthetic_chunk(args: Tuple[str, int, int, int, np.ndarray]) -> np.ndarray:
    """Worker: draw the images of one chunk of a synthetic split."""
    task, seed, stream, chunk, labels = args
    res = _WORKER_RES["res"]
    rng = chunk_rng(seed, stream, chunk)
    draw = SYNTHETIC_DRAW[task]
    return np.stack([draw(rng, int(lab), res.size) for lab in labels])


def _scene_chunk(args: Tuple[str, int, int, int, np.ndarray]) -> np.ndarray:
    """Worker: cut the patches of one chunk of a scene split."""
    split, seed, stream, chunk, labels = args
    res = _WORKER_RES["res"]
    rng = chunk_rng(seed, stream, chunk)
    names = list(res.scenes)
    out = []
    for lab in labels:
        cells = res.scene_cells[names[lab]][split]
        out.append(scene_patch(res.scenes[names[lab]], cells[int(rng.integers(len(cells)))], rng, res.size))
    return np.stack(out)


def parallel_map(fn: Callable[[Any], np.ndarray], jobs: List[Any], res: Resources, workers: int) -> List[np.ndarray]:
    """Run chunk jobs, forking workers that share ``res`` copy-on-write (serial when workers<=1)."""
    _WORKER_RES["res"] = res
    if workers <= 1 or len(jobs) <= 1 or "fork" not in mp.get_all_start_methods():
        return [fn(j) for j in jobs]
    with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        return pool.map(fn, jobs, chunksize=1)


def _chunks(labels: np.ndarray, chunk: int) -> List[np.ndarray]:
    return [labels[i:i + chunk] for i in range(0, len(labels), chunk)]


def _real_images(task: str, split: str, res: Resources) -> ImagesLabels:
    """Resize the preassigned real images of a split to the suite resolution."""
    if task == "syn_fashion":
        assert res.fashion is not None
        idx = res.fashion_index[split]
        src, lab = ((res.fashion.test_images, res.fashion.test_labels) if split == "test"
                    else (res.fashion.train_images, res.fashion.train_labels))
        imgs = np.stack([R.resize_array(src[i], res.size) for i in idx])
        return imgs, lab[idx].astype(np.int64)
    if task == "syn_digits":
        assert res.digits is not None
        idx = res.digits_index[split]
        imgs = np.stack([R.resize_array(res.digits[0][i], res.size) for i in idx])
        return imgs, res.digits[1][idx].astype(np.int64)
    raise KeyError(task)


def build_task_split(task: TaskSpec, split: str, n: int, res: Resources, seed: int,
                     task_index: int, workers: int, chunk: int = 256) -> ImagesLabels:
    """Images (uint8 N x S x S x 3) and labels for one split of one task."""
    if task.name in ("syn_fashion", "syn_digits"):
        return _real_images(task.name, split, res)
    stream = 1000 + 10 * task_index + SPLITS.index(split)
    labels = balanced_labels(n, task.num_classes, np.random.default_rng([seed, stream]))
    parts = _chunks(labels, chunk)
    if task.name == "syn_scenes":
        jobs = [(split, seed, stream, i, p) for i, p in enumerate(parts)]
        imgs = parallel_map(_scene_chunk, jobs, res, workers)
    else:
        jobs = [(task.name, seed, stream, i, p) for i, p in enumerate(parts)]
        imgs = parallel_map(_synthetic_chunk, jobs, res, workers)
    return np.concatenate(imgs), labels


def build_all_tasks(tasks: Sequence[TaskSpec], split_sizes: Dict[str, Dict[str, int]], res: Resources,
                    seed: int, workers: int, progress: Optional[Callable[[str], None]] = None
                    ) -> Dict[str, Dict[str, ImagesLabels]]:
    """All splits of all tasks, keyed task -> split -> (images, labels)."""
    out: Dict[str, Dict[str, ImagesLabels]] = {}
    for ti, task in enumerate(tasks):
        out[task.name] = {}
        for split in SPLITS:
            out[task.name][split] = build_task_split(task, split, split_sizes[task.name][split], res, seed, ti, workers)
        if progress:
            progress(task.name)
    return out


def default_workers() -> int:
    """Worker processes for data generation: all cores, but at most 16."""
    return max(1, min(16, os.cpu_count() or 1))
