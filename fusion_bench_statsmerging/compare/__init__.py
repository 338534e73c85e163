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

The package: :mod:`.rows` (protocols, the method registry of each pool family), :mod:`.runner`
(the child process of a row, its overrides, limits and measurements), :mod:`.report` (parsing a
run's report, writing the result files), :mod:`.experts` (the ``individual`` row's pseudo-method)
and :mod:`.cli` (arguments and the ``--jobs`` scheduler). Their public names are re-exported here.

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

from .cli import build_context, family_registry, main, parse_args, run_specs, select_specs
from .report import (
    collect_report, error_tail, markdown, parse_report, plot, summarize_error, task_accuracies, task_order, write_csv,
    write_outputs,
)
from .rows import (
    CUSTOM, DEFAULT_METHODS, EXPERTS_TARGET, HEADS_DEFAULT_METHODS, HEADS_FORMAT, HEADS_REGISTRY, NO_DATA,
    OUR_PROTOCOLS, PROTOCOL_NOTE, REFERENCE, REGISTRY, SUITE_BUILDERS, TEST_TIME, TRAIN_UNLABELED,
    TRAIN_UNLABELED_SELECTED, USES_LABELS, VALIDATION_UNLABELED, MethodSpec, suite_family,
)
from .runner import (
    CHILD_FLAG, Context, build_overrides, child_main, command_line, config_file, launch,
    placeholder_values, row_protocol, skipped_row, suite_problem,
)


def __getattr__(name: str):
    """PEP 562 hook: Hydra's ``_target_`` lookup finds the experts method without an eager import."""
    if name == "ExpertsOnOwnTasks":
        from .experts import _experts_algorithm_class

        cls = _experts_algorithm_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
