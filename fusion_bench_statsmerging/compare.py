"""Side-by-side comparison of merging methods through the real ``fusion_bench`` CLI.

Usage::

    statsmerging-compare --suite /path/to/suite --out results/            # clip_suite pools
    statsmerging-compare --suite /path/to/heads_suite --out results/      # per-task-head suite: heads rows
    python -m fusion_bench_statsmerging.compare --methods pretrained,task_arithmetic,statsmerging \\
        --modelpool clip-vit-base-patch32_TA8 --taskpool clip-vit-classification_TA8 --out results/

Each method runs in its own ``fusion_bench`` process (the host CLI, unchanged) so that wall
time and peak memory are per method and a crash only costs its own row. The child is started
through a launcher mode of this module (``--_child``) that calls the host CLI in-process and,
at exit, writes its peak RSS and peak CUDA memory to a JSON file.

Written under ``--out``: ``results.md`` / ``results.csv`` / ``results.json`` / ``results.png``
and ``runs/<key>/`` (the host's log dir: ``program_report.json``, Hydra config, stdout/stderr).

The data protocol column says what data a method consumed beyond the checkpoints. It is
taken from the host's code, not from the papers: the host's CLIP Fisher merging computes
the Fisher from the model's *own* predictive distribution on train images (``images, _ =
batch``) and RegMean only records layer inputs of train images, so both are label-free on
the train split; the host's AdaMerging minimises entropy on shuffled *test* images.

The data-driven methods run under both protocols so that the comparison is fair:
AdaMerging on test images (the host's default, ``adamerging_{task,layer}``) and on label-free
train images (``adamerging_{task,layer}_train``: the host's classes with only the data hook
changed, see ``method/adamerging_protocol.py``); StatsMerging on train images (its default)
and on test images (``statsmerging_*_tta``, ``method.protocol=test_time_adaptation``).

``--jobs N`` runs N methods at a time (threads that each wait on one child); the report
then says that wall times overlap. Peak memory is per child process either way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

# --------------------------------------------------------------------------- protocols
NO_DATA = "no data"
TRAIN_UNLABELED = "label-free train split"
TRAIN_UNLABELED_SELECTED = "label-free train split; unlabeled validation images choose the kept state"
VALIDATION_UNLABELED = "label-free validation split"
TEST_TIME = "test-time adaptation (unlabeled test images)"
USES_LABELS = "uses labels"
REFERENCE = "individual experts (reference)"
CUSTOM = "custom (not classified)"

PROTOCOL_NOTE = (
    "Data protocol: what a method read to fit its coefficients, besides the checkpoints. "
    f"'{TRAIN_UNLABELED}': train-split images, never labels; '{TEST_TIME}': the very test images "
    "it is scored on, never labels (AdaMerging's published protocol). Fitting reads labels only "
    f"where the protocol says '{USES_LABELS}', and test images only under test-time adaptation; "
    "every row is then scored on the labelled test split.")

# Values of our methods' ``protocol`` key -> the column text, so a row follows its override.
OUR_PROTOCOLS = {
    "train_unlabeled": TRAIN_UNLABELED,
    "validation_unlabeled": VALIDATION_UNLABELED,
    "test_time_adaptation": TEST_TIME,
    "train_ground_truth": USES_LABELS,
}


# --------------------------------------------------------------------------- registry
@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: how to run it and how to label its data use.

    ``overrides`` / ``fast_overrides`` may use the placeholders ``{run_dir}``,
    ``{cache_dir}``, ``{out}`` and ``{fast_steps}``. ``kind='experts'`` rows evaluate every
    expert and report each one on its own task (the diagonal).
    """

    key: str
    label: str
    overrides: Tuple[str, ...]
    protocol: str
    kind: str = "merged"
    fast_overrides: Tuple[str, ...] = ()
    protocol_key: Optional[str] = None  # e.g. "method.protocol": the row follows that value
    default_protocol_value: Optional[str] = None
    optional: bool = False  # in the default list only when its config file exists
    make_dirs: Tuple[str, ...] = ()  # created before the run (the host does not create them)
    not_applicable: Optional[str] = None  # why this family cannot run it: listed with the reason, not run


EXPERTS_TARGET = "fusion_bench_statsmerging.compare.ExpertsOnOwnTasks"
_ADAMERGING_FAST = ("method.max_steps={fast_steps}", "method.num_workers=0")
# The host's task-wise AdaMerging torch.save()s zero-shot heads into ``cache_dir`` without
# creating it, so the directory is made before the run. One per run: runs may overlap
# (--jobs) and torch.save is not atomic.
_ADAMERGING_CACHE = "{run_dir}/adamerging_cache"


def _adamerging(key: str, label: str, name: str, train_split: bool = False) -> MethodSpec:
    """The host's CLIP AdaMerging (test-time adaptation on test images) or our subclass that
    reads label-free train images instead (``method=adamerging_train``)."""
    if train_split:
        return MethodSpec(key, label, ("method=adamerging_train", f"method.name={name}",
                                       f"method.cache_dir={_ADAMERGING_CACHE}"),
                          TRAIN_UNLABELED, fast_overrides=_ADAMERGING_FAST, make_dirs=(_ADAMERGING_CACHE,),
                          protocol_key="method.protocol", default_protocol_value="train_unlabeled")
    return MethodSpec(key, label, ("method=adamerging/clip", f"method.name={name}",
                                   f"method.cache_dir={_ADAMERGING_CACHE}"),
                      TEST_TIME, fast_overrides=_ADAMERGING_FAST, make_dirs=(_ADAMERGING_CACHE,))


_OURS_FAST = ("method.max_steps={fast_steps}",)
_WUDI_FAST = ("method.iter_num={fast_steps}",)  # WUDI's Adam steps per matrix (400: minutes on a CPU)
_TTA = "method.protocol=test_time_adaptation"


def _ours_selected(key: str, label: str, config: str) -> MethodSpec:
    """Our configuration with label-free selection: it also reads unlabeled validation images."""
    return dataclasses.replace(_ours(key, label, config), protocol=TRAIN_UNLABELED_SELECTED, protocol_key=None)


