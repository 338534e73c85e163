"""Orchestration of the coefficient-distillation methods (StatsMerging, SAMerging).

A method supplies a *coefficient module*: an ``nn.Module`` whose ``forward()`` returns the (K, L)
merging coefficients and whose parameters are the only thing optimised (the StatsMergeLearner for
StatsMerging, free coefficients for SAMerging). A model family (CLIP here, see :mod:`.clip`; Flan-T5 or
per-task-head classifiers elsewhere) fills the hooks that become the trainer's
:class:`~..engine.trainer.Family` strategy: task heads, fit inputs, teacher targets, merged outputs.
:class:`CoefficientDistillation` puts the parts together: it checks the pool and the settings
(:class:`~..engine.settings.TrainingSettings`) before any long work, prepares the fit data
(:mod:`..engine.fit_data`), builds the engine, lets the method settle its start, hands the loop to a
:class:`~..engine.trainer.Trainer` and writes the artefacts and the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from fusion_bench import BaseAlgorithm, auto_register_config
from fusion_bench.mixins import SimpleProfilerMixin

from ..engine import distributed
from ..engine.checkpoint import CHECKPOINT_NAME, Checkpointer, StopFlag, resolve_resume
from ..engine.distillation import agreement
from ..engine.engines import build_engine
from ..engine.fit_data import FitData, prepare_fit_data
from ..engine.fused import enable_activation_checkpointing
from ..engine.merge import check_same_architecture, trainable_names
from ..engine.holdout import selection_datasets
from ..engine.progress import RunProgress
from ..engine.schedule import resolve_schedule
from ..engine.settings import TrainingSettings
from ..engine.trainer import Family, Trainer, TrainResult
from ..utils import artifacts
from ..utils.errors import PoolError
from ..utils.inputs import Inputs, take, target_logits
from ..utils.preflight import check_loaded_model, check_model_files, check_writable
from ..utils.settings import check_setting_types
from ..utils.splits import load_split
from .hints import check_hub_files, family_mismatch, taskpool_hint

log = logging.getLogger(__name__)


@auto_register_config
class CoefficientDistillation(SimpleProfilerMixin, BaseAlgorithm):
    """Base class: a method implements :meth:`build_coefficient_module`; a model family the hooks
    ``setup_task_heads``, ``fit_inputs``, ``teacher_targets`` and ``merged_outputs`` (or ``merged_logits``)."""

    method_label = "coefficient distillation"
    report_name = "statsmerging_report.json"  # each method names its own report file
    pool_family: Optional[str] = None  # the model pools a family merges (method/hints.pool_family)
    _progress: Optional[RunProgress] = None  # the run's steps over all its phases, set once the schedule is known

    def __new__(cls, *args, **kwargs):
        # every setting's type, before any subclass's checks read one ('abc' for a number names its key)
        check_setting_types(cls, kwargs)
        return super().__new__(cls)

    def __init__(
        self, protocol: str = "train_unlabeled", loss: str = "hard", temperature: float = 1.0,
        feature_weight: float = 0.0, data_fraction: float = 0.01, min_samples_per_task: Optional[int] = None,
        max_samples_per_task: Optional[int] = None, batch_size: int = 16, max_steps: Optional[int] = 500,
        max_epochs: Optional[float] = None, lr: float = 1e-3, weight_decay: float = 0.0,
        lr_step_size: Optional[int] = 100, lr_step_epochs: Optional[float] = None, lr_gamma: float = 0.1,
        select_by: str = "last", select_every: int = 100, select_samples: int = 256, optimizer: str = "adam",
        sam_rho: float = 0.05, sam_adaptive: bool = False, sam_space: str = "parameters",
        merge_engine: str = "fused", task_vector_dtype: Optional[str] = None, autocast: Optional[str] = None,
        activation_checkpointing: float = 0.0, per_task_backward: bool = False, tie_weights: bool = True,
        strict: bool = False, seed: int = 0, log_every: int = 10, artifact_dir: Optional[str] = None,
        save_merged_model: bool = False, checkpoint_every: int = 100, resume: Union[bool, str, None] = False,
        fit_data_on_device: Union[bool, str] = "auto", profile_steps: int = 0, **kwargs,
    ):
        # every key a typo could break is checked now, before any model is loaded, in one place
        self._protocol = TrainingSettings.of(locals()).data_protocol
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ method hooks
    def build_coefficient_module(self, engine: nn.Module, model_names: List[str]) -> nn.Module:
        raise NotImplementedError

    def choose_start(self, engine: nn.Module, model_names: List[str], fit: FitData, out_dir: str,
                     resume_from: Optional[Path]) -> None:
        """Before the coefficient module is built: a method may settle where it starts (StatsMerging's
        ``starts``); by default there is nothing to choose."""

    def planned_steps(self) -> Dict[str, int]:
        """The optimisation steps of each phase of the run, said before the first (a method adds its own
        phases, e.g. StatsMerging's start probes)."""
        return {"training": self._schedule.max_steps}

    def extra_artifacts(self, coefficient_module: nn.Module, out_dir: str) -> Dict[str, str]:
        """Method-specific files (e.g. the trained learner); returns name -> path."""
        return {}

    def checkpoint_settings(self) -> Dict[str, object]:
        """The settings a checkpoint's fingerprint keeps: the configured ones (a method adds what it chose)."""
        return {k: getattr(self, k) for k in self._config_mapping.values() if hasattr(self, k)}

    # ------------------------------------------------------------------ model-family hooks
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

    # ------------------------------------------------------------------ the parts
    def settings(self) -> TrainingSettings:
        """The shared settings as they stand now (a subclass may have set some of them itself)."""
        return TrainingSettings.of({k: getattr(self, k) for k in TrainingSettings.keys() if hasattr(self, k)})

    def family(self) -> Family:
        return Family(self.fit_inputs, self.teacher_targets, self.teacher_features, self.merged_outputs)

    def trainer(self, checkpoints: Optional[Checkpointer] = None, stop: Optional[StopFlag] = None) -> Trainer:
        """A Trainer of this method's settings and family (without checkpoints: a trial run, e.g. a probe)."""
        return Trainer(self.settings(), self.family(), self.fabric, getattr(self, "_schedule", None),
                       f"{self.method_label} ({self._protocol.name})", checkpoints, stop, self.out_dir(),
                       self._progress)

    # ------------------------------------------------------------------ checks and data
    def check_pool(self, modelpool) -> Dict[str, object]:
        """Everything that can be wrong with the pool, found before loading any model.

        Returns the fitting dataset of each task (already loaded, reused later).
        """
        # a view (Seq2SeqPoolView, the data-free reuse pool) keeps the pool it shows in `_pool`
        mismatch = family_mismatch(self.method_label, self.pool_family, type(getattr(modelpool, "_pool", modelpool)))
        if mismatch:
            raise PoolError(mismatch)
        names = list(modelpool.model_names)
        if not modelpool.has_pretrained:
            raise PoolError("The model pool has no `_pretrained_` model. Task vectors are fine-tuned minus "
                            "pretrained weights, so add `_pretrained_: <CLIP model>` under `models:`.")
        if len(names) < 2:
            raise PoolError(f"The model pool has {len(names)} expert(s) ({names}); merging needs at least two. "
                            "To evaluate a single model, use the host's `method=dummy`.")
        datasets = self.load_split(modelpool, self._protocol.split, names, f"Protocol '{self._protocol.name}' fits")
        if self.select_by == "validation_agreement":  # a task without a validation split: a held-out train slice
            self._selection_datasets, self._held_out = selection_datasets(
                modelpool, names, datasets, self._protocol.split, int(self.select_samples), int(self.batch_size),
                self.seed)
        return datasets

    def load_split(self, modelpool, split: str, names: List[str], purpose: str) -> Dict[str, object]:
        return load_split(modelpool, split, names, purpose, int(self.batch_size))

    def prepare_fit_data(self, datasets: Dict[str, object], experts: Dict[str, nn.Module]) -> FitData:
        """Each task's unlabeled fit inputs and the teachers' targets (and the selection images)."""
        return prepare_fit_data(self.family(), self.settings(), datasets, experts, self.fabric.device,
                                getattr(self, "_selection_datasets", None), self._protocol.split,
                                self._protocol.ground_truth, getattr(self, "_held_out", {}))

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
        check_model_files(modelpool, ["_pretrained_", *names])
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
            fit = self.prepare_fit_data(datasets, experts)
            self._schedule = resolve_schedule(fit.rows(), self.batch_size, self.max_steps, self.max_epochs,
                                              self.lr_step_size, self.lr_step_epochs)
            log.info("%s: schedule %s", self.method_label, self._schedule.as_dict())
            self._progress = RunProgress(self.method_label, self.planned_steps())
            if distributed.is_rank_zero(self.fabric):
                log.info(self._progress.plan())
            fit.place(self.fit_data_on_device, self.fabric, self.method_label)
        with self.profile("task vectors"):
            dtype = getattr(torch, self.task_vector_dtype) if self.task_vector_dtype else None
            engine = build_engine(self.merge_engine, pretrained, [experts[n] for n in names],
                                  tie_weights=self.tie_weights, strict=self.strict, task_vector_dtype=dtype)
            del experts
            engine = self.fabric.to_device(engine)
            if self.activation_checkpointing:
                enable_activation_checkpointing(engine, float(self.activation_checkpointing))
        self.choose_start(engine, names, fit, out_dir, resume_from)
        with self.profile("coefficient module"):
            coefficient_module = self.fabric.to_device(self.build_coefficient_module(engine, names))

        # An interrupted run is not a lost run: checkpoints every `checkpoint_every` steps and on
        # SIGINT/SIGTERM, from which `method.resume` continues to the uninterrupted result.
        checkpoints = self.make_checkpointer(out_dir, resume_from, fit)
        with self.profile("training"), StopFlag() as stop:
            self._result = self.trainer(checkpoints, stop).train(engine, coefficient_module, fit)

        with torch.no_grad():
            coefficients = coefficient_module().detach().float().cpu()
            fit_agreement = self.fit_agreement(engine, coefficients, fit)
        merged = engine.merge_and_unload(coefficients.to(self.fabric.device))
        shards = fit.shards(self.fabric) if distributed.world_size(self.fabric) > 1 else None  # a collective
        if distributed.is_rank_zero(self.fabric):  # the ranks hold the same coefficients: one writes them
            files = self.write_artifacts(out_dir, coefficients, engine.param_names, names, coefficient_module,
                                         self._result, fit, fit_agreement, time.time() - start, shards)
            if self.save_merged_model:
                files["merged_model"] = str(artifacts.save_model_dir(merged, f"{out_dir}/merged_model"))
            checkpoints.remove()
        self.print_profile_summary()
        return merged

    def make_checkpointer(self, out_dir: str, resume_from, fit: FitData) -> Checkpointer:
        """Rank 0 saves; every rank resumes from the same file (other ranks get no path to write)."""
        path = Path(out_dir) / CHECKPOINT_NAME if distributed.is_rank_zero(self.fabric) else None
        if resume_from is None and path is not None and path.is_file():
            log.warning("%s holds the checkpoint of an interrupted run; this run starts afresh and replaces it "
                        "(method.resume=true continues it instead).", path)
        return Checkpointer(path, self.checkpoint_every, self.checkpoint_settings(), fit.indices, resume_from)

    @torch.no_grad()
    def fit_agreement(self, engine, coefficients, fit: FitData) -> Dict[str, float]:
        """How often the merged model agrees with the fitting targets (a training-data check only)."""
        engine.set_coefficients(coefficients.to(self.fabric.device))
        result = {}
        for task, inputs in fit.inputs.items():
            logits = self.merged_logits(engine, {task: take(inputs, slice(0, 256))})[task].float().cpu()
            result[task] = agreement(logits, target_logits(fit.targets[task])[:256].cpu())
        return result

    # ------------------------------------------------------------------ report
    def report_extras(self) -> Dict[str, object]:
        """Optional entries of the JSON report: where the loop's time went, the profile when asked for one;
        a subclass adds its own (e.g. how its start was chosen)."""
        result: Optional[TrainResult] = getattr(self, "_result", None)
        return {**({"planned_steps": self._progress.phases} if self._progress else {}),
                **({"loop": result.loop} if result is not None and result.loop else {}),
                **({"profile": result.profile} if result is not None and result.profile else {})}

    def phase_seconds(self) -> Dict[str, float]:
        """Wall time of each profiled phase so far (the report keeps them for benchmarks)."""
        durations = getattr(self.profiler, "recorded_durations", {})
        return {name: round(sum(values), 3) for name, values in durations.items()}

    def write_artifacts(self, out_dir, coefficients, param_names, names, coefficient_module, result: TrainResult,
                        fit: FitData, fit_agreement, seconds, shards=None) -> Dict[str, str]:
        files = {
            "coefficients_pt": str(artifacts.save_torch(f"{out_dir}/coefficients.pt", coefficients)),
            "coefficients_csv": str(artifacts.save_text(
                f"{out_dir}/coefficients.csv", artifacts.coefficients_csv(coefficients, names, param_names))),
            "heatmap": str(artifacts.save_heatmap(f"{out_dir}/coefficients_heatmap.png", coefficients, names,
                                                  title=f"{self.method_label} coefficients")),
        }
        files.update(self.extra_artifacts(coefficient_module, out_dir))
        protocol, history = self._protocol, result.history
        report = {
            "method": self.method_label,
            "protocol": {"name": protocol.name, "description": protocol.description, "split": protocol.split,
                         "uses_ground_truth_labels": protocol.ground_truth},
            "config": {k: getattr(self, k) for k in self._config_mapping.values() if hasattr(self, k)},
            "models": names,
            "num_layers": len(param_names),
            "fit_data": fit.info,
            **({"distributed": shards} if shards else {}),
            "schedule": self._schedule.as_dict(),
            "selection": result.selection or {"select_by": "last"},
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
