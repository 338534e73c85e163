"""StatsMerging's coefficient module, independent of the model family.

Statistics of each task vector (per layer, or of the whole vector) are normalised and fed
to the StatsMergeLearner; its outputs are the merging coefficients. The
:class:`StatsMergingCoefficients` mixin adds StatsMerging's options and artefacts to any
model family's trainer (``CLIPCoefficientDistillation`` for CLIP, others alike).

Learner reuse (experimental): with ``learner_path`` the learner of an earlier run is loaded
instead of a fresh one (see :mod:`fusion_bench_statsmerging.engine.reuse`); with ``max_steps: 0``
it only predicts coefficients for the new pool and no image is read, with ``max_steps > 0``
it is fine-tuned from there as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ...engine import distributed
from ...engine.checkpoint import ResumeError, fingerprint
from ...engine.distillation import Protocol, get_protocol
from ...engine.learner import StatsMergeLearner, relative_depth
from ...engine.reuse import (
    LEARNER_OPTIONS, NORMALIZERS, SavedLearner, depth_mapping, learner_payload, load_learner, normalizer_for,
    resolve_options,
)
from ...engine.interference import NEEDS_PRETRAINED
from ...engine.stats import (
    DEFAULT_FEATURES, FeatureNormalizer, layer_wise_statistics, num_features, task_wise_statistics, validate_features,
)
from ...engine.selection import SELECTION_IMAGES
from ...utils import artifacts
from ...utils.errors import PoolError, UserError

log = logging.getLogger(__name__)

MODES = ("layer_wise", "task_wise")
# ``init_coefficient: auto`` tries task arithmetic at these fractions of ``max_coefficient``
START_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# ``starts``: what a start may set, and where the probes' outcome is kept (a resumed run reuses it)
START_KEYS = ("output", "init_coefficient")
PROBE_FILE = "start_probe.json"
NO_DATA_PROTOCOL = Protocol("reused_learner_no_data", "none", False,
                            "no data: a saved learner predicts the coefficients from the pool's weights "
                            "(learner_path with max_steps 0); no image of any split is read")


class LearnerCoefficients(nn.Module):
    """Coefficients as a function of fixed statistics: gradients reach only the learner.

    With ``residual`` a free correction per coefficient (zero at the start) is added to the
    learner's prediction: the statistics give the prior, the distillation may then move any single
    coefficient where the shared MLP cannot reach it.
    """

    def __init__(self, learner: StatsMergeLearner, features: Tensor, num_layers: int, mode: str,
                 residual: bool = False):
        super().__init__()
        self.learner = learner
        self.mode = mode
        self.num_layers = num_layers
        self.register_buffer("features", features)
        self.register_buffer("depth", relative_depth(num_layers) if mode == "layer_wise" else torch.zeros(features.shape[0]))
        self.residual = nn.Parameter(torch.zeros(features.shape[:-1])) if residual else None

    def forward(self) -> Tensor:
        coef = self.learner(self.features, self.depth)
        if self.residual is not None:
            coef = coef + self.residual
        if self.mode == "task_wise":
            coef = coef[:, None].expand(-1, self.num_layers)
        return coef


def engine_pretrained(engine: nn.Module, features: Sequence[str]) -> Optional[Dict[str, Tensor]]:
    """The engine's pretrained tensors when a feature needs them (``relative_norm``), else None.
    An engine that does not keep them cannot compute such a feature: refused with what to change."""
    if not any(f in NEEDS_PRETRAINED for f in features):
        return None
    pretrained = getattr(engine, "pretrained_tensors", None)
    if pretrained is None:
        raise UserError(f"The features {[f for f in features if f in NEEDS_PRETRAINED]} need the pretrained "
                        f"weights, and the merging engine {type(engine).__name__} does not keep them "
                        "(no pretrained_tensors()); use merge_engine fused or host, or leave these features out.")
    return pretrained()


def pool_statistics(engine: nn.Module, mode: str, features: Sequence[str], rank: int) -> Tensor:
    """Raw statistics of the engine's task vectors: (K, L, F) layer-wise or (K, F) task-wise."""
    pretrained = engine_pretrained(engine, features)
    task_vectors = [engine.task_vector(k) for k in range(engine.num_models)]
    if mode == "task_wise":
        return task_wise_statistics(task_vectors, features, rank, pretrained)
    batched = getattr(engine, "layer_wise_statistics", None)
    if batched is not None:
        return batched(features, rank)
    return layer_wise_statistics(task_vectors, features, rank, pretrained)


