"""Rows of the comparison: data protocols, the method registry of each pool family (CLIP suites,
per-task-head suites) and which family a suite belongs to.

A row is a :class:`MethodSpec`: the Hydra overrides that run one method through ``fusion_bench``
and the data protocol it is labelled with. Adding a method to the comparison is one entry in
:data:`REGISTRY` (and :data:`HEADS_REGISTRY` for per-task-head pools).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple


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


# --------------------------------------------------------------------------- budgets
DATA_FREE = {"images_per_task": 0, "steps": 0, "passes_per_step": 0, "selection": "none (no data)"}
HOST_ADAMERGING = {"images_per_task": "all", "steps": 1000, "passes_per_step": 1, "selection": "last state"}
_SELECT = ("method.select_by=validation_agreement", "method.select_every={select_every}",
           "method.select_samples={select_samples}")
# a common budget for our rows without probes: every step of the recommended run (probes included)
_OURS_MATCHED = ("method.max_epochs=null", "method.max_steps={steps}", "method.data_fraction=1.0",
                 "method.min_samples_per_task=null", "method.max_samples_per_task={images}", *_SELECT)
_SAM_MATCHED = ("method.num_batches_per_task=null", "method.epochs=null", "method.max_steps={steps}",
                "method.data_fraction=1.0", "method.min_samples_per_task=null",
                "method.max_samples_per_task={images}", *_SELECT)
# rows with StatsMerging-R's recipe: the same probes, then the main run
_PROBING_MATCHED = ("method.max_steps={train_steps}", "method.start_probe_steps={probe_steps}",
                    "method.data_fraction=1.0", "method.max_samples_per_task={images}", *_SELECT)
_ADAMERGING_MATCHED = ("method.max_steps={steps}",)  # all train images; the host keeps its last state
PAPER_STATS = "paper defaults (StatsMerging)"
PAPER_SAM = "paper defaults (SAMerging)"
R_SETTINGS = "tuned on labelled validation of seed-0 builds (issue 19); two starts added after text test figures"
# StatsMerging-R without its learner / without its residual: the ablation rows at its budget
R_FREE = ("method.learner_frozen=true", "method.name='Free coefficients (StatsMerging-R recipe)'")
R_LEARNER = ("method.residual=false", "method.name='Learner alone (StatsMerging-R recipe)'")
# task arithmetic whose λ a grid scored by the experts' agreement on unlabeled validation images picks
TA_AGREEMENT = ("method.init_coefficient=auto", "method.learner_frozen=true", "method.residual=false",
                "method.max_epochs=null", "method.max_steps=0", "method.name='Task Arithmetic (λ label-free)'",
                "method.select_by=validation_agreement")


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
    # the budget: what a row spends when its run writes no report of its own (host methods), the
    # overrides that give a trained row a common budget (``--budget``; placeholders of budget.Budget),
    # whether it probes starts, and how its settings were chosen
    budget: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(DATA_FREE))
    matched: Tuple[str, ...] = ()
    probes: bool = False
    settings: str = "host defaults"


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
                          protocol_key="method.protocol", default_protocol_value="train_unlabeled",
                          budget=HOST_ADAMERGING, matched=_ADAMERGING_MATCHED)
    return MethodSpec(key, label, ("method=adamerging/clip", f"method.name={name}",
                                   f"method.cache_dir={_ADAMERGING_CACHE}"),
                      TEST_TIME, fast_overrides=_ADAMERGING_FAST, make_dirs=(_ADAMERGING_CACHE,),
                      budget=HOST_ADAMERGING, matched=_ADAMERGING_MATCHED)


_OURS_FAST = ("method.max_steps={fast_steps}",)
_WUDI_FAST = ("method.iter_num={fast_steps}",)  # WUDI's Adam steps per matrix (400: minutes on a CPU)
_TTA = "method.protocol=test_time_adaptation"


def _ours_selected(key: str, label: str, config: str, *extra: str, settings: str = R_SETTINGS) -> MethodSpec:
    """A row with StatsMerging-R's recipe (label-free selection on unlabeled validation images, and
    its start probes)."""
    return dataclasses.replace(_ours(key, label, config, False, *extra), protocol=TRAIN_UNLABELED_SELECTED,
                               protocol_key=None, matched=_PROBING_MATCHED, probes=True, settings=settings)


def _ours(key: str, label: str, config: str, optional: bool = False, *extra: str) -> MethodSpec:
    sam = config.startswith("samerging")
    return MethodSpec(key, label, (f"method={config}", *extra), TRAIN_UNLABELED, fast_overrides=_OURS_FAST,
                      protocol_key="method.protocol", default_protocol_value="train_unlabeled",
                      optional=optional, matched=_SAM_MATCHED if sam else _OURS_MATCHED, budget={},
                      settings=PAPER_SAM if sam else PAPER_STATS)


def _ta_agreement(config: str) -> MethodSpec:
    """Task arithmetic with λ chosen label-free (a grid of 0.1-0.9 scored by agreement with the
    experts on unlabeled validation images): the data-free rows' fair counterpart."""
    return MethodSpec("task_arithmetic_agreement", "Task Arithmetic (λ label-free)",
                      (f"method={config}", *TA_AGREEMENT), VALIDATION_UNLABELED, budget={},
                      matched=("method.select_samples={select_samples}",),
                      settings="λ from the grid 0.1-0.9 by label-free agreement (no label read)")


