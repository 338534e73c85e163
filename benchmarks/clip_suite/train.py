"""Training loops: contrastive CLIP pretraining, frozen-head expert fine-tuning, evaluation.

All data lives on the training device as uint8 tensors and is augmented there, so the GPU is
never starved by a Python data loader; every random draw comes from a seeded torch.Generator.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import image_embeds, normalize_pixels, text_embeds


@dataclass(frozen=True)
class PretrainConfig:
    """Contrastive pretraining schedule."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    max_shift: float = 2.0
    min_scale: float = 0.85


@dataclass(frozen=True)
class FinetuneConfig:
    """Expert fine-tuning schedule (vision tower only, frozen zero-shot head)."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    eval_every: int
    weight_decay: float = 0.1
    max_shift: float = 2.0
    min_scale: float = 0.85


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (fast, numerically safe for these sizes); plain fp32 elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.05) -> float:
    """LR multiplier: linear warm-up then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    t = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class StepBudget:
    """Fits a loop's step count into a wall-clock allowance.

    Without ``seconds`` the loop runs ``planned`` steps. With it, steps ``skip`` to
    ``skip + calibrate`` are timed (the first ones pay for CUDA start-up and kernel selection)
    and the total becomes ``min(planned, steps that fit in what is left of the allowance)``,
    with a safety factor for periodic evaluations. Loops read ``total`` at every step, so a
    learning-rate schedule built on it shrinks with it and still decays to its floor.
    """

    def __init__(self, planned: int, seconds: Optional[float] = None, skip: int = 5, calibrate: int = 20,
                 sync: Callable[[], None] = lambda: None, safety: float = 0.92,
                 clock: Callable[[], float] = time.perf_counter):
        self.planned = self.total = int(planned)
        self.seconds, self.skip, self.calibrate, self.sync, self.safety = seconds, skip, calibrate, sync, safety
        self.clock = clock
        self.start = clock()
        self.t0: Optional[float] = None
        self.step_seconds: Optional[float] = None

    def step_done(self, step: int) -> None:
        """Call after step ``step`` (0-based) finished."""
        if self.seconds is None or self.step_seconds is not None:
            return
        done = step + 1
        if done == self.skip:
            self.sync()
            self.t0 = self.clock()
        elif self.t0 is not None and done == self.skip + self.calibrate:
            self.sync()
            now = self.clock()
            self.step_seconds = (now - self.t0) / self.calibrate
            left = self.seconds * self.safety - (now - self.start)
            self.total = max(done + 1, min(self.planned, done + int(max(0.0, left) / self.step_seconds)))

    def info(self) -> Dict[str, object]:
        """For the manifest: what was planned, what ran, and the measured step time."""
        return {"planned_steps": self.planned, "steps": self.total, "allowance_s": self.seconds,
                "step_seconds": None if self.step_seconds is None else round(self.step_seconds, 5)}