@contextlib.contextmanager
def settings_errors() -> Iterator[None]:
    """A library check's ValueError about the configured settings, raised as a :class:`UserError` (the
    message then ends a failed CLI run's output)."""
    try:
        yield
    except UserError:
        raise
    except ValueError as err:
        raise UserError(str(err)) from err


def check_auto_start(output: str, learner_path: Optional[str]) -> None:
    """``init_coefficient: auto`` searches the start of a fresh sigmoid or unbounded learner only."""
    if learner_path:
        raise UserError("init_coefficient: auto searches the start of a fresh learner; with learner_path the "
                         "saved learner is the start: leave init_coefficient unset (null).")
    if output == "softmax":
        raise UserError("init_coefficient: auto needs output sigmoid or unbounded (softmax starts uniform "
                         "over the experts and has no start to search).")


def check_learner_settings(configured: Mapping[str, object], output: str, init: float) -> None:
    """A throwaway learner built with these settings: its own checks (output, start, bound) run now,
    before any model is loaded, and fail as a :class:`UserError`."""
    with settings_errors():
        StatsMergeLearner(1, configured["hidden_dim"], configured["learner_layers"], output, init,
                          configured["max_coefficient"])


def check_starts(starts: Optional[Sequence[Mapping]], configured: Mapping[str, object], select_by: str,
                 learner_path: Optional[str]) -> List[Dict[str, object]]:
    """``starts`` as plain dicts with both keys (a key a start leaves out takes the method's value),
    or one message naming what to change. The probes compare starts by the experts' agreement on
    unlabeled validation images, so they need that selection; a saved learner is its own start."""
    if not starts:
        return []
    if learner_path:
        raise UserError("starts probes fresh learners; with learner_path the saved learner is the start: "
                        "set method.starts=null.")
    if configured["init_coefficient"] == "auto":
        raise UserError("init_coefficient: auto searches one start, and starts probes the starts it lists: "
                        "choose one (method.starts=null for the search).")
    if select_by != "validation_agreement":
        raise UserError("starts are compared by the experts' agreement on unlabeled validation images: "
                        f"set select_by: validation_agreement (it is '{select_by}').")
    if isinstance(starts, Mapping) or len(starts) < 2:
        raise UserError("starts lists two or more starts to probe, e.g. [{output: sigmoid, init_coefficient: "
                        "0.3}, {output: unbounded, init_coefficient: 0.0}]; or leave it null.")
    result = []
    for i, start in enumerate(starts):
        if not isinstance(start, Mapping):
            raise UserError(f"starts[{i}] must be a mapping with keys {list(START_KEYS)}, got {start!r}.")
        unknown = sorted(set(start) - set(START_KEYS))
        if unknown:
            raise UserError(f"starts[{i}] sets {unknown}; a start may set only {list(START_KEYS)}.")
        one = {k: start.get(k, configured[k]) for k in START_KEYS}
        if isinstance(one["init_coefficient"], str) or one["init_coefficient"] is None:
            raise UserError(f"starts[{i}]: init_coefficient must be a number, got {one['init_coefficient']!r}.")
        one["init_coefficient"] = float(one["init_coefficient"])
        check_learner_settings(configured, one["output"], one["init_coefficient"])
        result.append(one)
    return result


def check_frozen_learner(frozen: bool, residual: bool, learner_path: Optional[str],
                         max_steps: Optional[int]) -> None:
    """``learner_frozen`` keeps the learner at its start (a constant ``init_coefficient``): the free
    residual is then all that trains, which is free coefficients (SAMerging's parameterisation) under
    the very same recipe, probes and selection: the ablation that measures what the learner adds.
    Without a residual only ``max_steps: 0`` makes sense (task arithmetic at the start, e.g. with
    ``init_coefficient: auto`` choosing its scale label-free)."""
    if not frozen:
        return
    if learner_path:
        raise UserError("learner_frozen keeps a fresh learner at its start; with learner_path the saved learner "
                        "predicts the coefficients: set method.learner_frozen=false.")
    if not residual and (max_steps is None or int(max_steps) != 0):
        raise UserError("learner_frozen with residual: false leaves nothing to train: set method.residual=true "
                        f"(free coefficients) or method.max_steps=0 (task arithmetic at the start); max_steps is "
                        f"{max_steps}.")