REGISTRY: Dict[str, MethodSpec] = {s.key: s for s in [
    MethodSpec("pretrained", "Pretrained (zero-shot)", ("method=dummy",), NO_DATA, settings="reference"),
    MethodSpec("individual", "Individual experts", ("method=dummy", f"method._target_={EXPERTS_TARGET}"),
               REFERENCE, kind="experts", settings="reference"),
    MethodSpec("simple_average", "Simple Average", ("method=simple_average",), NO_DATA),
    MethodSpec("task_arithmetic", "Task Arithmetic (λ=0.3)",
               ("method=task_arithmetic", "method.scaling_factor=0.3"), NO_DATA, settings="λ=0.3, not tuned"),
    _ta_agreement("statsmerging"),
    MethodSpec("ties_merging", "TIES-Merging (λ=0.3)", ("method=ties_merging",), NO_DATA,
               settings="host defaults (λ=0.3), not tuned"),
    MethodSpec("fisher_merging", "Fisher Merging", ("method=fisher_merging/clip_fisher_merging",),
               TRAIN_UNLABELED, budget={**DATA_FREE, "images_per_task": "host default", "selection": "none"}),
    MethodSpec("regmean", "RegMean", ("method=regmean/clip_regmean",), TRAIN_UNLABELED,
               budget={**DATA_FREE, "images_per_task": "host default", "selection": "none"}),
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
    _ours_selected("samerging_matched", "Free coefficients at StatsMerging-R's budget", "statsmerging_residual",
                   *R_FREE, settings="StatsMerging-R's recipe with its learner frozen at the start"),
    _ours_selected("statsmerging_learner_matched", "Learner alone at StatsMerging-R's budget",
                   "statsmerging_residual", *R_LEARNER,
                   settings="StatsMerging-R's recipe without its residual"),
    # The strongest data-free host baselines and RegMean++ (layer inputs of label-free train images,
    # ``images, _ = batch``: the labels are dropped), natively: CLIP's weights are all matrices.
    MethodSpec("wudi", "WUDI", ("method=wudi/wudi",), NO_DATA, fast_overrides=_WUDI_FAST),
    MethodSpec("iso_c", "Iso-C", ("method=isotropic_merging/iso_c",), NO_DATA),
    MethodSpec("iso_cts", "Iso-CTS", ("method=isotropic_merging/iso_cts",), NO_DATA),
    MethodSpec("tsv_m", "TSV-M", ("method=task_singular_vector/TaskSingularVectorMerging",), NO_DATA),
    MethodSpec("regmean_plusplus", "RegMean++", ("method=regmean_plusplus_clip",), TRAIN_UNLABELED,
               budget={**DATA_FREE, "images_per_task": "host default", "selection": "none"}),
]}

