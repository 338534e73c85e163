"""Shared machinery of the coefficient-distillation methods (StatsMerging, SAMerging).

A method supplies a *coefficient module*: an ``nn.Module`` whose ``forward()`` returns the
(K, L) merging coefficients and whose parameters are the only thing optimised (the
StatsMergeLearner for StatsMerging, free coefficients for SAMerging). A model family
(CLIP here, see :mod:`.clip`; Flan-T5 or per-task-head classifiers elsewhere) supplies four
hooks: how to set up task heads, how to read unlabeled inputs, how a teacher labels them,
and the merged model's logits per task. :class:`CoefficientDistillation` does the rest,
identically for all: checks the pool and the config before any long work, caches the
teachers' outputs, runs the training loop through the merged model, logs, and writes the
artefacts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench import BaseAlgorithm, auto_register_config
from fusion_bench.mixins import SimpleProfilerMixin

from ..engine import distributed
from ..engine.checkpoint import CHECKPOINT_NAME, Checkpointer, StopFlag, resolve_resume
from ..engine.distillation import (
    LOSSES, agreement, distillation_loss, feature_loss, get_protocol, load_labels, num_fit_samples, sample_indices,
)
from ..engine.merge import HostLayerWiseEngine, check_same_architecture, trainable_names
from ..engine.profiling import LoopClock, StepProfiler
from ..engine.sam import SAM, OutputPerturbation
from ..engine.schedule import Schedule, check_schedule, resolve_schedule
from ..engine.selection import SELECTIONS, BestState
from ..utils import artifacts
from ..utils.errors import PoolError, UserError
from ..utils.inputs import Inputs, keep_fit_data_on_device, nbytes, num_rows, on_devices, take, take_on, target_logits
from ..utils.preflight import check_loaded_model, check_writable
from ..utils.splits import SPLITS
from .hints import check_hub_files, taskpool_hint

log = logging.getLogger(__name__)

ENGINES = ("fused", "host")

OPTIMIZERS = ("adam", "sam")
# where SAM perturbs: the optimised parameters (learner weights, or free coefficients), or the merging
# coefficients they produce (sam.OutputPerturbation; the same thing for free coefficients)
SAM_SPACES = ("parameters", "coefficients")
AUTOCAST_DTYPES = {None: None, "none": None, "auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}

def build_engine(name: str, pretrained: nn.Module, experts: List[nn.Module], **kwargs) -> nn.Module:
    """The reference engine wraps the host's LayerWiseMergedModel; ``fused`` is the fast one."""
    if name == "host":
        kwargs.pop("task_vector_dtype", None)
        return HostLayerWiseEngine(pretrained, experts, **kwargs)
    if name == "fused":
        from ..engine.fused import FusedLayerWiseEngine

        return FusedLayerWiseEngine(pretrained, experts, **kwargs)
    raise UserError(f"Unknown merge_engine '{name}'; choose one of {list(ENGINES)}.")


SCORING_ROWS = 256  # fit images per task that label-free scores read when no validation images are loaded


def scoring_images(selection_data: Optional[tuple], pixels: Dict[str, Inputs], targets: Dict[str, object]):
    """Images (with the experts' targets) that label-free scores read, and where they come from: the
    unlabeled validation images of ``select_by: validation_agreement``, else the first fit images."""
    if selection_data is not None:
        return selection_data, "validation split (unlabeled), as select_by"
    first = slice(0, SCORING_ROWS)
    return (({t: take(p, first) for t, p in pixels.items()}, {t: take(v, first) for t, v in targets.items()}),
            f"train split (unlabeled): the first {SCORING_ROWS} fit images per task")