def _ours(key: str, label: str, config: str, optional: bool = False, *extra: str) -> MethodSpec:
    return MethodSpec(key, label, (f"method={config}", *extra), TRAIN_UNLABELED, fast_overrides=_OURS_FAST,
                      protocol_key="method.protocol", default_protocol_value="train_unlabeled",
                      optional=optional)


REGISTRY: Dict[str, MethodSpec] = {s.key: s for s in [
    MethodSpec("pretrained", "Pretrained (zero-shot)", ("method=dummy",), NO_DATA),
    MethodSpec("individual", "Individual experts", ("method=dummy", f"method._target_={EXPERTS_TARGET}"),
               REFERENCE, kind="experts"),
    MethodSpec("simple_average", "Simple Average", ("method=simple_average",), NO_DATA),
    MethodSpec("task_arithmetic", "Task Arithmetic (λ=0.3)",
               ("method=task_arithmetic", "method.scaling_factor=0.3"), NO_DATA),
    MethodSpec("ties_merging", "TIES-Merging (λ=0.3)", ("method=ties_merging",), NO_DATA),
    MethodSpec("fisher_merging", "Fisher Merging", ("method=fisher_merging/clip_fisher_merging",),
               TRAIN_UNLABELED),
    MethodSpec("regmean", "RegMean", ("method=regmean/clip_regmean",), TRAIN_UNLABELED),
    _adamerging("adamerging_task", "AdaMerging (task-wise, test images)", "clip_task_wise_adamerging"),
    _adamerging("adamerging_layer", "AdaMerging (layer-wise, test images)", "clip_layer_wise_adamerging"),
    _adamerging("adamerging_task_train", "AdaMerging (task-wise, train images)", "clip_task_wise_adamerging",
                train_split=True),
    _adamerging("adamerging_layer_train", "AdaMerging (layer-wise, train images)", "clip_layer_wise_adamerging",
                train_split=True),
    _ours("statsmerging_task", "StatsMerging (task-wise)", "statsmerging_taskwise"),
    _ours("statsmerging_layer", "StatsMerging (layer-wise)", "statsmerging"),
    _ours("statsmerging_plusplus", "StatsMerging++", "statsmerging_plusplus"),
    _ours("statsmerging_task_tta", "StatsMerging (task-wise, test images)", "statsmerging_taskwise", False, _TTA),
    _ours("statsmerging_layer_tta", "StatsMerging (layer-wise, test images)", "statsmerging", False, _TTA),
    _ours("statsmerging_plusplus_tta", "StatsMerging++ (test images)", "statsmerging_plusplus", False, _TTA),
    _ours("statsmerging_plusplus_task", "StatsMerging++ (task-wise)", "statsmerging_plusplus_taskwise",
          optional=True),
    _ours("samerging", "SAMerging", "samerging", optional=True),
    _ours("samerging_task", "SAMerging (task-wise)", "samerging_taskwise", optional=True),
    _ours("statsmerging_sam", "StatsMerging + SAM", "statsmerging_sam", optional=True),
    _ours_selected("statsmerging_residual", "StatsMerging-R (ours: statistics prior + residual)",
                   "statsmerging_residual"),
    # The strongest data-free host baselines and RegMean++ (layer inputs of label-free train images,
    # ``images, _ = batch``: the labels are dropped), natively: CLIP's weights are all matrices.
    MethodSpec("wudi", "WUDI", ("method=wudi/wudi",), NO_DATA, fast_overrides=_WUDI_FAST),
    MethodSpec("iso_c", "Iso-C", ("method=isotropic_merging/iso_c",), NO_DATA),
    MethodSpec("iso_cts", "Iso-CTS", ("method=isotropic_merging/iso_cts",), NO_DATA),
    MethodSpec("tsv_m", "TSV-M", ("method=task_singular_vector/TaskSingularVectorMerging",), NO_DATA),
    MethodSpec("regmean_plusplus", "RegMean++", ("method=regmean_plusplus_clip",), TRAIN_UNLABELED),
]}

# Data-driven methods run under both protocols: AdaMerging on test images (the host's
# default) and on train images; ours on train images (default) and on test images.
DEFAULT_METHODS = [
    "pretrained", "individual", "simple_average", "task_arithmetic", "ties_merging", "fisher_merging",
    "regmean", "adamerging_task", "adamerging_layer", "adamerging_task_train", "adamerging_layer_train",
    "statsmerging_task", "statsmerging_layer", "statsmerging_plusplus", "statsmerging_task_tta",
    "statsmerging_layer_tta", "statsmerging_plusplus_tta", "samerging", "statsmerging_sam",
    "statsmerging_residual",
    "wudi", "iso_c", "iso_cts", "tsv_m", "regmean_plusplus",
]


# Per-task-head pools (``modelpool=heads_suite``: CNNs with BatchNorm, BERT-style encoders):
# the same rows where the host's method is generic, AdaMerging through ``adamerging_heads``
# (the host's classes with the per-task-head hooks), ours through their ``*_heads`` configs.
# The host's Fisher merging and RegMean exist for CLIP/GPT-2/Flan-T5 pools only, so they are
# not in this family's default list.
def _heads_adamerging(key: str, label: str, name: str, train_split: bool) -> MethodSpec:
    if train_split:
        return MethodSpec(key, label, ("method=adamerging_heads", f"method.name={name}"), TRAIN_UNLABELED,
                          fast_overrides=_ADAMERGING_FAST, protocol_key="method.protocol",
                          default_protocol_value="train_unlabeled")
    return MethodSpec(key, label, ("method=adamerging_heads", f"method.name={name}",
                                   "method.protocol=test_time_adaptation"), TEST_TIME,
                      fast_overrides=_ADAMERGING_FAST)