# Data-driven methods run under both protocols: AdaMerging on test images (the host's
# default) and on train images; ours on train images (default) and on test images.
DEFAULT_METHODS = [
    "pretrained", "individual", "simple_average", "task_arithmetic", "ties_merging", "fisher_merging",
    "regmean", "adamerging_task", "adamerging_layer", "adamerging_task_train", "adamerging_layer_train",
    "statsmerging_task", "statsmerging_layer", "statsmerging_plusplus", "statsmerging_task_tta",
    "statsmerging_layer_tta", "statsmerging_plusplus_tta", "samerging", "statsmerging_sam",
    "statsmerging_residual", "samerging_matched", "statsmerging_learner_matched", "task_arithmetic_agreement",
    "wudi", "iso_c", "iso_cts", "tsv_m", "regmean_plusplus",
]
# The evidence rows: the recommended configuration, its two ablations at its budget, SAMerging at its
# own, and the data-free peers (task arithmetic twice: λ = 0.3 and λ chosen label-free)
EVIDENCE_METHODS = ["pretrained", "individual", "task_arithmetic", "task_arithmetic_agreement", "ties_merging",
                    "tsv_m", "samerging", "statsmerging_residual", "samerging_matched",
                    "statsmerging_learner_matched"]


# Per-task-head pools (``modelpool=heads_suite``: CNNs with BatchNorm, BERT-style encoders):
# the same rows where the host's method is generic, AdaMerging through ``adamerging_heads``
# (the host's classes with the per-task-head hooks), ours through their ``*_heads`` configs.
# The host's Fisher merging and RegMean exist for CLIP/GPT-2/Flan-T5 pools only, so they are
# not in this family's default list.
def _heads_adamerging(key: str, label: str, name: str, train_split: bool) -> MethodSpec:
    if train_split:
        return MethodSpec(key, label, ("method=adamerging_heads", f"method.name={name}"), TRAIN_UNLABELED,
                          fast_overrides=_ADAMERGING_FAST, protocol_key="method.protocol",
                          default_protocol_value="train_unlabeled", budget=HOST_ADAMERGING,
                          matched=_ADAMERGING_MATCHED)
    return MethodSpec(key, label, ("method=adamerging_heads", f"method.name={name}",
                                   "method.protocol=test_time_adaptation"), TEST_TIME,
                      fast_overrides=_ADAMERGING_FAST, budget=HOST_ADAMERGING, matched=_ADAMERGING_MATCHED)


_TASK_WISE = "method.mode=task_wise"
HEADS_REGISTRY: Dict[str, MethodSpec] = {s.key: s for s in [
    dataclasses.replace(REGISTRY["pretrained"], label="Pretrained backbone + expert heads"),
    REGISTRY["individual"], REGISTRY["simple_average"], REGISTRY["task_arithmetic"], REGISTRY["ties_merging"],
    _ta_agreement("statsmerging_heads"),
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
    _ours_selected("samerging_matched", "Free coefficients at StatsMerging-R's budget",
                   "statsmerging_residual_heads", *R_FREE,
                   settings="StatsMerging-R's recipe with its learner frozen at the start"),
    _ours_selected("statsmerging_learner_matched", "Learner alone at StatsMerging-R's budget",
                   "statsmerging_residual_heads", *R_LEARNER, settings="StatsMerging-R's recipe without its residual"),
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
             "python -m fusion_bench_statsmerging.fixtures.demo --build-only --out DIR (then DIR/suite)"),
    "heads": ("STATSMERGING_HEADS_SUITE_DIR", "suite.json", "python -m fusion_bench_statsmerging.fixtures.heads DIR"),
    # a CLIP suite's OpenCLIP export (modelpool/taskpool=openclip_suite): same rows as the clip family
    "openclip": ("STATSMERGING_SUITE_DIR", "openclip/model_config.json",
                 "python -m fusion_bench_statsmerging.fixtures.openclip DIR [--build]"),
}
