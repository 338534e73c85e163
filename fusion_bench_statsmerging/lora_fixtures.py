"""Tiny offline LoRA experts on a tiny CLIP suite (tests and demos of the LoRA model pool).

For each task of a suite built by :func:`fixtures.build_tiny_clip_suite`, a peft LoRA adapter on the
pretrained CLIP vision tower is trained for a few steps on the task's train split through the task's
frozen zero-shot head (the same protocol as the dense experts) and saved with ``save_pretrained``
under ``<suite>/lora/<task>/``, the layout :class:`lora.CLIPLoRAModelPool` reads. B starts at zero
(peft's default), so the training is what makes each task vector non-zero.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from .fixtures import TEMPLATES, accuracy, fit_to_head, zero_shot_head
from .lora import LORA_DIR
from .suite import read_suite_tasks, split_dir

TARGET_MODULES = ("q_proj", "v_proj", "fc1", "fc2")


def tiny_lora_config(rank: int, alpha: float, target_modules: Sequence[str] = TARGET_MODULES):
    """The LoRA configuration of the tiny experts (linear layers of the vision encoder, no dropout)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)


def build_tiny_lora_experts(suite_dir: str | Path, rank: int = 4, alpha: float = 8.0, steps: int = 30,
                            lr: float = 1e-2, seed: int = 0) -> Path:
    """Train and save one LoRA adapter per task of the suite under ``<suite>/lora/``; return that folder."""
    import datasets
    from peft import get_peft_model
    from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

    suite = Path(suite_dir)
    pretrained = suite / "pretrained"
    clip_model = CLIPModel.from_pretrained(pretrained).eval()
    processor = CLIPProcessor.from_pretrained(pretrained)
    manifest = {"kind": "tiny_lora_fixture", "rank": rank, "alpha": alpha, "steps": steps, "tasks": {}}
    for t_idx, (task, info) in enumerate(read_suite_tasks(suite).items()):
        head = zero_shot_head(clip_model, processor, info["classnames"], info.get("templates", TEMPLATES))
        torch.manual_seed(seed + t_idx)
        model = get_peft_model(CLIPVisionModel.from_pretrained(pretrained), tiny_lora_config(rank, alpha))
        train = datasets.load_from_disk(str(split_dir(suite, task, "train")))
        fit_to_head(model.train(), clip_model, processor, head, train, steps, lr, seed + t_idx)
        model.save_pretrained(suite / LORA_DIR / task)
        test = datasets.load_from_disk(str(split_dir(suite, task, "test")))
        manifest["tasks"][task] = {"lora_test_accuracy": accuracy(model, clip_model, processor, head, test)}
    (suite / LORA_DIR / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return suite / LORA_DIR