_TASK_WISE = "method.mode=task_wise"
HEADS_REGISTRY: Dict[str, MethodSpec] = {s.key: s for s in [
    dataclasses.replace(REGISTRY["pretrained"], label="Pretrained backbone + expert heads"),
    REGISTRY["individual"], REGISTRY["simple_average"], REGISTRY["task_arithmetic"], REGISTRY["ties_merging"],
    _heads_adamerging("adamerging_task", "AdaMerging (task-wise, test inputs)", "task_wise", False),
    _heads_adamerging("adamerging_layer", "AdaMerging (layer-wise, test inputs)", "layer_wise", False),
    _heads_adamerging("adamerging_task_train", "AdaMerging (task-wise, train inputs)", "task_wise", True),
    _heads_adamerging("adamerging_layer_train", "AdaMerging (layer-wise, train inputs)", "layer_wise", True),
    _ours("statsmerging_task", "StatsMerging (task-wise)", "statsmerging_heads", False, _TASK_WISE),
    _ours("statsmerging_layer", "StatsMerging (layer-wise)", "statsmerging_heads"),
    _ours("statsmerging_plusplus", "StatsMerging++", "statsmerging_plusplus_heads"),
    _ours("statsmerging_task_tta", "StatsMerging (task-wise, test inputs)", "statsmerging_heads", False,
          _TASK_WISE, _TTA),
    _ours("statsmerging_layer_tta", "StatsMerging (layer-wise, test inputs)", "statsmerging_heads", False, _TTA),
    _ours("samerging", "SAMerging", "samerging_heads"),
    _ours("samerging_task", "SAMerging (task-wise)", "samerging_heads", False, _TASK_WISE),
    _ours("statsmerging_sam", "StatsMerging + SAM", "statsmerging_heads", False, "method.optimizer=sam",
          "method.sam_rho=0.05"),
    _ours_selected("statsmerging_residual", "StatsMerging-R (ours: statistics prior + residual)",
                   "statsmerging_residual_heads"),
    # The host's WUDI / Iso / TSV-M transform 2-D weights only and average the rest: on a CNN that is
    # simple averaging. Their functional cores run here with convolutions seen as matrices
    # (method/conv_as_matrix.py; on BERT-style encoders identical to the host's methods).
    MethodSpec("wudi", "WUDI (convs as matrices)", ("method=conv_as_matrix/wudi",), NO_DATA,
               fast_overrides=_WUDI_FAST),
    MethodSpec("iso_c", "Iso-C (convs as matrices)", ("method=conv_as_matrix/iso_c",), NO_DATA),
    MethodSpec("iso_cts", "Iso-CTS (convs as matrices)", ("method=conv_as_matrix/iso_cts",), NO_DATA),
    MethodSpec("tsv_m", "TSV-M (convs as matrices)", ("method=conv_as_matrix/tsv_m",), NO_DATA),
    dataclasses.replace(REGISTRY["regmean_plusplus"], not_applicable=(
        "the host's RegMean++ is CLIP-specific (CLIP encoder layers, embeddings, zero-shot heads) and its core "
        "fits nn.Linear inputs only: a CNN backbone has none; no per-task-head adaptation yet")),
]}
HEADS_DEFAULT_METHODS = [k for k in DEFAULT_METHODS if k in HEADS_REGISTRY]
HEADS_FORMAT = "per_task_heads/1"  # heads.FORMAT, not imported: this parent process stays free of torch


def suite_family(suite: Optional[Path], modelpool: str) -> str:
    """``heads`` for a per-task-head suite (its suite.json says so) or a ``heads*`` modelpool, else ``clip``."""
    if suite is not None and (suite / "suite.json").is_file():
        try:
            if json.loads((suite / "suite.json").read_text()).get("format") == HEADS_FORMAT:
                return "heads"
        except (OSError, ValueError):
            pass
    return "heads" if modelpool.startswith("heads") else "clip"


SUITE_BUILDERS = {
    "clip": ("STATSMERGING_SUITE_DIR", "tasks.json",
             "python -m fusion_bench_statsmerging.demo --build-only --out DIR (then DIR/suite)"),
    "heads": ("STATSMERGING_HEADS_SUITE_DIR", "suite.json", "python -m fusion_bench_statsmerging.heads_fixtures DIR"),
    # a CLIP suite's OpenCLIP export (modelpool/taskpool=openclip_suite): same rows as the clip family
    "openclip": ("STATSMERGING_SUITE_DIR", "openclip/model_config.json",
                 "python -m fusion_bench_statsmerging.openclip_fixtures DIR [--build]"),
}


def suite_problem(ctx: "Context") -> Optional[str]:
    """Why the suite every row would read is unusable, or None: checked once here, since otherwise
    each row starts, loads the host, and fails the same way."""
    pools = (ctx.modelpool, ctx.taskpool)
    family = ("heads" if any(p.startswith("heads_suite") for p in pools)
              else "openclip" if any(p.startswith("openclip_suite") for p in pools) else "clip")
    if not any(p.startswith(("clip_suite", "heads_suite", "openclip_suite")) for p in pools):
        return None
    if any("suite_dir=" in o for o in ctx.extra_overrides):
        return None  # the pools are pointed elsewhere explicitly
    variable, marker, build = SUITE_BUILDERS[family]
    value = ctx.env.get(variable) or os.environ.get(variable)
    if not value:
        return (f"the {'/'.join(pools)} pools read a suite directory, but neither --suite nor ${variable} is set. "
                f"Pass --suite DIR (build one with `{build}`).")
    if not (Path(value) / marker).is_file():
        return f"no suite at '{value}': '{Path(value) / marker}' is missing. Build one with `{build}` or fix --suite."
    return None

