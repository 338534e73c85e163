"""The training loop of coefficient distillation, in its own room.

A :class:`Trainer` fits a *coefficient module* (an ``nn.Module`` whose ``forward()`` gives the (K, L)
merging coefficients) through a merging engine so that the merged model matches each expert on its own
task's fit set. It knows nothing of methods or model families: a :class:`Family` strategy says how the
merged model's outputs per task are read, a :class:`~.fit_data.FitData` holds the fit set, the selection
set and the batch stream. The Trainer does the step (losses under autocast, per-task backward, SAM in
parameter or coefficient space, DDP gradient averaging), the loop (schedule, logging, label-free
selection, checkpoints, profiler, the loop's clock) and returns what happened as a :class:`TrainResult`.

A short trial run (StatsMerging's start probes) is the same loop with ``steps`` and a ``log_prefix``,
without checkpoints or profiler.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..utils.inputs import Inputs, num_rows, take, target_logits
from . import distributed
from .checkpoint import Checkpointer, StopFlag
from .distillation import agreement, distillation_loss, feature_loss
from .progress import RunProgress
from .profiling import LoopClock, StepProfiler
from .sam import SAM, OutputPerturbation
from .schedule import Schedule
from .selection import BestState
from .settings import AUTOCAST_DTYPES, TrainingSettings

log = logging.getLogger(__name__)

# (logits, features) of the merged model per task; features None where the family has none
Outputs = Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]


@dataclass
class Family:
    """What the Trainer (and the fit data's preparation) needs of a model family: how to read a task's
    unlabeled inputs, how an expert labels them (logits; features for ``feature_weight``), and the merged
    model's outputs per task."""

    fit_inputs: Callable[[object, List[int]], Inputs]
    teacher_targets: Callable[[nn.Module, str, Inputs], Tensor]
    teacher_features: Callable[[nn.Module, str, Inputs], Tensor]
    merged_outputs: Callable[[nn.Module, Dict[str, Inputs]], Outputs]

    def merged_logits(self, engine: nn.Module, inputs: Dict[str, Inputs]) -> Dict[str, Tensor]:
        return self.merged_outputs(engine, inputs)[0]


@dataclass
class TrainResult:
    history: List[dict]
    selection: Optional[Dict[str, object]] = None  # the kept state's summary (select_by: validation_agreement)
    loop: Dict[str, object] = field(default_factory=dict)  # where the loop's time went
    profile: Optional[Dict[str, object]] = None


def autocast_context(setting: Optional[str], device: torch.device):
    """bf16/fp16 autocast of the forward/backward when configured (the merge itself stays in the engine's
    precision; losses are computed in float32); ``auto``: bf16 on CUDA, where it halves the step, fp32 elsewhere."""
    dtype = AUTOCAST_DTYPES[setting]
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def selection_score(family: Family, engine, coefficients: Callable[[], Tensor], data: tuple, batch_size: int,
                    fabric, autocast: Optional[str]) -> float:
    """Mean over tasks of the merged model's agreement with each expert on its selection images, in mixed
    batches of every task as in training (BatchNorm on batch statistics sees the same mix)."""
    inputs, targets = data
    engine.set_coefficients(coefficients().detach())
    hits = {t: 0.0 for t in inputs}
    longest = max(num_rows(x) for x in inputs.values())
    for start in range(0, longest, batch_size):
        chunk = {t: take(x, slice(start, start + batch_size)) for t, x in inputs.items() if num_rows(x) > start}
        with autocast_context(autocast, fabric.device):
            logits = family.merged_logits(engine, {t: fabric.to_device(x) for t, x in chunk.items()})
        for t, lg in logits.items():
            tgt = target_logits(targets[t])[start:start + batch_size].to(lg.device)
            hits[t] += agreement(lg.float(), tgt) * num_rows(chunk[t])
    return float(sum(hits[t] / num_rows(inputs[t]) for t in inputs) / len(inputs))


class Trainer:
    """One training run of a coefficient module (see the module docstring)."""

    def __init__(self, settings: TrainingSettings, family: Family, fabric, schedule: Schedule, label: str,
                 checkpoints: Optional[Checkpointer] = None, stop: Optional[StopFlag] = None,
                 profile_dir: Optional[str] = None, progress: Optional[RunProgress] = None):
        self.settings, self.family, self.fabric, self.schedule = settings, family, fabric, schedule
        self.progress = progress  # the whole run's steps (probes too): the time left, said after the first steps
        self.label = label
        self.checkpoints = checkpoints or Checkpointer(None)
        self.stop = stop
        self.profile_dir = profile_dir

    # ------------------------------------------------------------------ the step
    def task_losses(self, engine: nn.Module, batch: Dict[str, tuple]) -> Dict[str, Tensor]:
        """The merged model's loss on each task's batch against that task's targets (and, with
        ``feature_weight``, against the expert's features too)."""
        s, device = self.settings, self.fabric.device
        with autocast_context(s.autocast, device):
            logits, features = self.family.merged_outputs(engine, {task: b[0] for task, b in batch.items()})
        losses = {}
        for task, (_, tgt) in batch.items():
            loss = distillation_loss(logits[task].float(), target_logits(tgt).to(device), s.loss, s.temperature)
            if isinstance(tgt, dict) and features is not None:
                loss = loss + float(s.feature_weight) * feature_loss(features[task].float(),
                                                                      tgt["features"].to(device))
            losses[task] = loss
        return losses

    def closure_loss(self, engine, coefficient_module, batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Merge at the module's current coefficients and return the mean task loss.

        With ``per_task_backward`` the gradients are computed here, one task at a time through a
        single merge (less activation memory), and the returned loss is detached.
        """
        if not self.settings.per_task_backward:
            engine.set_coefficients(coefficient_module())
            losses = self.task_losses(engine, batch)
            return torch.stack(list(losses.values())).mean(), losses
        finish = engine.set_coefficients_detached(coefficient_module())
        losses = {}
        for task, task_batch in batch.items():
            loss = self.task_losses(engine, {task: task_batch})[task]
            (loss / len(batch)).backward()
            losses[task] = loss.detach()
        finish()
        return torch.stack(list(losses.values())).mean(), losses

    def step(self, optimizer, engine, coefficient_module, batch) -> Tuple[Tensor, Dict[str, Tensor]]:
        """One optimisation step (SAM calls the closure twice, re-merging each time). Under DDP the
        closure averages the gradients across ranks before SAM or the optimizer reads them."""
        s = self.settings
        params = [p for p in coefficient_module.parameters() if p.requires_grad]
        in_output_space = s.optimizer == "sam" and s.sam_space == "coefficients"
        coefficients = OutputPerturbation(coefficient_module) if in_output_space else coefficient_module
        closure = distributed.synced_closure(lambda: self.closure_loss(engine, coefficients, batch),
                                             params, self.fabric)
        if in_output_space:
            world = distributed.world_size(self.fabric)
            return optimizer.step(closure, output=coefficients,
                                  reduce=lambda tensors: distributed.all_reduce_mean_(tensors, world))
        if s.optimizer == "sam":
            return optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        loss, losses = closure()
        if loss.requires_grad:  # per-task backward has already computed the gradients
            loss.backward()
        optimizer.step()
        return loss, losses

    def make_optimizer(self, params):
        s = self.settings
        base = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        if s.optimizer == "sam":
            return SAM(base, rho=s.sam_rho, adaptive=s.sam_adaptive)
        return base

    def selection_score(self, engine, coefficient_module, data) -> float:
        return selection_score(self.family, engine, coefficient_module, data, self.settings.batch_size,
                               self.fabric, self.settings.autocast)

    # ------------------------------------------------------------------ the loop
    def train(self, engine, coefficient_module, fit, steps: Optional[int] = None, log_prefix: str = "") -> TrainResult:
        """Train ``coefficient_module`` on ``fit`` (a :class:`~.fit_data.FitData`) and leave the kept state in
        it. ``steps`` (default: the schedule's) and ``log_prefix`` (for the logged scalars) serve short
        trial runs such as StatsMerging's start probes, which are not profiled."""
        s, fabric, schedule = self.settings, self.fabric, self.schedule
        params = [p for p in coefficient_module.parameters() if p.requires_grad]
        if not params:  # a frozen learner without residual (max_steps 0, checked up front) has nothing to fit
            return TrainResult(history=[])
        optimizer = self.make_optimizer(params)
        base_opt = getattr(optimizer, "base_optimizer", optimizer)
        scheduler = (torch.optim.lr_scheduler.StepLR(base_opt, schedule.lr_step_size, s.lr_gamma)
                     if schedule.lr_step_size else None)
        selection_data = fit.selection
        best = BestState() if selection_data is not None else None
        if best is not None:
            best.offer(self.selection_score(engine, coefficient_module, selection_data), 0, coefficient_module)
        history: List[dict] = []
        checkpoints = self.checkpoints
        start = checkpoints.resume(coefficient_module, base_opt, scheduler, best, history)
        batches = fit.batches(s.batch_size, s.seed, fabric)
        for _ in range(start):  # the stream is a function of the seed: replay it to where the run stopped
            next(batches)
        trial = steps is not None
        steps = schedule.max_steps if steps is None else int(steps)
        profiler = (StepProfiler(s.profile_steps, self.profile_dir, fabric.device)
                    if s.profile_steps and not trial else None)
        label = self.label + (f" {log_prefix}" if log_prefix else "")
        pbar = tqdm(range(start, steps), label, dynamic_ncols=True, initial=start, total=steps)
        clock = LoopClock(fabric.device)
        for step in pbar:
            loss, losses = self.step(optimizer, engine, coefficient_module, next(batches))
            if scheduler is not None:
                scheduler.step()
            clock.step_done()
            estimate = self.progress.step() if self.progress else None
            if estimate and distributed.is_rank_zero(fabric):
                log.info(estimate)
            if step == start:
                clock.lap("first step")
            bucket = "profiled steps" if profiler is not None and profiler.active else "steps"
            if step % s.log_every == 0 or step == steps - 1:
                with clock.section("logging", bucket):
                    history.append(self.log_step(step, loss, losses, coefficient_module, base_opt, log_prefix, pbar))
            if best is not None and ((step + 1) % s.select_every == 0 or step == steps - 1):
                with clock.section("selection", bucket):
                    score = self.selection_score(engine, coefficient_module, selection_data)
                    best.offer(score, step + 1, coefficient_module)
                    fabric.log_dict({log_prefix + "select/validation_agreement": score}, step=step)
            distributed.share_stop(self.stop, fabric)
            saving = checkpoints.saves_after(step + 1, steps, self.stop)
            with clock.section("checkpoints", bucket) if saving else contextlib.nullcontext():
                checkpoints.after_step(step + 1, steps, self.stop, coefficient_module, base_opt, scheduler, best,
                                       history)
            if profiler is not None:  # opening the window syncs; closing it writes the tables (seconds)
                boundary = profiler.at_boundary(step + 1 - start)
                with clock.section("profiler", bucket) if boundary else contextlib.nullcontext():
                    profiler.after_step(step + 1 - start)
        clock.lap("steps")
        result = TrainResult(history, loop=clock.summary())
        if profiler is not None:
            profiler.finish(steps - start)
            result.profile = profiler.summary
        if best is not None:
            best.restore(coefficient_module)
            result.selection = best.summary()
            log.info("%s: kept the state of step %d (validation agreement %.4f)", self.label, best.step, best.score)
        return result

    def log_step(self, step, loss, losses, coefficient_module, base_opt, log_prefix, pbar) -> dict:
        """The scalars of one logged step (to the fabric's loggers and the progress bar); its history entry."""
        with torch.no_grad():
            coef = coefficient_module().detach()
        metrics = {"train/loss": float(loss.detach()), "train/lr": base_opt.param_groups[0]["lr"],
                   "coefficients/mean": float(coef.mean()), "coefficients/min": float(coef.min()),
                   "coefficients/max": float(coef.max())}
        metrics.update({f"train/loss_{t}": float(v.detach()) for t, v in losses.items()})
        self.fabric.log_dict({log_prefix + k: v for k, v in metrics.items()}, step=step)
        pbar.set_postfix(loss=f"{float(loss.detach()):.4f}", coef=f"{float(coef.mean()):.3f}",
                         **(self.progress.postfix() if self.progress else {}))
        return {"step": step, **metrics}
