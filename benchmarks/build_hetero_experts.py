#!/usr/bin/env python
"""Train other-architecture experts (small ResNets) for tasks of a CLIP suite.

The experts are ``transformers`` ``ResNetForImageClassification`` models (basic-block,
ResNet-18 layout with a reduced width), trained **from scratch** (no pretrained weights of
any kind) with labels on the task's train split and selected by validation accuracy: they
stand for fine-tuned experts of a different architecture. Merging them with the suite's CLIP
experts goes through ``modelpool=clip_suite_hetero``, which distils each of them into the
CLIP architecture on unlabeled images first.

Examples::

    python benchmarks/build_hetero_experts.py --suite /data/clip_suite --tasks syn_digits,syn_signs --device cuda
    python benchmarks/build_hetero_experts.py --suite /tmp/tiny_suite --tasks tiny_colors --tiny   # seconds, CPU

Written under ``--out`` (default ``<suite>/hetero_experts``)::

    <task>/                 config.json + model.safetensors + preprocessor_config.json (ViTImageProcessor)
    <task>/expert.yaml      {kind: hf_image_classifier, path: .}  (read by the hetero model pool)
    <task>/metrics.json     accuracies, settings, history
    accuracies.json         {task: {validation_accuracy, test_accuracy, ...}} for every built task
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
FULL = dict(width=32, depths="2,2,2,2", epochs=30, batch_size=256, lr=2e-3, max_train=None)
TINY = dict(width=8, depths="1,1,1,1", epochs=3, batch_size=32, lr=3e-3, max_train=96)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True, type=Path, help="suite built by benchmarks/build_clip_suite.py")
    p.add_argument("--tasks", required=True, help="comma-separated task names of the suite")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <suite>/hetero_experts)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--tiny", action="store_true", help="a tiny net and a few steps (CPU tests, seconds)")
    p.add_argument("--width", type=int, default=None, help="channels of the first stage (doubled per stage)")
    p.add_argument("--depths", default=None, help="blocks per stage, e.g. 2,2,2,2 (ResNet-18 layout)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--max-train", type=int, default=None, help="use at most this many train images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    a = p.parse_args(argv)
    preset = TINY if a.tiny else FULL
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    return a


def make_processor(image_size: int):
    """The expert's own preprocessing: resize to the suite's size, ImageNet normalisation
    (deliberately not CLIP's), as a transformers image processor saved with the model."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": image_size, "width": image_size},
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def make_model(classnames: List[str], width: int, depths: List[int]):
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=width, hidden_sizes=[width * 2 ** i for i in range(len(depths))],
                          depths=depths, layer_type="basic", hidden_act="relu", downsample_in_first_stage=False,
                          num_labels=len(classnames), id2label={i: c for i, c in enumerate(classnames)},
                          label2id={c: i for i, c in enumerate(classnames)})
    return ResNetForImageClassification(config)


def load_split(suite: Path, task: str, split: str, processor, limit=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pixels (through the expert's processor) and labels of a split; training the experts uses labels."""
    import datasets

    ds = datasets.load_from_disk(str(suite / "data" / task / split))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    pixels = []
    for start in range(0, len(ds), 1024):
        images = [im.convert("RGB") for im in ds[start:start + 1024]["image"]]
        pixels.append(processor(images=images, return_tensors="pt")["pixel_values"])
    return torch.cat(pixels), torch.tensor(ds["label"], dtype=torch.long)


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: float = 0.125) -> torch.Tensor:
    """Per-image random translation (up to ``max_shift`` of the side), zero padding; no flips
    (digits, letters and signs are not mirror-symmetric)."""
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * 2 * max_shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@torch.no_grad()
def accuracy(model, pixels, labels, device, amp, batch=1024) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(pixels), batch):
        with autocast(device, amp):
            logits = model(pixel_values=pixels[s:s + batch].to(device)).logits
        correct += int((logits.argmax(-1).cpu() == labels[s:s + batch]).sum())
    return correct / max(1, len(labels))