# --------------------------------------------------------------------------- experts "method"
def _experts_algorithm_class() -> type:
    """Build the experts pseudo-method lazily: importing the host costs seconds and torch,
    which the parent process (which only launches children) must not pay."""
    from fusion_bench.method import BaseAlgorithm

    class ExpertsOnOwnTasks(BaseAlgorithm):
        """Return every expert (not merged) so the program evaluates each one.

        With ``diagonal_only`` and a task pool exposing ``test_dataloaders`` (the host's CLIP
        task pool and its subclasses), expert ``t`` is evaluated on task ``t`` only; otherwise
        on all tasks, and the comparison reads the diagonal.
        """

        def __init__(self, diagonal_only: bool = True, **kwargs):
            super().__init__(**kwargs)
            self.diagonal_only = diagonal_only

        def run(self, modelpool):
            taskpool = getattr(getattr(self, "_program", None), "taskpool", None)
            return _LazyExperts(modelpool, taskpool if self.diagonal_only else None)

    return ExpertsOnOwnTasks


class _LazyExperts(dict):
    """A dict of expert name -> model that loads one expert at a time while the host's
    program iterates ``items()``, so memory holds one expert instead of all of them."""

    def __init__(self, modelpool, taskpool=None):
        super().__init__({name: None for name in modelpool.model_names})
        self._modelpool = modelpool
        self._taskpool = taskpool

    def items(self) -> Iterator[Tuple[str, Any]]:  # type: ignore[override]
        for name in list(self.keys()):
            with _only_task(self._taskpool, name):
                yield name, self._modelpool.load_model(name)


class _only_task:
    """Restrict a task pool to one task for the duration of a block: a set-up CLIP-style pool
    through its ``test_dataloaders``, a per-task-head pool through its ``tasks`` list."""

    def __init__(self, taskpool, task: str):
        self.taskpool, self.task, self.saved = taskpool, task, None
        self.attribute: Optional[str] = None

    def __enter__(self):
        tp = self.taskpool
        if tp is None:
            return self
        if isinstance(getattr(tp, "tasks", None), list) and self.task in tp.tasks:
            self.attribute, self.saved = "tasks", tp.tasks
            tp.tasks = [self.task]
            return self
        if not getattr(tp, "_is_setup", True) and hasattr(tp, "setup"):
            tp.setup()
        loaders = getattr(tp, "test_dataloaders", None)
        if isinstance(loaders, dict) and self.task in loaders:
            self.attribute, self.saved = "test_dataloaders", loaders
            tp.test_dataloaders = {self.task: loaders[self.task]}
        return self

    def __exit__(self, *exc):
        if self.attribute is not None:
            setattr(self.taskpool, self.attribute, self.saved)
        return False


def __getattr__(name: str):
    """PEP 562 hook: Hydra's ``_target_`` lookup finds the experts method without an eager import."""
    if name == "ExpertsOnOwnTasks":
        cls = _experts_algorithm_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- child launcher
CHILD_FLAG = "--_child"


def _child_stats(wall_s: float, exit_code: int) -> Dict[str, Any]:
    """Peak memory of this process (and of its waited-for workers), measured from inside."""
    kib = 1.0 if sys.platform != "darwin" else 1 / 1024.0  # ru_maxrss: KiB on Linux, bytes on macOS
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1024.0
    kids_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1024.0
    stats: Dict[str, Any] = {"exit_code": exit_code, "inner_wall_s": wall_s,
                             "peak_rss_mib": self_rss, "peak_rss_children_mib": kids_rss,
                             "peak_cuda_mib": None, "cuda_devices": []}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = []
        for i in range(torch.cuda.device_count()):
            devices.append({"device": i,
                            "max_allocated_mib": torch.cuda.max_memory_allocated(i) / 2**20,
                            "max_reserved_mib": torch.cuda.max_memory_reserved(i) / 2**20})
        stats["cuda_devices"] = devices
        stats["peak_cuda_mib"] = max(d["max_allocated_mib"] for d in devices) if devices else None
    return stats


def child_main(argv: Sequence[str]) -> int:
    """``--_child STATS CACHE_DIR -- OVERRIDES...``: run the host CLI here, then record stats."""
    stats_path, cache_dir = argv[1], argv[2]
    overrides = list(argv[4:]) if len(argv) > 3 and argv[3] == "--" else list(argv[3:])
    start, exit_code = time.perf_counter(), 1
    try:
        # The host caches zero-shot heads under ./outputs/cache keyed by model *path*; one
        # cache per comparison keeps a rebuilt suite at the same path from reading stale heads.
        from fusion_bench.utils.cache_utils import set_default_cache_dir

        set_default_cache_dir(cache_dir)
        from fusion_bench.scripts.cli import _hydra_main

        sys.argv = ["fusion_bench", *overrides]
        _hydra_main()
        exit_code = 0
    except SystemExit as exc:
        exit_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the parent reads the traceback from stderr
        traceback.print_exc()
        exit_code = 1
    finally:
        Path(stats_path).write_text(json.dumps(_child_stats(time.perf_counter() - start, exit_code)))
    return exit_code


# --------------------------------------------------------------------------- running
@dataclasses.dataclass
class Context:
    """Everything shared by the runs of one comparison."""

    out: Path
    modelpool: str
    taskpool: str
    extra_overrides: List[str]
    per_method: Dict[str, List[str]]
    env: Dict[str, str]
    timeout: float
    fast: bool
    fast_steps: int
    jobs: int = 1  # runs at a time

    @property
    def cache_dir(self) -> Path:
        return self.out / "cache"

    def run_dir(self, key: str) -> Path:
        return self.out / "runs" / key


_PLACEHOLDER = re.compile(r"(?<!\$)\{(run_dir|cache_dir|out|fast_steps)\}")