@auto_register_config
class CoefficientDistillation(SimpleProfilerMixin, BaseAlgorithm):
    """Base class: a method implements :meth:`build_coefficient_module`; a model family the
    four hooks ``setup_task_heads``, ``fit_inputs``, ``teacher_targets`` and ``merged_logits``."""

    method_label = "coefficient distillation"
    report_name = "statsmerging_report.json"  # each method names its own report file

    def __init__(
        self,
        protocol: str = "train_unlabeled",
        loss: str = "hard",
        temperature: float = 1.0,
        feature_weight: float = 0.0,
        data_fraction: float = 0.01,
        min_samples_per_task: Optional[int] = None,
        max_samples_per_task: Optional[int] = None,
        batch_size: int = 16,
        max_steps: Optional[int] = 500,
        max_epochs: Optional[float] = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_step_size: Optional[int] = 100,
        lr_step_epochs: Optional[float] = None,
        lr_gamma: float = 0.1,
        select_by: str = "last",
        select_every: int = 100,
        select_samples: int = 256,
        optimizer: str = "adam",
        sam_rho: float = 0.05,
        sam_adaptive: bool = False,
        sam_space: str = "parameters",
        merge_engine: str = "fused",
        task_vector_dtype: Optional[str] = None,
        autocast: Optional[str] = None,
        activation_checkpointing: float = 0.0,
        per_task_backward: bool = False,
        tie_weights: bool = True,
        strict: bool = False,
        seed: int = 0,
        log_every: int = 10,
        artifact_dir: Optional[str] = None,
        save_merged_model: bool = False,
        checkpoint_every: int = 100,
        resume: Union[bool, str, None] = False,
        fit_data_on_device: Union[bool, str] = "auto",
        profile_steps: int = 0,
        **kwargs,
    ):
        # Validate everything a typo could break now, before any model is loaded.
        self._protocol = get_protocol(protocol)
        if loss not in LOSSES:
            raise UserError(f"Unknown loss '{loss}'; choose one of {list(LOSSES)}.")
        if optimizer not in OPTIMIZERS:
            raise UserError(f"Unknown optimizer '{optimizer}'; choose one of {list(OPTIMIZERS)}.")
        if sam_space not in SAM_SPACES:
            raise UserError(f"Unknown sam_space '{sam_space}'; choose one of {list(SAM_SPACES)}.")
        if merge_engine not in ENGINES:
            raise UserError(f"Unknown merge_engine '{merge_engine}'; choose one of {list(ENGINES)}.")
        if task_vector_dtype not in (None, "float32", "bfloat16", "float16"):
            raise UserError(f"task_vector_dtype must be null, float32, bfloat16 or float16, got '{task_vector_dtype}'.")
        if autocast not in AUTOCAST_DTYPES:
            raise UserError(f"autocast must be auto, null, bf16 or fp16, got '{autocast}'.")
        if not 0.0 <= float(activation_checkpointing) <= 1.0:
            raise UserError("activation_checkpointing is the fraction of layers to checkpoint, in [0, 1]; "
                             f"got {activation_checkpointing}.")
        if (activation_checkpointing or per_task_backward) and merge_engine != "fused":
            raise UserError("activation_checkpointing and per_task_backward need merge_engine: fused.")
        if int(batch_size) < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}.")
        check_schedule(max_steps, max_epochs, lr_step_size, lr_step_epochs)
        if select_by not in SELECTIONS:
            raise UserError(f"Unknown select_by '{select_by}'; choose one of {list(SELECTIONS)}.")
        if int(checkpoint_every) < 0:
            raise UserError(f"checkpoint_every must be >= 0 (0: only on SIGINT/SIGTERM), got {checkpoint_every}.")
        if fit_data_on_device not in (True, False, "auto"):
            raise UserError(f"fit_data_on_device must be true, false or auto, got {fit_data_on_device!r}.")
        if int(profile_steps) < 0:
            raise UserError(f"profile_steps must be >= 0 (0: no profile), got {profile_steps}.")
        if int(select_every) < 1 or int(select_samples) < 1:
            raise UserError(f"select_every and select_samples must be >= 1, got {select_every} and {select_samples}.")
        if not 0 < data_fraction <= 1:
            raise UserError(f"data_fraction must be in (0, 1], got {data_fraction}.")
        if float(feature_weight) < 0:
            raise UserError(f"feature_weight must be >= 0 (0: logits only), got {feature_weight}.")
        if float(feature_weight) > 0 and self._protocol.ground_truth:
            raise UserError("feature_weight distils the experts' features; protocol train_ground_truth has no "
                             "teacher. Set feature_weight: 0 or choose a label-free protocol.")
        if temperature <= 0 or lr <= 0:
            raise UserError(f"temperature and lr must be positive, got {temperature} and {lr}.")
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ hooks
    def build_coefficient_module(self, engine: nn.Module, model_names: List[str]) -> nn.Module:
        raise NotImplementedError

    def choose_start(self, engine: nn.Module, model_names: List[str], pixels, targets, selection_data,
                     out_dir: str, resume_from: Optional[Path]) -> None:
        """Before the coefficient module is built: a method may settle where it starts (StatsMerging's
        ``starts``); by default there is nothing to choose."""

    def extra_artifacts(self, coefficient_module: nn.Module, out_dir: str) -> Dict[str, str]:
        """Method-specific files (e.g. the trained learner); returns name -> path."""
        return {}

    # model-family hooks -------------------------------------------------
    def setup_task_heads(self, task_names: List[str]) -> None:
        """Prepare whatever turns the merged model's output into task logits (frozen)."""
        raise NotImplementedError

    def fit_inputs(self, dataset, indices: List[int]) -> Inputs:
        """The chosen unlabeled inputs of a task, preprocessed, without reading labels."""
        raise NotImplementedError

    def teacher_targets(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        """The expert's logits on its own task's inputs (CPU, float32)."""
        raise NotImplementedError

    def merged_logits(self, engine: nn.Module, inputs: Dict[str, Inputs]) -> Dict[str, Tensor]:
        """The merged model's logits for each task's inputs (on the fabric's device)."""
        return self.merged_outputs(engine, inputs)[0]

    def merged_outputs(self, engine: nn.Module, inputs: Dict[str, Inputs]):
        """(logits, features) of the merged model per task; features None where the family has none.
        A family implements this or :meth:`merged_logits`."""
        return self.merged_logits(engine, inputs), None

    def teacher_features(self, expert: nn.Module, task: str, inputs: Inputs) -> Tensor:
        """The expert's features (what its head reads) on its task's inputs, for ``feature_weight``."""
        raise PoolError(f"{type(self).__name__} has no feature distillation; set feature_weight: 0.")

    # ------------------------------------------------------------------ checks
    def check_pool(self, modelpool) -> Dict[str, object]:
        """Everything that can be wrong with the pool, found before loading any model.

        Returns the fitting dataset of each task (already loaded, reused later).
        """
        names = list(modelpool.model_names)
        if not modelpool.has_pretrained:
            raise PoolError(
                "The model pool has no `_pretrained_` model. Task vectors are fine-tuned minus "
                "pretrained weights, so add `_pretrained_: <CLIP model>` under `models:`."
            )
        if len(names) < 2:
            raise PoolError(
                f"The model pool has {len(names)} expert(s) ({names}); merging needs at least two. "
                "To evaluate a single model, use the host's `method=dummy`."
            )
        datasets = self.load_split(modelpool, self._protocol.split, names, f"Protocol '{self._protocol.name}' fits")
        if self.select_by == "validation_agreement":
            self._selection_datasets = self.load_split(
                modelpool, "validation", names, "select_by: validation_agreement scores unlabeled images")
        return datasets

    def load_split(self, modelpool, split: str, names: List[str], purpose: str) -> Dict[str, object]:
        """Each task's dataset of ``split``, or an error naming the tasks that lack it (or are too small)."""
        available = SPLITS[split].names(modelpool)
        missing = [n for n in names if n not in available]
        if missing:
            key = SPLITS[split].config_key
            where = ""
            if hasattr(modelpool, "dataset_dir"):  # a suite on disk: name the folders it looked for
                where = " (looked for " + ", ".join(f"'{modelpool.dataset_dir(n, split)}'" for n in missing) + ")"
            raise PoolError(
                f"{purpose} on the {split} split, but the model pool's "
                f"`{key}` has no entry for {missing}{where}. Add them, or change the method's options."
            )
        datasets = {}
        for name in names:
            ds = SPLITS[split].load(modelpool, name)
            if len(ds) == 0:
                raise PoolError(f"The {split} dataset of task '{name}' is empty.")
            if len(ds) < self.batch_size:
                raise PoolError(
                    f"The {split} dataset of task '{name}' has {len(ds)} samples, fewer than one "
                    f"batch (batch_size={self.batch_size}). Lower `batch_size` or add data."
                )
            datasets[name] = ds
        return datasets

    # ------------------------------------------------------------------ data
    def prepare_fit_data(self, datasets: Dict[str, object], experts: Dict[str, nn.Module]):
        """Pick each task's unlabeled images, preprocess them, and cache the teacher's outputs."""
        min_samples = self.min_samples_per_task or self.batch_size
        pixels, targets, info = {}, {}, {}
        self._fit_indices = {}  # checkpoints keep them: a resume on other samples is refused
        for t_idx, (task, ds) in enumerate(tqdm(datasets.items(), "Teacher targets")):
            n = num_fit_samples(len(ds), self.data_fraction, min_samples, self.max_samples_per_task)
            idx = sample_indices(len(ds), n, self.seed + t_idx)
            self._fit_indices[task] = idx
            pixels[task], targets[task] = self.labelled_inputs(task, ds, idx, experts[task],
                                                               self._protocol.ground_truth)
            info[task] = {"split": self._protocol.split, "num_samples": n, "dataset_size": len(ds)}
        return pixels, targets, info

    def labelled_inputs(self, task: str, dataset, indices: List[int], expert: nn.Module,
                        ground_truth: bool = False, with_features: bool = True) -> tuple:
        """The inputs at ``indices`` and their targets: the expert's logits (human labels only
        under a ground-truth protocol), with its features too when ``feature_weight`` asks for them."""
        inputs = self.fit_inputs(dataset, indices)
        if ground_truth:
            return inputs, load_labels(dataset, indices)
        teacher = expert.to(self.fabric.device).eval()
        with torch.no_grad():
            logits = self.teacher_targets(teacher, task, inputs)
            if with_features and float(self.feature_weight) > 0:
                logits = {"logits": logits, "features": self.teacher_features(teacher, task, inputs).float().cpu()}
        teacher.cpu()
        return inputs, logits

    def prepare_selection_data(self, experts: Dict[str, nn.Module]) -> Optional[tuple]:
        """For ``select_by: validation_agreement``: unlabeled validation images and the experts' logits
        on them (always teacher targets: selection never reads a label)."""
        datasets = getattr(self, "_selection_datasets", None)
        if self.select_by != "validation_agreement" or not datasets:
            return None
        inputs, targets = {}, {}
        for t_idx, (task, ds) in enumerate(datasets.items()):
            n = min(int(self.select_samples), len(ds))
            idx = sample_indices(len(ds), n, self.seed + 7919 + t_idx)
            inputs[task], targets[task] = self.labelled_inputs(task, ds, idx, experts[task], with_features=False)
        return inputs, targets

    @torch.no_grad()
    def selection_score(self, engine, coefficient_module, data) -> float:
        """Mean over tasks of the merged model's agreement with each expert on its validation images,
        in mixed batches of every task as in training (BatchNorm on batch statistics sees the same mix)."""
        inputs, targets = data
        engine.set_coefficients(coefficient_module().detach())
        hits = {t: 0.0 for t in inputs}
        longest = max(num_rows(x) for x in inputs.values())
        for start in range(0, longest, self.batch_size):
            chunk = {t: take(x, slice(start, start + self.batch_size)) for t, x in inputs.items()
                     if num_rows(x) > start}
            with self.autocast_context():
                logits = self.merged_logits(engine, {t: self.fabric.to_device(x) for t, x in chunk.items()})
            for t, lg in logits.items():
                tgt = target_logits(targets[t])[start:start + self.batch_size].to(lg.device)
                hits[t] += agreement(lg.float(), tgt) * num_rows(chunk[t])
        return float(sum(hits[t] / num_rows(inputs[t]) for t in inputs) / len(inputs))

    def _batches(self, pixels: Dict[str, Tensor], targets: Dict[str, Tensor]):
        """Endless per-task shuffled batches, reproducible from the seed. Under DDP every rank draws
        the same global batch and keeps its rows ``rank::world`` (all rows in one process); the
        fit-set rows it kept during its first pass over each task are noted in ``self._first_pass``
        (a reshuffle starts the next pass, after which every rank sees every row again).

        Each permutation is copied to the data's device once per pass, so drawing a batch of data kept
        on the GPU copies nothing from the host: a per-step host-to-device index copy would wait for the
        GPU and stop the host from queueing the next step while the current one runs."""
        gen = torch.Generator().manual_seed(self.seed)
        order = {t: torch.randperm(num_rows(p), generator=gen) for t, p in pixels.items()}
        placed = {t: on_devices(order[t], pixels[t], targets[t]) for t in pixels}
        pos = {t: 0 for t in pixels}
        mine = distributed.batch_rows(self.fabric)
        self._first_pass = {t: [] for t in pixels}
        reshuffled = set()
        while True:
            batch = {}
            for t in pixels:
                if pos[t] + self.batch_size > len(order[t]):
                    order[t], pos[t] = torch.randperm(num_rows(pixels[t]), generator=gen), 0
                    placed[t] = on_devices(order[t], pixels[t], targets[t])
                    reshuffled.add(t)
                rows = slice(pos[t], pos[t] + self.batch_size)
                if t not in reshuffled:
                    self._first_pass[t].extend(order[t][rows][mine].tolist())
                pos[t] += self.batch_size
                index = {d: o[rows][mine] for d, o in placed[t].items()}
                batch[t] = (take_on(pixels[t], index), take_on(targets[t], index))
            yield batch

    # ------------------------------------------------------------------ training
    def autocast_context(self):
        """bf16/fp16 autocast of the forward/backward when configured (the merge itself stays in
        the engine's precision; losses are computed in float32)."""
        dtype = AUTOCAST_DTYPES[self.autocast]
        if dtype == "auto":  # bf16 on CUDA, where it halves the step (docs/benchmarks.md); fp32 elsewhere
            dtype = torch.bfloat16 if self.fabric.device.type == "cuda" else None
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.fabric.device.type, dtype=dtype)

    def task_losses(self, engine: nn.Module, batch: Dict[str, tuple]) -> Dict[str, Tensor]:
        """The merged model's loss on each task's batch against that task's targets (and, with
        ``feature_weight``, against the expert's features too)."""
        device = self.fabric.device
        with self.autocast_context():
            logits, features = self.merged_outputs(engine, {task: b[0] for task, b in batch.items()})
        losses = {}
        for task, (_, tgt) in batch.items():
            loss = distillation_loss(logits[task].float(), target_logits(tgt).to(device), self.loss, self.temperature)
            if isinstance(tgt, dict) and features is not None:
                loss = loss + float(self.feature_weight) * feature_loss(features[task].float(),
                                                                         tgt["features"].to(device))
            losses[task] = loss
        return losses

    def closure_loss(self, engine, coefficient_module, batch) -> tuple[Tensor, Dict[str, Tensor]]:
        """Merge at the module's current coefficients and return the mean task loss.

        With ``per_task_backward`` the gradients are computed here, one task at a time through a
        single merge (less activation memory), and the returned loss is detached.
        """
        if not self.per_task_backward:
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

    def _step(self, optimizer, engine, coefficient_module, batch) -> tuple[Tensor, Dict[str, Tensor]]:
        """One optimisation step (SAM calls the closure twice, re-merging each time). Under DDP the
        closure averages the gradients across ranks before SAM or the optimizer reads them."""
        params = [p for p in coefficient_module.parameters() if p.requires_grad]
        in_output_space = self.optimizer == "sam" and self.sam_space == "coefficients"
        coefficients = OutputPerturbation(coefficient_module) if in_output_space else coefficient_module
        closure = distributed.synced_closure(lambda: self.closure_loss(engine, coefficients, batch),
                                             params, self.fabric)
        if in_output_space:
            world = distributed.world_size(self.fabric)
            return optimizer.step(closure, output=coefficients,
                                  reduce=lambda tensors: distributed.all_reduce_mean_(tensors, world))
        if self.optimizer == "sam":
            return optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)
        loss, losses = closure()
        if loss.requires_grad:  # per-task backward has already computed the gradients
            loss.backward()
        optimizer.step()
        return loss, losses

    def make_optimizer(self, params):
        base = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "sam":
            return SAM(base, rho=self.sam_rho, adaptive=self.sam_adaptive)
        return base

    def train(self, engine, coefficient_module, pixels, targets, selection_data=None, steps: Optional[int] = None,
              log_prefix: str = "") -> List[dict]:
        """The training loop; leaves the kept state in ``coefficient_module`` and its summary in
        ``self._selection``. ``steps`` (default: the schedule's) and ``log_prefix`` (for the logged
        scalars) serve short trial runs such as StatsMerging's start probes, which are not profiled."""
        schedule: Schedule = self._schedule
        params = [p for p in coefficient_module.parameters() if p.requires_grad]
        optimizer = self.make_optimizer(params)
        base_opt = getattr(optimizer, "base_optimizer", optimizer)
        scheduler = (torch.optim.lr_scheduler.StepLR(base_opt, schedule.lr_step_size, self.lr_gamma)
                     if schedule.lr_step_size else None)
        best = BestState() if selection_data is not None else None
        if best is not None:
            best.offer(self.selection_score(engine, coefficient_module, selection_data), 0, coefficient_module)
        history = []
        checkpoints = getattr(self, "_checkpoints", None) or Checkpointer(None)
        start = checkpoints.resume(coefficient_module, base_opt, scheduler, best, history)
        batches = self._batches(pixels, targets)
        for _ in range(start):  # the stream is a function of the seed: replay it to where the run stopped
            next(batches)
        trial = steps is not None
        steps = schedule.max_steps if steps is None else int(steps)
        profiler = (StepProfiler(self.profile_steps, self.out_dir(), self.fabric.device)
                    if self.profile_steps and not trial else None)
        label = f"{self.method_label} ({self._protocol.name})" + (f" {log_prefix}" if log_prefix else "")
        pbar = tqdm(range(start, steps), label, dynamic_ncols=True, initial=start, total=steps)
        clock = LoopClock(self.fabric.device)
        for step in pbar:
            loss, losses = self._step(optimizer, engine, coefficient_module, next(batches))
            if scheduler is not None:
                scheduler.step()
            clock.step_done()
            if step == start:
                clock.lap("first step")
            bucket = "profiled steps" if profiler is not None and profiler.active else "steps"
            if step % self.log_every == 0 or step == steps - 1:
                with clock.section("logging", bucket):
                    with torch.no_grad():
                        coef = coefficient_module().detach()
                    metrics = {"train/loss": float(loss.detach()), "train/lr": base_opt.param_groups[0]["lr"],
                               "coefficients/mean": float(coef.mean()), "coefficients/min": float(coef.min()),
                               "coefficients/max": float(coef.max())}
                    metrics.update({f"train/loss_{t}": float(v.detach()) for t, v in losses.items()})
                    self.fabric.log_dict({log_prefix + k: v for k, v in metrics.items()}, step=step)
                    history.append({"step": step, **metrics})
                    pbar.set_postfix(loss=f"{float(loss.detach()):.4f}", coef=f"{float(coef.mean()):.3f}")
            if best is not None and ((step + 1) % self.select_every == 0 or step == steps - 1):
                with clock.section("selection", bucket):
                    score = self.selection_score(engine, coefficient_module, selection_data)
                    best.offer(score, step + 1, coefficient_module)
                    self.fabric.log_dict({log_prefix + "select/validation_agreement": score}, step=step)
            distributed.share_stop(getattr(self, "_stop", None), self.fabric)
            stop = getattr(self, "_stop", None)
            saving = checkpoints.saves_after(step + 1, steps, stop)
            with clock.section("checkpoints", bucket) if saving else contextlib.nullcontext():
                checkpoints.after_step(step + 1, steps, stop, coefficient_module, base_opt, scheduler, best, history)
            if profiler is not None:  # opening the window syncs; closing it writes the tables (seconds)
                boundary = profiler.at_boundary(step + 1 - start)
                with clock.section("profiler", bucket) if boundary else contextlib.nullcontext():
                    profiler.after_step(step + 1 - start)
        clock.lap("steps")
        self._loop = clock.summary()
        if profiler is not None:
            profiler.finish(steps - start)
            self._profile = profiler.summary
        if best is not None:
            best.restore(coefficient_module)
            self._selection = best.summary()
            log.info("%s: kept the state of step %d (validation agreement %.4f)", self.method_label,
                     best.step, best.score)
        return history

    # ------------------------------------------------------------------ run
    def out_dir(self) -> str:
        return self.artifact_dir or self.log_dir or "outputs/statsmerging"

    def run(self, modelpool):
        self.modelpool = modelpool
        start = time.time()
        log.info("%s: data protocol = %s (%s)", self.method_label, self._protocol.name, self._protocol.description)
        hint = taskpool_hint(self._program)
        if hint and distributed.is_rank_zero(self.fabric):
            print(hint)
        distributed.check_batch_size(self.batch_size, distributed.world_size(self.fabric))
        out_dir = str(check_writable(self.out_dir(), "artifact folder (method.artifact_dir)"))
        resume_from = resolve_resume(self.resume, out_dir)
        check_hub_files(modelpool, self._program)
        datasets = self.check_pool(modelpool)
        names = list(modelpool.model_names)
        torch.manual_seed(self.seed)

        with self.profile("load models"):
            pretrained = modelpool.load_pretrained_model()
            check_loaded_model(pretrained, "_pretrained_", pretrained=True)
            experts = {n: check_loaded_model(modelpool.load_model(n), n) for n in names}
            for n, m in experts.items():
                m._statsmerging_name = n
            # mismatched or corrupt experts fail here, before teachers run or weights are merged
            check_same_architecture(pretrained, list(experts.values()), trainable_names(pretrained))
        with self.profile("task heads"):
            self.setup_task_heads(names)
        with self.profile("teacher targets"):
            pixels, targets, data_info = self.prepare_fit_data(datasets, experts)
            selection_data = self.prepare_selection_data(experts)
            self._schedule = resolve_schedule({t: num_rows(p) for t, p in pixels.items()}, self.batch_size,
                                              self.max_steps, self.max_epochs, self.lr_step_size,
                                              self.lr_step_epochs)
            log.info("%s: schedule %s", self.method_label, self._schedule.as_dict())
            size = nbytes(pixels) + nbytes(targets)
            if keep_fit_data_on_device(self.fit_data_on_device, size, self.fabric.device):  # no copy per step
                pixels = {t: self.fabric.to_device(p) for t, p in pixels.items()}
                targets = {t: self.fabric.to_device(v) for t, v in targets.items()}
            elif self.fabric.device.type != "cpu":
                log.info("%s: the fit set (%.1f GB) stays in host memory (fit_data_on_device=%s); each "
                         "step copies its batch", self.method_label, size / 1e9, self.fit_data_on_device)
        with self.profile("task vectors"):
            dtype = getattr(torch, self.task_vector_dtype) if self.task_vector_dtype else None
            engine = build_engine(self.merge_engine, pretrained, [experts[n] for n in names],
                                  tie_weights=self.tie_weights, strict=self.strict, task_vector_dtype=dtype)
            del experts
            engine = self.fabric.to_device(engine)
            if self.activation_checkpointing:
                from ..engine.fused import enable_activation_checkpointing

                enable_activation_checkpointing(engine, float(self.activation_checkpointing))
        self.choose_start(engine, names, pixels, targets, selection_data, out_dir, resume_from)
        with self.profile("coefficient module"):
            coefficient_module = self.fabric.to_device(self.build_coefficient_module(engine, names))

        # An interrupted run is not a lost run: checkpoints every `checkpoint_every` steps and on
        # SIGINT/SIGTERM, from which `method.resume` continues to the uninterrupted result.
        self._checkpoints = self.make_checkpointer(out_dir, resume_from)
        with self.profile("training"), StopFlag() as self._stop:
            history = self.train(engine, coefficient_module, pixels, targets, selection_data)

        with torch.no_grad():
            coefficients = coefficient_module().detach().float().cpu()
            fit_agreement = self._fit_agreement(engine, coefficients, pixels, targets)
        merged = engine.merge_and_unload(coefficients.to(self.fabric.device))
        if distributed.world_size(self.fabric) > 1:  # a collective: every rank takes part
            self._distributed = self.distributed_summary()
        if distributed.is_rank_zero(self.fabric):  # the ranks hold the same coefficients: one writes them
            files = self.write_artifacts(out_dir, coefficients, engine.param_names, names, coefficient_module,
                                         history, data_info, fit_agreement, time.time() - start)
            if self.save_merged_model:
                files["merged_model"] = str(artifacts.save_model_dir(merged, f"{out_dir}/merged_model"))
            self._checkpoints.remove()
        self.print_profile_summary()
        return merged

    def distributed_summary(self) -> Dict[str, object]:
        """Under DDP: the world size and, per task, the dataset indices each rank trained on in its first
        pass over the fit set (disjoint shares that together cover the rows of that pass)."""
        return {"world_size": distributed.world_size(self.fabric),
                "first_pass_rows_by_rank": distributed.rows_by_rank(self._first_pass, self._fit_indices,
                                                                    self.fabric)}

    def make_checkpointer(self, out_dir: str, resume_from) -> Checkpointer:
        """Rank 0 saves; every rank resumes from the same file (other ranks get no path to write)."""
        path = Path(out_dir) / CHECKPOINT_NAME if distributed.is_rank_zero(self.fabric) else None
        if resume_from is None and path is not None and path.is_file():
            log.warning("%s holds the checkpoint of an interrupted run; this run starts afresh and replaces it "
                        "(method.resume=true continues it instead).", path)
        config = {k: getattr(self, k) for k in self._config_mapping.values() if hasattr(self, k)}
        return Checkpointer(path, self.checkpoint_every, config, getattr(self, "_fit_indices", {}), resume_from)

    @torch.no_grad()
    def _fit_agreement(self, engine, coefficients, pixels, targets) -> Dict[str, float]:
        """How often the merged model agrees with the fitting targets (a training-data check only)."""
        engine.set_coefficients(coefficients.to(self.fabric.device))
        result = {}
        for task in pixels:
            logits = self.merged_logits(engine, {task: take(pixels[task], slice(0, 256))})[task].float().cpu()
            result[task] = agreement(logits, target_logits(targets[task])[:256].cpu())
        return result

    def report_extras(self) -> Dict[str, object]:
        """Optional entries of the JSON report: where the loop's time went, the profile when asked
        for one; a subclass adds its own (e.g. how its start was chosen)."""
        return {**({"loop": self._loop} if getattr(self, "_loop", None) else {}),
                **({"profile": self._profile} if getattr(self, "_profile", None) else {})}

    def phase_seconds(self) -> Dict[str, float]:
        """Wall time of each profiled phase so far (the report keeps them for benchmarks)."""
        durations = getattr(self.profiler, "recorded_durations", {})
        return {name: round(sum(values), 3) for name, values in durations.items()}

    def write_artifacts(self, out_dir, coefficients, param_names, names, coefficient_module, history,
                        data_info, fit_agreement, seconds) -> Dict[str, str]:
        files = {
            "coefficients_pt": str(artifacts.save_torch(f"{out_dir}/coefficients.pt", coefficients)),
            "coefficients_csv": str(artifacts.save_text(
                f"{out_dir}/coefficients.csv", artifacts.coefficients_csv(coefficients, names, param_names))),
            "heatmap": str(artifacts.save_heatmap(f"{out_dir}/coefficients_heatmap.png", coefficients, names,
                                                  title=f"{self.method_label} coefficients")),
        }
        files.update(self.extra_artifacts(coefficient_module, out_dir))
        report = {
            "method": self.method_label,
            "protocol": {"name": self._protocol.name, "description": self._protocol.description,
                         "split": self._protocol.split, "uses_ground_truth_labels": self._protocol.ground_truth},
            "config": {k: getattr(self, k) for k in self._config_mapping.values() if hasattr(self, k)},
            "models": names,
            "num_layers": len(param_names),
            "fit_data": data_info,
            **({"distributed": self._distributed} if getattr(self, "_distributed", None) else {}),
            "schedule": self._schedule.as_dict(),
            "selection": getattr(self, "_selection", {"select_by": "last"}),
            "fit_agreement_with_targets": fit_agreement,
            "coefficients": artifacts.coefficient_summary(coefficients, names),
            "final_loss": history[-1]["train/loss"] if history else None,
            "history": history,
            "seconds": round(seconds, 2),
            "phase_seconds": self.phase_seconds(),
            **self.report_extras(),
            "files": files,
        }
        files["report"] = str(artifacts.save_json(f"{out_dir}/{self.report_name}", report))
        return files