def freeze_at_start(learner: StatsMergeLearner) -> StatsMergeLearner:
    """The learner as a constant: its output layer's weights zeroed (every coefficient exactly the
    start, whatever the statistics) and no parameter left trainable."""
    with torch.no_grad():
        learner.head.weight.zero_()
    for p in learner.parameters():
        p.requires_grad_(False)
    return learner


def checkpoint_start(resume_from: Path, starts: List[Dict[str, object]]) -> int:
    """Which of ``starts`` the checkpoint's training began from (its settings name it): a resumed run
    goes on with that start, whatever probes ran since."""
    config = torch.load(resume_from, map_location="cpu", weights_only=False).get("config", {})
    for i, start in enumerate(starts):  # compared as the checkpoint keeps its settings
        if all(config.get(k) == v for k, v in fingerprint(start).items()):
            return i
    raise ResumeError(f"cannot resume from '{resume_from}': its training began from output "
                      f"{config.get('output')}, init_coefficient {config.get('init_coefficient')}, which is not one "
                      "of the starts set now. Resume with the interrupted run's starts, or start afresh.")


def read_probe(resume_from: Optional[Path], starts: List[Dict[str, object]], steps: int) -> Optional[dict]:
    """For a resumed run: the probes' outcome saved beside its checkpoint when they probed the same
    starts for as many steps and chose the checkpoint's start; else that start, without the scores.
    None for a fresh run."""
    if resume_from is None:
        return None
    chosen = checkpoint_start(resume_from, starts)
    path = Path(resume_from).parent / PROBE_FILE
    if path.is_file():
        probe = json.loads(path.read_text())
        if probe.get("starts") == starts and probe.get("steps") == steps and probe.get("chosen") == chosen:
            return {**probe, "reused_from": str(path)}
    return {"steps": steps, "starts": starts, "chosen": chosen, "results": [],
            "reused_from": f"{resume_from} (the start its training began from; the probes' scores were not found)"}