def _fill(template: str, values: Mapping[str, str]) -> str:
    """Substitute our placeholders only, leaving Hydra's ``${...}`` interpolations alone."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _hydra_value(path: Path) -> str:
    """Quote a path for a Hydra override when it has characters the override grammar parses."""
    text = str(path)
    if re.fullmatch(r"[\w/.\-+~]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def placeholder_values(spec: MethodSpec, ctx: Context) -> Dict[str, str]:
    """Absolute paths for the placeholders: children run with their run dir as cwd."""
    return {"run_dir": str(ctx.run_dir(spec.key).resolve()), "cache_dir": str(ctx.cache_dir.resolve()),
            "out": str(ctx.out.resolve()), "fast_steps": str(ctx.fast_steps)}


def command_line(overrides: Sequence[str], env: Mapping[str, str]) -> str:
    """The equivalent shell command, with the environment the comparison added."""
    return shlex.join([*(f"{k}={v}" for k, v in env.items()), "fusion_bench", *overrides])


def build_overrides(spec: MethodSpec, ctx: Context) -> List[str]:
    """The Hydra overrides of one run: pools, method, fast-mode, user extras, then log paths
    last so every run writes into ``runs/<key>/`` whatever the user passed."""
    run_dir = ctx.run_dir(spec.key).resolve()
    values = placeholder_values(spec, ctx)
    overrides = [f"modelpool={ctx.modelpool}", f"taskpool={ctx.taskpool}"]
    overrides += [_fill(o, values) for o in spec.overrides]
    if ctx.fast:
        overrides += [_fill(o, values) for o in spec.fast_overrides]
    overrides += [_fill(o, values) for o in ctx.extra_overrides]
    overrides += [_fill(o, values) for o in ctx.per_method.get(spec.key, [])]
    overrides += [f"path.log_dir={_hydra_value(run_dir)}",
                  f"report_save_path={_hydra_value(run_dir / 'program_report.json')}"]
    return overrides


def row_protocol(spec: MethodSpec, overrides: Sequence[str]) -> str:
    """The data-protocol text of a row, following a ``method.protocol=...`` override if any."""
    if spec.protocol_key is None:
        return spec.protocol
    value = spec.default_protocol_value
    for o in overrides:
        key, _, val = o.lstrip("+~").partition("=")
        if key == spec.protocol_key:
            value = val.strip("'\"")
    return OUR_PROTOCOLS.get(value or "", f"{CUSTOM}: {spec.protocol_key}={value}")


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop a timed-out child and its data-loader workers (its own process group only)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return
            time.sleep(0.1)


def _wait(proc: subprocess.Popen, timeout: float) -> Tuple[Optional[int], Optional[float]]:
    """Wait for the child with ``wait4`` so its own peak RSS is known even if it is killed
    before its launcher can write stats. Returns (exit code or None on timeout, RSS MiB)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024.0
        if time.monotonic() > deadline:
            _kill_group(proc)
            return None, None
        time.sleep(0.2)


# Children running now, so an interrupted parallel comparison (--jobs) can stop them all:
# the launcher threads cannot receive the parent's signal themselves.
_LIVE: set = set()
_LIVE_LOCK = threading.Lock()


def _kill_live() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        _kill_group(proc)


def launch(spec: MethodSpec, ctx: Context) -> Dict[str, Any]:
    """Run one method in a child ``fusion_bench`` process and collect its row."""
    run_dir = ctx.run_dir(spec.key)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    overrides = build_overrides(spec, ctx)
    for d in spec.make_dirs:
        Path(_fill(d, placeholder_values(spec, ctx))).mkdir(parents=True, exist_ok=True)
    stats_path = run_dir / "child_stats.json"
    cmd = [sys.executable, "-m", "fusion_bench_statsmerging.compare", CHILD_FLAG, str(stats_path),
           str(ctx.cache_dir.resolve()), "--", *overrides]
    env = {**os.environ, **ctx.env}
    env.setdefault("HYDRA_FULL_ERROR", "1")  # the error, not Hydra's hint, ends stderr
    if ctx.jobs > 1:  # share the cores instead of every child starting one thread per core
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ctx.jobs)))
    row: Dict[str, Any] = {"key": spec.key, "label": spec.label, "kind": spec.kind,
                           "protocol": row_protocol(spec, overrides), "overrides": overrides,
                           "command": command_line(overrides, ctx.env), "run_dir": str(run_dir)}
    start = time.perf_counter()
    # cwd = run dir: the host writes relative files (AdaMerging's merging_weights.pt, ./outputs).
    with open(run_dir / "stdout.log", "w") as out, open(run_dir / "stderr.log", "w") as err:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            code, wait_rss = _wait(proc, ctx.timeout)
        except BaseException:  # Ctrl-C: the child has its own session and would outlive us
            _kill_group(proc)
            raise
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    row["wall_time_s"] = time.perf_counter() - start
    row.update(_read_stats(stats_path, wait_rss))
    stderr = (run_dir / "stderr.log").read_text(errors="replace")
    if code is None:
        row.update(status="timeout", error=f"timed out after {ctx.timeout:g} s",
                   error_tail=error_tail(stderr))
        return row
    row.update(collect_report(spec, run_dir, code, stderr))
    return row


def _read_stats(path: Path, wait_rss: Optional[float]) -> Dict[str, Any]:
    stats = json.loads(path.read_text()) if path.is_file() else {}
    rss = stats.get("peak_rss_mib", wait_rss)
    return {"peak_rss_mib": rss, "peak_rss_children_mib": stats.get("peak_rss_children_mib"),
            "peak_cuda_mib": stats.get("peak_cuda_mib"), "cuda_devices": stats.get("cuda_devices", [])}


# --------------------------------------------------------------------------- reports
_NOT_TASKS = {"average", "model_info"}
_PROGRESS = re.compile(r"\d+%\|.*\||it/s\]|s/it\]")


def _tail(text: str, n: int = 15) -> str:
    """Last lines of a log without tqdm redraws (carriage-return frames)."""
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]", text) if ln.strip() and not _PROGRESS.search(ln)]
    return "\n".join(lines[-n:])


def error_tail(stderr: str, n: int = 15) -> str:
    """The stderr lines worth reading: from Hydra's 'Could not find' line when a config is
    missing (its tail is only the list of available options), else the last lines."""
    lines = _tail(stderr, 10**9).splitlines()
    hits = [i for i, ln in enumerate(lines) if "Could not find" in ln or "Could not load" in ln]
    return "\n".join(lines[hits[-1]:hits[-1] + n]) if hits else "\n".join(lines[-n:])


