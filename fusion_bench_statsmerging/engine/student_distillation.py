"""Distilling a student of the target architecture from a teacher of another (StatsMerging Eq. 8).

:func:`distill_student` trains a student's trainable parameters to match a teacher
(:class:`~fusion_bench_statsmerging.models.teachers.Teacher`) on unlabeled images of one task::

    loss = alpha * CE(student, argmax teacher) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

Each model sees an image through its own preprocessing; the teacher's logits are computed once
per image before training. :class:`DistillationSettings` holds the schedule and the data
protocol (which split, how much of it, how much held out to measure agreement). The pools that
use it (cache, expert specs, students) are :mod:`fusion_bench_statsmerging.modelpool.heterogeneous`
and :mod:`fusion_bench_statsmerging.modelpool.heterogeneous_heads`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models.teachers import Teacher
from ..utils.errors import UserError
from .distillation import _image_of, agreement, distillation_loss, image_only_view, num_fit_samples, sample_indices

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class HeteroPoolError(UserError):
    """A heterogeneous pool that cannot be made homogeneous, with what to change."""


@dataclass
class DistillationSettings:
    """How each other-architecture expert is distilled into the target architecture."""

    split: str = "train"
    allow_test_split: bool = False
    temperature: float = 4.0
    alpha: float = 0.7
    data_fraction: float = 1.0
    max_samples: Optional[int] = 4096
    held_out_fraction: float = 0.1
    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 50
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    eval_batch_size: int = 256
    log_every: int = 10

    # settings that do not change the student (left out of the cache key)
    _NOT_KEYED = ("device", "eval_batch_size", "log_every", "allow_test_split")

    @classmethod
    def from_config(cls, cfg: Any) -> "DistillationSettings":
        if cfg is None:
            cfg = {}
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise HeteroPoolError(f"Unknown distillation settings {unknown}; known: {sorted(known)}.")
        s = cls(**cfg)
        if s.split not in SPLITS:
            raise HeteroPoolError(f"distillation.split must be one of {list(SPLITS)}, got '{s.split}'.")
        if s.split == "test" and not s.allow_test_split:
            raise HeteroPoolError(
                "distillation.split=test distils on unlabeled TEST images (test-time adaptation); set "
                "distillation.allow_test_split=true to do so on purpose, and report it.")
        if not 0.0 <= s.alpha <= 1.0:
            raise HeteroPoolError(f"distillation.alpha must be in [0, 1], got {s.alpha}.")
        if s.temperature <= 0 or s.lr <= 0:
            raise HeteroPoolError("distillation.temperature and distillation.lr must be positive.")
        if not 0.0 < s.data_fraction <= 1.0 or not 0.0 <= s.held_out_fraction < 1.0:
            raise HeteroPoolError("distillation.data_fraction must be in (0, 1] and held_out_fraction in [0, 1).")
        for key in ("max_steps", "batch_size", "eval_batch_size", "log_every"):
            if int(getattr(s, key)) < 1:
                raise HeteroPoolError(f"distillation.{key} must be >= 1.")
        return s

    def keyed(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self._NOT_KEYED}

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


PixelFn = Callable[[List[Any]], Tensor]  # PIL images -> the student's preprocessed pixels (N, C, H, W)


def clip_pixels(image_processor) -> PixelFn:
    """A Hugging Face image processor as a :data:`PixelFn`."""
    return lambda images: image_processor(images=images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def _teacher_targets_and_student_pixels(teacher: Teacher, student_pixels: PixelFn, dataset, indices, batch_size,
                                        device, desc):
    """Read each chosen image once (image column only); the teacher sees it through its own
    preprocessing (its logits are kept), the student through its own (pixels kept)."""
    view = image_only_view(dataset)
    logits, pixels = [], []
    for start in tqdm(range(0, len(indices), batch_size), desc, leave=False):
        images = [_image_of(view[i]) for i in indices[start:start + batch_size]]
        images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
        t_px = teacher.pixels(images).to(device=device, dtype=torch.float32)
        logits.append(teacher.logits(t_px).float().cpu())
        pixels.append(student_pixels(images).to(torch.float16))
    return torch.cat(pixels), torch.cat(logits)


@torch.no_grad()
def _predict(model: nn.Module, pixels: Tensor, batch_size: int, device, amp: bool) -> Tensor:
    out = []
    for start in range(0, len(pixels), batch_size):
        with _autocast(device, amp):
            out.append(model(pixels[start:start + batch_size].to(device, torch.float32)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def distill_student(teacher: Teacher, student: nn.Module, student_pixels: PixelFn, dataset,
                    settings: DistillationSettings, task: str, tensorboard_dir: Optional[str] = None,
                    target_name: str = "CLIP") -> Dict[str, Any]:
    """Train ``student``'s trainable parameters to match ``teacher`` on unlabeled images of ``task`` (Eq. 8).

    The student trains in training mode (BatchNorm normalises with batch statistics and updates
    its running ones); frozen parts (a CLIP student's projection and zero-shot head) stay as they
    are. Returns a report: sample counts and the student's agreement with the teacher on held-out
    unlabeled images (before and after), on the fitting images, and the loss history.
    """
    s, device = settings, settings.torch_device()
    start_time = time.time()
    n = num_fit_samples(len(dataset), s.data_fraction, min_samples=2, max_samples=s.max_samples)
    chosen = sample_indices(len(dataset), n, s.seed)
    n_held = int(round(s.held_out_fraction * n))
    if s.held_out_fraction > 0:
        n_held = min(max(1, n_held), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed + 1)).tolist()
    held = sorted(chosen[i] for i in perm[:n_held])
    fit = sorted(chosen[i] for i in perm[n_held:])

    teacher.model.to(device)
    fit_px, fit_t = _teacher_targets_and_student_pixels(
        teacher, student_pixels, dataset, fit, s.eval_batch_size, device, f"Teacher logits ({task})")
    held_px, held_t = _teacher_targets_and_student_pixels(
        teacher, student_pixels, dataset, held, s.eval_batch_size, device, f"Teacher logits ({task}, held-out)")
    teacher.model.cpu()

    student.to(device)
    student.eval()
    before = agreement(_predict(student, held_px, s.eval_batch_size, device, s.amp), held_t) if n_held else None

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _warmup_cosine(i, s.warmup_steps, s.max_steps))
    writer = None
    if tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(tensorboard_dir)
    gen = torch.Generator().manual_seed(s.seed + 2)
    order, pos, history = torch.randperm(len(fit_px), generator=gen), 0, []
    batch = min(s.batch_size, len(fit_px))
    student.train()
    pbar = tqdm(range(s.max_steps), f"Distilling {teacher.spec.kind} expert -> {target_name} ({task})",
                dynamic_ncols=True)
    for step in pbar:
        if pos + batch > len(order):
            order, pos = torch.randperm(len(fit_px), generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        px, t = fit_px[idx].to(device, torch.float32), fit_t[idx].to(device)
        with _autocast(device, s.amp):
            logits = student(px).float()
        ce = distillation_loss(logits, t, "hard")
        kl = distillation_loss(logits, t, "soft", s.temperature)
        loss = s.alpha * ce + (1.0 - s.alpha) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % s.log_every == 0 or step == s.max_steps - 1:
            row = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()), "kl": float(kl.detach()),
                   "lr": opt.param_groups[0]["lr"], "batch_agreement": agreement(logits.detach(), t)}
            history.append(row)
            if writer is not None:
                for k, v in row.items():
                    if k != "step":
                        writer.add_scalar(f"distill/{k}", v, step)
            pbar.set_postfix(loss=f"{row['loss']:.4f}", agree=f"{row['batch_agreement']:.2f}")
    student.eval()
    after = agreement(_predict(student, held_px, s.eval_batch_size, device, s.amp), held_t) if n_held else None
    fit_sub = slice(0, min(len(fit_px), 1024))
    fit_agree = agreement(_predict(student, fit_px[fit_sub], s.eval_batch_size, device, s.amp), fit_t[fit_sub])
    if writer is not None:
        if after is not None:
            writer.add_scalar("distill/held_out_agreement", after, s.max_steps)
        writer.close()
    student.cpu()
    report = {
        "task": task,
        "split": s.split,
        "num_fit_images": len(fit), "num_held_out_images": len(held), "dataset_size": len(dataset),
        "agreement_with_teacher": {"held_out": after, "held_out_before_distillation": before, "fit": fit_agree},
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
        "seconds": round(time.time() - start_time, 2),
        "uses_ground_truth_labels": False,
    }
    log.info("Distilled '%s' (%s expert): agreement with teacher on %d held-out unlabeled images %s -> %s",
             task, teacher.spec.kind, len(held), before, after)
    return report