class _Unreadable:
    """A fitting set of a data-free reuse run: it has a size, and any read is a bug."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        raise RuntimeError("a reused learner with max_steps 0 must not read fitting data")


class _DataFreePool:
    """The model pool as a data-free reuse run's checks see it: the same models, and for every
    task a fitting set of each split that cannot be read."""

    def __init__(self, pool, size: int):
        self._pool, self._size = pool, size

    def __getattr__(self, name):
        return getattr(self._pool, name)

    @property
    def train_dataset_names(self) -> List[str]:
        return list(self._pool.model_names)

    val_dataset_names = test_dataset_names = train_dataset_names

    def load_train_dataset(self, name: str) -> _Unreadable:
        return _Unreadable(self._size)

    load_val_dataset = load_test_dataset = load_train_dataset


class StatsMergingCoefficients:
    """Mixin: StatsMerging's options, learner and artefacts, placed before a family trainer in the
    bases (e.g. ``class X(StatsMergingCoefficients, CLIPCoefficientDistillation)``).

    ``learner_path`` (experimental) loads a saved learner instead of a fresh one; its
    structure options (``mode``, ``features``, ``rank``, ``hidden_dim``, ...) then come from
    the file, and any of them set here must agree with it. ``normalizer`` chooses the
    statistics transform for the new pool: ``saved`` (the one it was trained with, default)
    or ``refit`` (fitted on the new pool).
    """

    method_label = "StatsMerging"

    def __init__(
        self,
        mode: Optional[str] = "layer_wise",
        features: Optional[Sequence[str]] = DEFAULT_FEATURES,
        rank: Optional[int] = 3,
        hidden_dim: Optional[int] = 128,
        learner_layers: Optional[int] = 2,
        output: Optional[str] = "sigmoid",
        init_coefficient: Optional[Union[float, str]] = 0.3,
        max_coefficient: Optional[float] = 1.0,
        use_depth: Optional[bool] = True,
        name: Optional[str] = None,
        learner_path: Optional[str] = None,
        normalizer: str = "saved",
        residual: bool = False,
        starts: Optional[Sequence[Mapping]] = None,
        start_probe_steps: int = 300,
        learner_frozen: bool = False,
        **kwargs,
    ):
        if normalizer not in NORMALIZERS:
            raise UserError(f"normalizer must be one of {list(NORMALIZERS)}, got '{normalizer}'.")
        configured = dict(mode=mode, features=features, rank=rank, hidden_dim=hidden_dim,
                          learner_layers=learner_layers, output=output, init_coefficient=init_coefficient,
                          max_coefficient=max_coefficient, use_depth=use_depth)
        self._saved_learner: Optional[SavedLearner] = None
        if learner_path:
            self._saved_learner = load_learner(learner_path)
            configured = resolve_options(self._saved_learner, configured)
        else:
            unset = [k for k in LEARNER_OPTIONS if configured[k] is None]
            if unset:
                raise UserError(f"{unset} may be null only with learner_path (they are then read from the "
                                 "saved learner); set them, or give learner_path.")
        if configured["mode"] not in MODES:
            raise UserError(f"Unknown mode '{configured['mode']}'; choose one of {list(MODES)}.")
        with settings_errors():
            validate_features(configured["features"])
        if int(configured["rank"]) < 1:
            raise UserError(f"rank must be >= 1, got {configured['rank']}.")
        init = configured["init_coefficient"]
        if init == "auto":
            check_auto_start(configured["output"], learner_path)
            init = START_FRACTIONS[len(START_FRACTIONS) // 2] * float(configured["max_coefficient"])
        elif isinstance(init, str):
            raise UserError(f"init_coefficient must be a number or 'auto', got '{init}'.")
        check_learner_settings(configured, configured["output"], init)
        checked_starts = check_starts(starts, configured, kwargs.get("select_by", "last"), learner_path)
        if not isinstance(start_probe_steps, int) or start_probe_steps < 1:
            raise UserError(f"start_probe_steps must be an integer >= 1, got {start_probe_steps!r}.")
        check_frozen_learner(bool(learner_frozen), bool(residual), learner_path, kwargs.get("max_steps"))
        super().__init__(**kwargs)
        self.learner_frozen = bool(learner_frozen)
        self.starts, self.start_probe_steps = checked_starts, int(start_probe_steps)
        for key, value in configured.items():  # the values in force (from the file when reused)
            setattr(self, key, value)
        if self.reuses_without_training:
            self._protocol = NO_DATA_PROTOCOL
        self.residual = bool(residual)
        if name:
            self.method_label = name

    # ------------------------------------------------------------------ reuse without data
    @property
    def reuses_without_training(self) -> bool:
        """A loaded learner with ``max_steps: 0``: coefficients come from weights alone."""
        if self._saved_learner is None:
            return False
        if self.max_steps is not None:
            return int(self.max_steps) == 0
        return float(self.max_epochs or 0) == 0

    def check_pool(self, modelpool):
        """Data-free reuse runs the family's pool checks (and set-up, e.g. label words) on a view
        of the pool whose fitting sets have a size but refuse any read, and returns no data."""
        if not self.reuses_without_training:
            return super().check_pool(modelpool)
        if getattr(self, "batchnorm", None) == "reestimate":
            raise PoolError("batchnorm: reestimate needs images, and a reused learner with max_steps 0 reads "
                            "none; choose batchnorm: merge or pretrained.")
        protocol, self._protocol = self._protocol, get_protocol("train_unlabeled")  # the checks expect a split
        try:
            super().check_pool(_DataFreePool(modelpool, max(int(self.batch_size), 1)))
        finally:
            self._protocol = protocol
        log.info("%s: reusing the learner in %s without training; no data of any split is read.",
                 self.method_label, self._saved_learner.path)
        return {}

    def prepare_fit_data(self, datasets, experts):
        if self.reuses_without_training:
            datasets = {}
        return super().prepare_fit_data(datasets, experts)

    # ------------------------------------------------------------------ learner
    def build_coefficient_module(self, engine: nn.Module, model_names: List[str]) -> nn.Module:
        feats = list(self.features)
        raw = pool_statistics(engine, self.mode, feats, self.rank)
        saved = self._saved_learner
        if saved is not None:
            self._normalizer = normalizer_for(saved, raw, self.normalizer)
            learner = saved.build()
            log.info("StatsMergeLearner loaded from %s (format %d, trained on %d experts x %s tensors); "
                     "normaliser: %s", saved.path, saved.format_version, len(saved.pool.get("model_names", [])),
                     len(saved.pool.get("param_names", [])) or "?", self.normalizer)
        else:
            self._normalizer = FeatureNormalizer.fit(raw)
            start = self.start_in_force()
            learner = StatsMergeLearner(
                num_features(feats, self.rank), self.hidden_dim, self.learner_layers, start["output"],
                start["init_coefficient"], self.max_coefficient,
                use_depth=self.use_depth and self.mode == "layer_wise",
            )
            if self.learner_frozen:
                learner = freeze_at_start(learner)
        log.info("StatsMergeLearner: %d parameters; statistics %s", sum(p.numel() for p in learner.parameters()),
                 tuple(raw.shape))
        self._raw_statistics = raw.cpu()
        self._pool_info = {"model_names": list(model_names), "param_names": list(engine.param_names)}
        return LearnerCoefficients(learner, self._normalizer(raw).float(), len(engine.param_names), self.mode,
                                   residual=self.residual)

    def search_start(self, engine: nn.Module, data: tuple, source: str) -> float:
        """``init_coefficient: auto``: the learner starts where task arithmetic agrees best with the
        experts on unlabeled images (label-free; the images ``select_by`` scores, else the first fit
        images). The best uniform scale depends on the pool (e.g. on how many experts share it), so a
        start fixed on one family of suites need not suit another."""
        shape = (engine.num_models, len(engine.param_names))
        scores, trainer = {}, self.trainer()
        for fraction in START_FRACTIONS:
            value = round(fraction * float(self.max_coefficient), 6)
            fixed = torch.full(shape, value, device=self.fabric.device)
            scores[value] = trainer.selection_score(engine, lambda: fixed, data)
        best = max(scores, key=scores.get)  # ties: the smaller start
        self._start_search = {"images": source, "agreement": scores, "chosen": best}
        log.info("%s: start at %.2f (task arithmetic's agreement with the experts: %s)", self.method_label,
                 best, {k: round(v, 4) for k, v in scores.items()})
        return best

    # ------------------------------------------------------------------ starts
    def start_in_force(self) -> Dict[str, object]:
        """``output`` and ``init_coefficient`` of the learner built next: the start the probes chose (or the
        one a probe is trying), else the searched start of ``init_coefficient: auto``, else the configured one.
        The configured settings themselves are never overwritten: the report shows both."""
        start = getattr(self, "_start", None)
        if start is not None:
            return dict(start)
        init = getattr(self, "_searched_start", None) if self.init_coefficient == "auto" else self.init_coefficient
        return {"output": self.output, "init_coefficient": init}

    def checkpoint_settings(self) -> Dict[str, object]:
        """A checkpoint names the start its training began from (a resumed run goes on with it)."""
        return {**super().checkpoint_settings(), **(getattr(self, "_start", None) or {})}

    def choose_start(self, engine, model_names, fit, out_dir, resume_from) -> None:
        """Settle the learner's start before it is built.

        ``init_coefficient: auto``: task arithmetic's scales scored on unlabeled images (:meth:`search_start`).

        ``starts``: train a fresh learner from each start for ``start_probe_steps`` steps (a short run of the
        same Trainer) and go on with the start whose kept state the experts agree with most on the unlabeled
        validation images. Why: which start trains best differs between pools (on our text suite the start
        at 0, on the CNN suites task arithmetic at 0.3) and is not told by how well the start itself merges
        (what ``auto`` measures); a short trial of each, scored label-free, tells it. The run then trains the
        winner afresh, exactly as a run configured with that start alone would."""
        if self.init_coefficient == "auto":  # (refused with learner_path and with starts)
            with self.profile("start search"):
                self._searched_start = self.search_start(engine, *fit.scoring_images())
            return
        if not self.starts:
            return
        steps = min(self.start_probe_steps, self._schedule.max_steps)  # a probe is never longer than the run
        probe = read_probe(resume_from, self.starts, steps)
        if probe is None:
            with self.profile("start probe"):
                probe = self.probe_starts(engine, model_names, fit, steps)
        if distributed.is_rank_zero(self.fabric):  # also when reused: the run's folder says how it started
            artifacts.save_json(f"{out_dir}/{PROBE_FILE}", probe)
        self._start = dict(self.starts[probe["chosen"]])
        self._start_probe = probe
        log.info("%s: going on from start %s (configured: output %s, init_coefficient %s; agreement with the "
                 "experts after the probes: %s)", self.method_label, self._start, self.output,
                 self.init_coefficient, [round(r["best_agreement"], 4) for r in probe["results"]])

    def planned_steps(self) -> Dict[str, int]:
        """The start probes run before the training (a resumed run that finds their scores skips them)."""
        probes = len(self.starts) * min(self.start_probe_steps, self._schedule.max_steps) if self.starts else 0
        return {**({"start probes": probes} if probes else {}), **super().planned_steps()}

    def probe_starts(self, engine, model_names, fit, steps: int) -> Dict[str, object]:
        """Each start trained for ``steps`` steps from the same random state (the learner's
        initialisation), batches and schedule; scored as ``select_by: validation_agreement`` scores
        (the best state within the probe). Ties: the start listed first."""
        if fit.selection is None:
            raise UserError("starts needs the unlabeled validation images of select_by: validation_agreement, "
                            "and none were loaded.")
        devices = [self.fabric.device] if self.fabric.device.type == "cuda" else []
        results = []
        for i, start in enumerate(self.starts):
            self._start = dict(start)
            with torch.random.fork_rng(devices=devices):  # every start sees the run's random state
                module = self.fabric.to_device(self.build_coefficient_module(engine, model_names))
                # a probe is a short run of the same loop, not checkpointed
                selection = self.trainer().train(engine, module, fit, steps=steps,
                                                 log_prefix=f"start_probe/{i}/").selection
            results.append({**start, "best_agreement": selection["best_agreement"],
                            "best_step": selection["best_step"],
                            "agreement_by_step": selection["agreement_by_step"]})
        self._start = None
        chosen = max(range(len(results)), key=lambda i: (results[i]["best_agreement"], -i))
        # every rank goes on with rank 0's choice (a near tie could split ranks whose scores differ in the last bit)
        chosen = int(self.fabric.broadcast(chosen, src=0)) if distributed.world_size(self.fabric) > 1 else chosen
        return {"steps": steps, "starts": self.starts, "results": results, "chosen": chosen,
                "images": SELECTION_IMAGES}

    def report_extras(self) -> Dict[str, object]:
        search = getattr(self, "_start_search", None)
        probe = getattr(self, "_start_probe", None)
        start = {} if self._saved_learner else {"start": {
            "configured": {"output": self.output, "init_coefficient": self.init_coefficient},
            "chosen": self.start_in_force()}}
        return {**super().report_extras(), **start, **({"start_search": search} if search else {}),
                **({"start_probe": probe} if probe else {})}

    def write_artifacts(self, out_dir, coefficients, param_names, names, *args, **kwargs):
        if self.mode == "task_wise":
            coefficients = coefficients[:, 0]
        return super().write_artifacts(out_dir, coefficients, param_names, names, *args, **kwargs)

    def extra_artifacts(self, coefficient_module: LearnerCoefficients, out_dir: str) -> Dict[str, str]:
        saved = self._saved_learner
        options = {**{k: getattr(self, k) for k in LEARNER_OPTIONS}, **self.start_in_force()}  # the start used
        provenance = {"method": self.method_label, "protocol": self._protocol.name, "max_steps": self._schedule.max_steps if hasattr(self, "_schedule") else self.max_steps,
                      "loaded_from": saved.path if saved else None,
                      "normalizer": ("fitted on this pool" if saved is None or self.normalizer == "refit"
                                     else f"saved, from {saved.path}")}
        state = learner_payload(coefficient_module.learner, self._normalizer, self._raw_statistics, options,
                                self._pool_info, provenance)
        files = {"learner": str(artifacts.save_torch(f"{out_dir}/learner.pt", state))}
        if saved is not None:
            report = {**provenance, "trained_here": not self.reuses_without_training,
                      "images_read": not self.reuses_without_training,
                      "source_pool": saved.pool, "pool": self._pool_info, "options": options,
                      "relative_depth_mapping": depth_mapping(len(self._pool_info["param_names"]), saved)
                      if self.mode == "layer_wise" else None}
            files["reuse_report"] = str(artifacts.save_json(f"{out_dir}/reuse_report.json", report))
        return files