def summarize_error(stderr: str) -> Tuple[str, str]:
    """(status, one-line error) of a failed run: the last ``XxxError: ...`` line if any."""
    missing = re.findall(r"Could not (?:find|load) '([^']+)'", stderr)
    if missing:
        return "missing config", f"config '{missing[-1]}' not found on the search path"
    errors = re.findall(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b.*$", stderr, re.M)
    if errors:
        return "failed", errors[-1].strip()
    tail = _tail(stderr, 1)
    return "failed", tail or "exited with an error and no stderr"


def task_accuracies(report: Mapping[str, Any]) -> Dict[str, float]:
    """Per-task accuracies of one host report ``{task: {'accuracy': ...}, 'average': ...}``."""
    return {k: float(v["accuracy"]) for k, v in report.items()
            if k not in _NOT_TASKS and isinstance(v, Mapping) and "accuracy" in v}


def _single_model_report(report: Any) -> Tuple[Mapping[str, Any], Optional[str]]:
    """The report of the merged model, also when a method returned extra metadata or a list."""
    note = None
    if isinstance(report, list):
        note = f"report holds {len(report)} models; the first one is shown"
        report = report[0] if report else {}
    if isinstance(report, Mapping) and not task_accuracies(report):
        nested = [v for v in report.values() if isinstance(v, Mapping) and task_accuracies(v)]
        if nested:
            report = nested[0]
    return report, note


def parse_report(spec: MethodSpec, report: Any) -> Dict[str, Any]:
    """Accuracies of a row: per task, the host's average, and our mean of the per-task values."""
    parsed: Dict[str, Any] = {}
    if spec.kind == "experts":
        accs, matrix = {}, {}
        for expert, sub in report.items():
            if isinstance(sub, Mapping):
                matrix[expert] = task_accuracies(sub)
                if expert in matrix[expert]:
                    accs[expert] = matrix[expert][expert]
        parsed["expert_matrix"] = matrix
        reported = None
    else:
        report, note = _single_model_report(report)
        accs = task_accuracies(report)
        avg = report.get("average") if isinstance(report, Mapping) else None
        reported = float(avg["accuracy"]) if isinstance(avg, Mapping) and "accuracy" in avg else None
        if note:
            parsed["note"] = note
    mean = sum(accs.values()) / len(accs) if accs else None
    parsed.update(accuracies=accs, average=reported if reported is not None else mean,
                  reported_average=reported, mean_of_tasks=mean)
    return parsed


def collect_report(spec: MethodSpec, run_dir: Path, code: int, stderr: str) -> Dict[str, Any]:
    """Status, accuracies and error of a finished run from its ``program_report.json``."""
    report_path = run_dir / "program_report.json"
    if code < 0:  # e.g. SIGKILL from the kernel's OOM killer: no Python traceback to read
        return {"status": "killed", "error": f"killed by {signal.Signals(-code).name}",
                "error_tail": error_tail(stderr), "exit_code": code}
    if code != 0:
        status, error = summarize_error(stderr)
        return {"status": status, "error": error, "error_tail": error_tail(stderr), "exit_code": code}
    if not report_path.is_file():
        return {"status": "no report", "error": "run succeeded but wrote no program_report.json "
                "(did the method return a model and is a task pool set?)", "error_tail": _tail(stderr),
                "exit_code": code}
    parsed = parse_report(spec, json.loads(report_path.read_text()))
    if not parsed["accuracies"]:
        return {**parsed, "status": "no accuracy", "error": "report has no per-task accuracy",
                "exit_code": code}
    return {**parsed, "status": "ok", "error": None, "exit_code": code}


# --------------------------------------------------------------------------- config checks
def _config_dirs(extra_overrides: Iterable[str]) -> List[Path]:
    """Directories Hydra will search: ours, the host's, and any ``hydra.searchpath`` file dirs."""
    dirs = []
    for pkg in ("fusion_bench_statsmerging.config", "fusion_bench_config"):
        try:
            spec = importlib.util.find_spec(pkg)
        except ModuleNotFoundError:
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs += [Path(p) for p in spec.submodule_search_locations]
    for o in extra_overrides:
        if o.startswith("hydra.searchpath="):
            dirs += [Path(p) for p in re.findall(r"file://([^,\]'\"]+)", o)]
    return dirs


def config_file(spec: MethodSpec, dirs: Sequence[Path]) -> Optional[Path]:
    """The YAML behind a spec's ``method=...`` choice, or None when no search dir has it."""
    for o in spec.overrides:
        if o.startswith("method="):
            name = o.split("=", 1)[1]
            for d in dirs:
                if (d / "method" / f"{name}.yaml").is_file():
                    return d / "method" / f"{name}.yaml"
            return None
    return None


def skipped_row(spec: MethodSpec, ctx: Context) -> Dict[str, Any]:
    """A listed-but-not-run row: a method this family cannot run (``not_applicable``, with the
    reason) or an optional method whose config is not there yet."""
    overrides = build_overrides(spec, ctx)
    name = next(o.split("=", 1)[1] for o in spec.overrides if o.startswith("method="))
    status, error = (("not applicable", spec.not_applicable) if spec.not_applicable else
                     ("skipped", f"config 'method/{name}' not found (optional method; not run)"))
    return {"key": spec.key, "label": spec.label, "kind": spec.kind, "status": status,
            "protocol": row_protocol(spec, overrides), "overrides": overrides,
            "command": command_line(overrides, ctx.env), "error": error,
            "accuracies": {}, "average": None, "wall_time_s": None, "peak_rss_mib": None,
            "peak_cuda_mib": None}


# --------------------------------------------------------------------------- outputs
def task_order(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    """Tasks in first-seen order across rows, so columns are stable and complete."""
    seen: Dict[str, None] = {}
    for row in rows:
        for t in row.get("accuracies") or {}:
            seen.setdefault(t, None)
    return list(seen)


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _num(x: Optional[float], fmt: str = "{:.1f}") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _md_cell(text: Any) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 140 else text[:137] + "..."


def markdown(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], meta: Mapping[str, Any]) -> str:
    """``results.md``: the table (accuracies in %), failures with their stderr tails, commands."""
    head = ["Method", "Data protocol", *tasks, "Avg.", "Time (s)", "Peak RSS (MiB)", "Peak CUDA (MiB)", "Status"]
    lines = ["# Model merging comparison", "",
             f"modelpool `{meta['modelpool']}`, taskpool `{meta['taskpool']}`; accuracy in %; "
             f"{meta['created']}{'; fast mode' if meta.get('fast') else ''}.", ""]
    if meta.get("jobs", 1) > 1:
        lines += [f"**{meta['jobs']} methods ran at a time (`--jobs {meta['jobs']}`)**: their wall times "
                  "overlap and include contention for the GPU and CPU, so they are not comparable "
                  "to a serial run's; peak memory is still measured per process.", ""]
    lines += [PROTOCOL_NOTE, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = r.get("accuracies") or {}
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error') or ''}"
        cells = [r["label"], r["protocol"], *[_pct(accs.get(t)) for t in tasks], _pct(r.get("average")),
                 _num(r.get("wall_time_s")), _num(r.get("peak_rss_mib"), "{:.0f}"),
                 _num(r.get("peak_cuda_mib"), "{:.0f}"), status]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        for r in failed:
            lines += [f"### {r['label']} ({r['status']})", "", r.get("error") or ""]
            if r.get("error_tail"):
                lines += ["", "```", r["error_tail"], "```"]
            lines.append("")
    lines += ["", "## Commands", ""]
    lines += [f"- {r['label']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> None:
    """``results.csv``: raw accuracies in [0, 1], one row per method."""
    cols = ["method", "key", "protocol", *tasks, "average", "wall_time_s", "peak_rss_mib",
            "peak_cuda_mib", "status", "error"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            accs = r.get("accuracies") or {}
            w.writerow([r["label"], r["key"], r["protocol"], *[accs.get(t, "") for t in tasks],
                        "" if r.get("average") is None else r["average"],
                        *["" if r.get(k) is None else r[k] for k in ("wall_time_s", "peak_rss_mib", "peak_cuda_mib")],
                        r["status"], r.get("error") or ""])


def plot(path: Path, rows: Sequence[Mapping[str, Any]], title: str) -> None:
    """``results.png``: average accuracy per method, coloured by data protocol; failed rows
    keep their place with a 'failed' note so the chart never hides them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(protocols)}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        avg = r.get("average")
        if avg is None:
            ax.text(1, y, f"{r['status']}", va="center", fontsize=8, color="firebrick")
            continue
        ax.barh(y, 100 * avg, color=colors[r["protocol"]])
        ax.text(100 * avg + 1, y, f"{100 * avg:.1f}", va="center", fontsize=8)
    ax.set_yticks(ys, [r["label"] for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(0, 110)
    ax.set_xlabel("average accuracy (%)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in protocols]
    ax.legend(handles, protocols, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=2, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(out: Path, rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """Write the four result files and return the markdown."""
    tasks = task_order(rows)
    md = markdown(rows, tasks, meta)
    (out / "results.md").write_text(md)
    write_csv(out / "results.csv", rows, tasks)
    (out / "results.json").write_text(json.dumps({**meta, "tasks": tasks, "rows": rows}, indent=2))
    plot(out / "results.png", rows, f"{meta['modelpool']} / {meta['taskpool']}")
    return md


# --------------------------------------------------------------------------- CLI
def _key_value(text: str, sep: str, what: str) -> Tuple[str, str]:
    key, found, value = text.partition(sep)
    if not found or not key:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
    return key, value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="statsmerging-compare",
        description="Run merging methods through the fusion_bench CLI on one model pool and "
                    "task pool; write results.{md,csv,json,png} to --out.")
    p.add_argument("--modelpool", default=None,
                   help="modelpool config name (default: clip_suite, or heads_suite for a per-task-head --suite)")
    p.add_argument("--taskpool", default=None, help="taskpool config name (default: as --modelpool's default)")
    p.add_argument("--methods", default=None,
                   help="comma-separated method keys (default: all standard ones; see --list)")
    p.add_argument("--out", type=Path, default=Path("outputs/compare"), help="output directory")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per method (default 3 h)")
    p.add_argument("--fast", action="store_true",
                   help="smoke run: few optimisation steps for AdaMerging and our methods")
    p.add_argument("--fast-steps", type=int, default=5, help="max_steps used by --fast (default 5)")
    p.add_argument("--suite", type=Path, default=None,
                   help="suite directory: a CLIP suite (sets STATSMERGING_SUITE_DIR for the clip_suite pools) or a "
                        "per-task-head suite (suite.json format per_task_heads/1: sets "
                        "STATSMERGING_HEADS_SUITE_DIR, heads_suite pools and that family's rows)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="environment for the runs (each run starts in its own run directory, so "
                        "give absolute paths)")
    p.add_argument("--extra-overrides", action="append", default=[], metavar="OVERRIDES",
                   help="Hydra overrides for every run (shell-split; repeatable; absolute paths), "
                        "e.g. 'fabric.accelerator=cpu hydra.searchpath=[file:///abs/conf]'")
    p.add_argument("--set", action="append", default=[], metavar="KEY:OVERRIDE",
                   help="a Hydra override for one method, e.g. task_arithmetic:method.scaling_factor=0.5")
    p.add_argument("--add", action="append", default=[], metavar="KEY=OVERRIDES",
                   help="an extra method row from Hydra overrides, e.g. 'ta05=method=task_arithmetic "
                        "method.scaling_factor=0.5' (protocol: custom)")
    p.add_argument("--jobs", type=int, default=1,
                   help="methods run at a time (default 1). With more, wall times overlap and the "
                        "report says so; peak memory stays per process")
    p.add_argument("--list", action="store_true", help="list the known methods and exit")
    p.add_argument("--dry-run", action="store_true", help="print the fusion_bench command lines and exit")
    p.add_argument("--fail-on-error", action="store_true",
                   help="exit 1 if any method did not succeed (rows not applicable to the pool family excepted)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.family = suite_family(args.suite, args.modelpool or "clip_suite")
    return args


def family_registry(family: str) -> Tuple[Dict[str, MethodSpec], List[str]]:
    """The known rows and the default list of a pool family (``clip`` or ``heads``)."""
    if family == "heads":
        return dict(HEADS_REGISTRY), list(HEADS_DEFAULT_METHODS)
    return dict(REGISTRY), list(DEFAULT_METHODS)


def select_specs(args: argparse.Namespace, registry: Mapping[str, MethodSpec],
                 builtin: Optional[Mapping[str, MethodSpec]] = None,
                 defaults: Sequence[str] = DEFAULT_METHODS) -> List[MethodSpec]:
    """The specs to run, in the order asked; unknown keys are a usage error listing the known ones.
    ``builtin``: the family's own rows (anything else in ``registry`` came from ``--add``)."""
    builtin = REGISTRY if builtin is None else builtin
    if args.methods:
        keys = [k.strip() for k in args.methods.split(",") if k.strip()]
        keys += [k for k in registry if k not in builtin and k not in keys]  # rows from --add always run
    else:
        keys = [k for k in defaults if k in registry] + [k for k in registry if k not in builtin]
    unknown = [k for k in keys if k not in registry]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {', '.join(registry)}")
    return [registry[k] for k in keys]


def build_context(args: argparse.Namespace) -> Context:
    env = dict(_key_value(e, "=", "KEY=VAL") for e in args.env)
    pool = "heads_suite" if args.family == "heads" else "clip_suite"
    if args.suite is not None:
        variable = "STATSMERGING_HEADS_SUITE_DIR" if args.family == "heads" else "STATSMERGING_SUITE_DIR"
        env[variable] = str(args.suite.resolve())
    per_method: Dict[str, List[str]] = {}
    for s in args.set:
        key, override = _key_value(s, ":", "KEY:OVERRIDE")
        per_method.setdefault(key, []).append(override)
    extra = [o for chunk in args.extra_overrides for o in shlex.split(chunk)]
    return Context(out=args.out.resolve(), modelpool=args.modelpool or pool, taskpool=args.taskpool or pool,
                   extra_overrides=extra,
                   per_method=per_method, env=env, timeout=args.timeout, fast=args.fast,
                   fast_steps=args.fast_steps, jobs=args.jobs)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM -> an exception, so ``launch`` stops the running child's process group too."""
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == CHILD_FLAG:
        return child_main(argv)
    args = parse_args(argv)
    builtin, defaults = family_registry(args.family)
    registry = dict(builtin)
    for a in args.add:
        key, overrides = _key_value(a, "=", "KEY=OVERRIDES")
        registry[key] = MethodSpec(key, key, tuple(shlex.split(overrides)), CUSTOM)
    if args.list:
        for s in registry.values():
            print(f"{s.key:28s} {s.label:40s} {row_protocol(s, s.overrides):45s} {' '.join(s.overrides)}")
        return 0
    ctx = build_context(args)
    specs = select_specs(args, registry, builtin, defaults)
    dirs = _config_dirs(ctx.extra_overrides)
    if args.dry_run:
        for s in specs:
            print(command_line(build_overrides(s, ctx), ctx.env))
        return 0
    problem = suite_problem(ctx)
    if problem:
        print(f"statsmerging-compare: error: {problem}", file=sys.stderr)
        return 2
    ctx.out.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    shutil.rmtree(ctx.cache_dir, ignore_errors=True)  # fresh heads: the suite may have been rebuilt
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "modelpool": ctx.modelpool,
            "taskpool": ctx.taskpool, "fast": ctx.fast, "jobs": ctx.jobs,
            "extra_overrides": ctx.extra_overrides, "env": ctx.env, "argv": argv}
    slots: List[Optional[Dict[str, Any]]] = [None] * len(specs)
    todo = []
    for i, spec in enumerate(specs):
        if spec.not_applicable or (spec.optional and not args.methods and config_file(spec, dirs) is None):
            slots[i] = skipped_row(spec, ctx)
        else:
            todo.append(i)
    run_specs(specs, todo, slots, ctx, meta)
    rows = [r for r in slots if r is not None]
    md = write_outputs(ctx.out, rows, meta)
    print(md)
    return 1 if args.fail_on_error and any(r["status"] not in ("ok", "not applicable") for r in rows) else 0


def _launch_logged(spec: MethodSpec, ctx: Context) -> Dict[str, Any]:
    print(f"[compare] {spec.label} ...", file=sys.stderr, flush=True)
    row = launch(spec, ctx)
    print(f"[compare] {spec.label}: {row['status']} in {row['wall_time_s']:.1f} s"
          + (f" ({row['error']})" if row.get("error") else ""), file=sys.stderr, flush=True)
    return row


def run_specs(specs: Sequence[MethodSpec], todo: Sequence[int], slots: List[Optional[Dict[str, Any]]],
              ctx: Context, meta: Dict[str, Any]) -> None:
    """Run ``specs[i]`` for ``i`` in ``todo``, ``ctx.jobs`` at a time, into ``slots[i]``.

    Rows keep the requested order whatever order runs finish in; the result files are
    rewritten after each run so partial results survive an interrupted comparison. On an
    interrupt (Ctrl-C, SIGTERM) every running child's process group is stopped.
    """
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = ThreadPoolExecutor(max_workers=max(1, ctx.jobs), thread_name_prefix="compare")
    futures = {pool.submit(_launch_logged, specs[i], ctx): i for i in todo}
    pending = set(futures)
    try:
        while pending:
            # a timeout keeps the main thread responsive to signals between polls
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            for fut in done:
                slots[futures[fut]] = fut.result()
            if done:
                write_outputs(ctx.out, [r for r in slots if r is not None], meta)
    except BaseException:
        for fut in pending:
            fut.cancel()
        _kill_live()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

if __name__ == "__main__":
    sys.exit(main())