def train_expert(model, train, val, a, device) -> Dict[str, object]:
    """AdamW + warm-up/cosine; keep the weights of the epoch with the best validation accuracy."""
    amp = not a.no_amp
    gen = torch.Generator().manual_seed(a.seed)
    x, y = train
    steps_per_epoch = max(1, math.ceil(len(x) / a.batch_size))
    total = a.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    best = {"validation_accuracy": -1.0, "epoch": -1, "state": None}
    history = []
    for epoch in range(a.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        losses = []
        for s in range(0, len(x), a.batch_size):
            idx = order[s:s + a.batch_size]
            xb = random_shift(x[idx].to(device), gen).to(device)
            with autocast(device, amp):
                loss = F.cross_entropy(model(pixel_values=xb).logits.float(), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        val_acc = accuracy(model, *val, device, amp)
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "validation_accuracy": val_acc})
        print(f"  epoch {epoch + 1}/{a.epochs}: loss {history[-1]['train_loss']:.4f}, val acc {val_acc:.4f}", flush=True)
        if val_acc > best["validation_accuracy"]:
            best = {"validation_accuracy": val_acc, "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "validation_accuracy": best["validation_accuracy"], "history": history}


def build_task(suite: Path, out: Path, task: str, classnames: List[str], a, device) -> Dict[str, object]:
    import datasets

    start = time.time()
    torch.manual_seed(a.seed)
    first = datasets.load_from_disk(str(suite / "data" / task / "train"))[0]["image"]
    image_size = max(first.size)
    processor = make_processor(image_size)
    train = load_split(suite, task, "train", processor, a.max_train)
    val = load_split(suite, task, "validation", processor)
    model = make_model(classnames, a.width, [int(d) for d in a.depths.split(",")])
    print(f"{task}: ResNet (from scratch, {sum(p.numel() for p in model.parameters()):,} parameters), "
          f"{len(train[0])} train / {len(val[0])} validation images at {image_size}px", flush=True)
    result = train_expert(model, train, val, a, device)
    test_dir = suite / "data" / task / "test"
    test_acc = accuracy(model, *load_split(suite, task, "test", processor), device, not a.no_amp) if test_dir.is_dir() else None
    model.cpu()
    target = out / task
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    (target / "expert.yaml").write_text(
        "# Read by fusion_bench_statsmerging.modelpool.heterogeneous (experts_dir); paths relative to this folder.\n"
        "kind: hf_image_classifier\npath: .\n")
    metrics = {
        "task": task, "architecture": "transformers ResNetForImageClassification (basic blocks)",
        "initialisation": "random (trained from scratch, no pretrained weights)",
        "width": a.width, "depths": a.depths, "parameters": sum(p.numel() for p in model.parameters()),
        "image_size": image_size, "num_train_images": len(train[0]),
        "validation_accuracy": result["validation_accuracy"], "test_accuracy": test_acc,
        "best_epoch": result["best_epoch"], "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr,
        "weight_decay": a.weight_decay, "seed": a.seed, "seconds": round(time.time() - start, 2),
        "history": result["history"],
    }
    (target / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{task}: best val acc {metrics['validation_accuracy']:.4f} (epoch {metrics['best_epoch'] + 1}), "
          f"test acc {test_acc if test_acc is None else round(test_acc, 4)}, {metrics['seconds']} s -> {target}", flush=True)
    return {k: v for k, v in metrics.items() if k != "history"}


def main(argv=None) -> int:
    a = parse_args(argv)
    suite = a.suite.resolve()
    tasks_file = suite / "tasks.json"
    if not tasks_file.is_file():
        raise SystemExit(f"No suite at {suite}: {tasks_file} is missing (build it with benchmarks/build_clip_suite.py).")
    info = json.loads(tasks_file.read_text())
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in info]
    if unknown:
        raise SystemExit(f"Tasks {unknown} are not in the suite; it has {list(info)}.")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    out = (a.out or suite / "hetero_experts").resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary_file = out / "accuracies.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    for task in tasks:
        summary[task] = build_task(suite, out, task, list(info[task]["classnames"]), a, device)
        summary_file.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