def device_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued kernels (timing on CUDA needs it)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def random_affine(x: torch.Tensor, gen: torch.Generator, max_shift: float, min_scale: float) -> torch.Tensor:
    """Per-sample random zoom-in and translation (a batched, on-device RandomResizedCrop)."""
    b, _, s, _ = x.shape
    u = torch.rand(b, 3, generator=gen, device=x.device)
    scale = min_scale + (1 - min_scale) * u[:, 0]
    shift = (u[:, 1:] * 2 - 1) * (2.0 * max_shift / s)
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def param_groups(module: torch.nn.Module, weight_decay: float) -> List[Dict[str, object]]:
    """No weight decay on biases, norms, embeddings and the temperature (standard for CLIP/ViT)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class EpochSampler:
    """Batches of indices from seeded permutations, so every sample is seen once per epoch."""

    def __init__(self, n: int, batch: int, gen: torch.Generator, device: torch.device):
        self.n, self.batch, self.gen, self.device = n, batch, gen, device
        self.perm = torch.randperm(n, generator=gen, device=device)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
            self.pos = 0
        out = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return out


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, caption_id: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE where every pair with identical caption text counts as a positive.

    Templated captions repeat within a batch; treating the duplicates as negatives would push
    apart embeddings that should coincide.
    """
    logits = scale * img.float() @ txt.float().t()
    same = (caption_id[:, None] == caption_id[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
    acc = (same.gather(1, logits.argmax(1, keepdim=True)) > 0).float().mean()
    return loss, acc


def pretrain_clip(model, images: np.ndarray, token_ids: np.ndarray, lengths: np.ndarray,
                  caption_ids: np.ndarray, cfg: PretrainConfig, device: torch.device, seed: int,
                  amp: bool = True, seconds: Optional[float] = None) -> Dict[str, object]:
    """CLIP/InfoNCE pretraining of all parameters on the (image, K captions) pool.

    ``seconds``: wall-clock allowance; the step count is then fitted to it (``StepBudget``).
    """
    model.to(device).train()
    n, k = token_ids.shape[:2]
    # One fixed text length for the whole run: no per-step host sync to find the batch maximum.
    length = int(lengths.max())
    positions = torch.arange(length, device=device)[None, :]
    imgs = torch.from_numpy(images).to(device)
    ids = torch.from_numpy(np.ascontiguousarray(token_ids[:, :, :length])).to(device)
    lens = torch.from_numpy(lengths).to(device)
    cids = torch.from_numpy(caption_ids.reshape(n, k)).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    sampler = EpochSampler(n, min(cfg.batch_size, n), gen, device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    budget = StepBudget(cfg.steps, seconds, sync=device_sync(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, budget.total))
    ema_loss, ema_acc = None, None
    bar = tqdm(total=cfg.steps, desc="pretrain", dynamic_ncols=True, mininterval=2.0)
    step = 0
    while step < budget.total:
        idx = sampler.next()
        pick = torch.randint(k, (idx.numel(),), generator=gen, device=device)
        tok = ids[idx, pick].long()
        mask = (positions < lens[idx, pick][:, None]).long()
        x = random_affine(normalize_pixels(imgs[idx]), gen, cfg.max_shift, cfg.min_scale)
        with autocast(device, amp):
            ie = image_embeds(model.vision_model, model.visual_projection, x)
            te = text_embeds(model, tok, mask)
        loss, acc = contrastive_loss(ie, te, model.logit_scale.exp(), cids[idx, pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 10 == 0 or step == budget.total - 1:
            lv, av = float(loss.detach()), float(acc)
            ema_loss = lv if ema_loss is None else 0.9 * ema_loss + 0.1 * lv
            ema_acc = av if ema_acc is None else 0.9 * ema_acc + 0.1 * av
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.2f}", T=f"{model.logit_scale.detach().exp().item():.0f}")
        budget.step_done(step)
        bar.total = budget.total
        bar.update(1)
        step += 1
    bar.close()
    model.eval()
    return {"final_loss": float(ema_loss or 0.0), "final_batch_acc": float(ema_acc or 0.0),
            "logit_scale": model.logit_scale.detach().exp().item(), **budget.info()}


@torch.no_grad()
def predict(vision_module, projection, head: torch.Tensor, images: np.ndarray, device: torch.device,
            batch: int = 512, amp: bool = True) -> np.ndarray:
    """Arg-max class of cos-sim to the head rows (temperature does not change the arg-max)."""
    vision_module.eval()
    out = []
    for i in range(0, len(images), batch):
        x = normalize_pixels(torch.from_numpy(images[i:i + batch]).to(device))
        with autocast(device, amp):
            e = image_embeds(vision_module, projection, x)
        out.append((e.float() @ head.t()).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def accuracy(vision_module, projection, head: torch.Tensor, data: Tuple[np.ndarray, np.ndarray],
             device: torch.device, amp: bool = True) -> float:
    """Top-1 accuracy of the zero-shot-style classifier on (images, labels)."""
    images, labels = data
    if len(labels) == 0:
        return 0.0
    return float((predict(vision_module, projection, head, images, device, amp=amp) == labels).mean())


def finetune_expert(vision_model, projection, head: torch.Tensor, scale: float,
                    train: Tuple[np.ndarray, np.ndarray], val: Tuple[np.ndarray, np.ndarray],
                    cfg: FinetuneConfig, device: torch.device, seed: int, amp: bool = True,
                    desc: str = "expert", seconds: Optional[float] = None
                    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Fine-tune ``vision_model`` (a CLIPVisionModel) with a frozen head; keep the best-on-validation state.

    ``seconds``: wall-clock allowance; the step count is then fitted to it (``StepBudget``).
    """
    vision_model.to(device)
    projection.to(device).requires_grad_(False)
    head = head.to(device)
    imgs = torch.from_numpy(train[0]).to(device)
    labels = torch.from_numpy(train[1]).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    sampler = EpochSampler(len(labels), min(cfg.batch_size, len(labels)), gen, device)
    opt = torch.optim.AdamW(param_groups(vision_model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    budget = StepBudget(cfg.steps, seconds, sync=device_sync(device))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, budget.total))

    def snapshot() -> Dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in vision_model.state_dict().items()}

    # Step 0 (the zero-shot model) is logged but not selectable: an expert must be fine-tuned.
    history = [(0, accuracy(vision_model, projection, head, val, device, amp))]
    best_acc, best_state, best_step = -1.0, snapshot(), 0
    bar = tqdm(total=cfg.steps, desc=desc, dynamic_ncols=True, mininterval=2.0, leave=False)
    step = 0
    while step < budget.total:
        vision_model.train()
        idx = sampler.next()
        x = random_affine(normalize_pixels(imgs[idx]), gen, cfg.max_shift, cfg.min_scale)
        with autocast(device, amp):
            e = image_embeds(vision_model, projection, x)
        loss = F.cross_entropy(scale * e.float() @ head.t(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision_model.parameters(), 1.0)
        opt.step()
        sched.step()
        budget.step_done(step)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == budget.total:
            acc = accuracy(vision_model, projection, head, val, device, amp)
            history.append((step + 1, acc))
            if acc > best_acc:
                best_acc, best_state, best_step = acc, snapshot(), step + 1
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", val=f"{acc:.3f}", best=f"{best_acc:.3f}")
        bar.total = budget.total
        bar.update(1)
        step += 1
    bar.close()
    vision_model.load_state_dict(best_state)
    vision_model.eval()
    return best_state, {"best_val_acc": best_acc, "best_step": best_step, "val_history": history, **budget.info()}
