"""StatsMerging-R's ablation on the real suites: candidate rows, scored on validation, chosen there.

The candidates are variants of ``method=statsmerging_residual_heads`` (the recommended configuration as
committed, the comparison's ``statsmerging_residual`` row). They run as extra rows of the same
``statsmerging-compare`` invocation as every other row (so they share the suite's build), with
``taskpool.extra_splits=[validation]``, so each run reports validation and test accuracy. The choice
reads validation only: the candidate with the best validation average over the given suites.

    python benchmarks/real_suites/ablation.py --add-args [--only K,K]  # rows for statsmerging-compare
    python benchmarks/real_suites/ablation.py --choose W/compare_vision W/compare_text W/compare_hetero
    python benchmarks/real_suites/ablation.py --replay DIR...         # the two starts' probes, replayed

Nothing here writes into a comparison's folder: its ``results.json`` is the record of its run. The
choice is a derived table (``--choose``, ``--json`` to keep it as a file); a configuration chosen here
is committed in its YAML and must then run as its own row before any table shows it.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple


MAIN_KEY = "statsmerging_residual"
BASE_CONFIG = "method=statsmerging_residual_heads"
# Each candidate names every setting it ran with that differs from the configuration committed now, so a
# rerun measures what the tables report. The first campaigns varied the configuration committed then: a
# start at 0 with an unbounded learner output, 1600 unlabeled images per task, 10 epochs at a constant
# learning rate. The second campaign chose the 0.3 start (ablation_r_init03), the third the 3000-step
# schedule on every train image with it (ablation_r_init03_long3k, committed now).
# one start (the configuration's `starts` probe two since the two starts' candidate was chosen)
INIT0 = {"method.output": "unbounded", "method.init_coefficient": "0.0", "method.starts": "null"}
INIT03 = {"method.output": "sigmoid", "method.init_coefficient": "0.3", "method.starts": "null"}
EPOCHS10 = {"method.max_samples_per_task": "1600", "method.max_epochs": "10", "method.max_steps": "null",
            "method.lr_step_size": "null"}
ALL_IMAGES = {"method.max_samples_per_task": "null"}
STEPS3K = {"method.max_samples_per_task": "null", "method.max_steps": "3000", "method.lr_step_size": "2000"}
TWO_STARTS_SETTINGS = {"method.starts": "[{output:sigmoid,init_coefficient:0.3},{output:unbounded,init_coefficient:0.0}]",
                       "method.start_probe_steps": "300"}


def _overrides(*parts: Mapping[str, str]) -> Tuple[str, ...]:
    """Hydra overrides of the merged settings (a later part wins; each key once, as Hydra wants)."""
    merged: Dict[str, str] = {}
    for part in parts:
        merged.update(part)
    return tuple(f"{k}={v}" for k, v in merged.items())


# key -> (what differs from the configuration committed when the candidate ran, overrides on BASE_CONFIG)
CANDIDATES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "ablation_r_last": ("last state instead of label-free validation selection",
                        _overrides(INIT0, EPOCHS10, {"method.select_by": "last"})),
    "ablation_r_feat": ("plus feature distillation: relative squared error to each expert's backbone output "
                        "(weight 1)", _overrides(INIT0, EPOCHS10, {"method.feature_weight": "1.0"})),
    "ablation_r_nores": ("no residual: the learner alone (StatsMerging with the same recipe)",
                         _overrides(INIT0, EPOCHS10, {"method.residual": "false"})),
    "ablation_r_init03": ("start at 0.3 (task arithmetic; sigmoid output in (0, 1)) instead of 0, unbounded "
                          "(committed from the second campaign to the third)", _overrides(INIT03, EPOCHS10)),
    "ablation_r_long": ("all unlabeled train images, 10 epochs over the largest task (2.5x the steps on vision)",
                        _overrides(INIT0, EPOCHS10, ALL_IMAGES)),
    "ablation_r_long_feat": ("all unlabeled train images and feature distillation (weight 1) together",
                             _overrides(INIT0, EPOCHS10, ALL_IMAGES, {"method.feature_weight": "1.0"})),
    "ablation_r_long3k": ("all unlabeled train images, 3000 steps (3x), learning rate x0.1 for the last 1000",
                          _overrides(INIT0, STEPS3K)),
    "ablation_r_init03_long3k": ("the 0.3 start and the 3000-step schedule on all train images together "
                                 "(committed since the third campaign)", _overrides(INIT03, STEPS3K)),
    "ablation_r_two_starts_feat": ("the committed configuration (two starts) plus feature distillation (weight 1): "
                                   "led text and real-image validation with the start at 0 (first campaign); not "
                                   "yet run with the current schedule",
                                   _overrides(INIT03, STEPS3K, TWO_STARTS_SETTINGS, {"method.feature_weight": "1.0"})),
    "ablation_r_initauto_long3k": ("one start found by init_coefficient: auto instead of the two starts' probes: task "
                                   "arithmetic at 0.1-0.9 scored by agreement with the experts on unlabeled "
                                   "validation images (not yet run on the GPU)",
                                   _overrides(INIT03, STEPS3K, {"method.init_coefficient": "auto"})),
    "ablation_r_two_starts": ("two starts, the 0.3 start (sigmoid) and the start at 0 (unbounded), each trained for "
                              "300 steps; the one the experts agree with most on the unlabeled validation images "
                              "goes on (committed now). Until it runs as a row of its own, its scores are those of "
                              "the run of the start its probes pick (see replay_pick)",
                              _overrides(INIT03, STEPS3K, TWO_STARTS_SETTINGS)),
    "ablation_r_csam": ("SAM perturbs the merging coefficients, not the learner's weights (sam_space: coefficients)",
                        _overrides(INIT0, EPOCHS10, {"method.sam_space": "coefficients"})),
}


# The two starts' candidate, replayed: the runs that trained each start alone with the committed schedule
# (in the order of the configuration's ``starts``), and the probes' length in steps.
TWO_STARTS = "ablation_r_two_starts"
START_RUNS = ("ablation_r_init03_long3k", "ablation_r_long3k")
PROBE_STEPS = 300


def logged_agreement(run_dir: Path) -> Dict[int, float]:
    """The validation agreement a StatsMerging-R run's report logged, by step (every ``select_every``
    steps; {} when the report is missing). Agreement is with the experts: no label."""
    path = run_dir / "statsmerging_report.json"
    if not path.is_file():
        return {}
    logged = json.loads(path.read_text()).get("selection", {}).get("agreement_by_step", {})
    return {int(k): v for k, v in logged.items()}


def _probe_scores(runs: Path, steps: int) -> Optional[Dict[str, Dict[int, float]]]:
    """Each of START_RUNS' logged agreement, or None when one run has none within ``steps``."""
    logged = {key: logged_agreement(runs / key) for key in START_RUNS}
    return logged if all(any(k <= steps for k in log) for log in logged.values()) else None


def _probe_best(log: Dict[int, float], steps: int) -> float:
    return max(v for k, v in log.items() if k <= steps)


def _pick(logged: Dict[str, Dict[int, float]], steps: int) -> str:
    return max(START_RUNS, key=lambda k: (_probe_best(logged[k], steps), -START_RUNS.index(k)))


def replay_pick(runs: Path, steps: int = PROBE_STEPS) -> Optional[str]:
    """Which of START_RUNS the probes of ``ablation_r_two_starts`` pick on a comparison whose ``runs``
    folder holds both: each probe is the first ``steps`` steps of that start's own run (same seed,
    batches and schedule), scored by the best validation agreement up to there, which the run's
    report logged (:func:`logged_agreement`); ties: the start listed first. None when a run or its log
    is missing."""
    logged = _probe_scores(runs, steps)
    return None if logged is None else _pick(logged, steps)


def replay_markdown(dirs: List[Path], steps: int = PROBE_STEPS) -> str:
    """Per comparison folder and start: the best agreement the probes see (steps <= ``steps``), the
    best of the whole run (the state it kept), its validation and test average, and the probes' pick."""
    lines = ["| suite | start (run) | agreement, probe (<= %d steps) | agreement, whole run | val | test | picked |"
             % steps, "|---|---|---|---|---|---|---|"]
    for d in dirs:
        logged = _probe_scores(d / "runs", steps)
        if logged is None:
            continue
        pick = _pick(logged, steps)
        for key in START_RUNS:
            val, test = _scores(d / "runs" / key)
            cells = [f"{100 * _probe_best(logged[key], steps):.2f}", f"{100 * max(logged[key].values()):.2f}",
                     "" if val is None else f"{100 * val:.2f}", "" if test is None else f"{100 * test:.2f}",
                     "yes" if key == pick else ""]
            lines.append(f"| {d.name} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def override_holds(config: Mapping, override: str) -> bool:
    """Whether ``config`` (a method's config) has the value a ``method.key=value`` override sets."""
    name, value = override.split("=", 1)
    got = config[name.split(".", 1)[1]]
    if value.startswith("["):  # a list (of mappings): compared as Hydra parses it
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        parsed = OverridesParser.create().parse_override(override).value()
        return OmegaConf.to_container(OmegaConf.create({"v": got}))["v"] == parsed
    if value == "null":
        return got is None
    if str(got).lower() == value.lower():  # strings, and booleans as Hydra spells them
        return True
    try:
        return float(got) == float(value)
    except (TypeError, ValueError):
        return False


def add_args(only: Optional[List[str]] = None) -> List[str]:
    """``--add KEY=OVERRIDES`` arguments of statsmerging-compare, one per candidate (or per candidate in ``only``)."""
    unknown = sorted(set(only or []) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
    return [arg for key, (_, overrides) in CANDIDATES.items() if only is None or key in only
            for arg in ("--add", f"{key}={' '.join([BASE_CONFIG, *overrides])}")]


def _scores(run_dir: Path) -> Tuple[Optional[float], Optional[float]]:
    """(validation average, test average) of one run's program_report.json, None where missing."""
    path = run_dir / "program_report.json"
    if not path.is_file():
        return None, None
    report = json.loads(path.read_text())
    if isinstance(report, list):
        report = report[0]
    val = (report.get("validation_split") or {}).get("average", {}).get("accuracy")
    test = (report.get("average") or {}).get("accuracy")
    return val, test


def collect(dirs: List[Path]) -> Dict[str, Dict[str, Tuple[Optional[float], Optional[float]]]]:
    """key -> suite -> (validation, test) for the main row and every candidate."""
    out: Dict[str, Dict[str, Tuple[Optional[float], Optional[float]]]] = {}
    for key in [MAIN_KEY, *CANDIDATES]:
        out[key] = {d.name: _scores(d / "runs" / key) for d in dirs}
    for d in dirs:  # the two starts, where they have not run as a row: the run of the start the probes pick
        pick = replay_pick(d / "runs")
        if out[TWO_STARTS][d.name] == (None, None) and pick is not None:
            out[TWO_STARTS][d.name] = out[pick][d.name]
    return out


def choose(scores: Mapping[str, Mapping[str, Tuple[Optional[float], Optional[float]]]]) -> str:
    """The key with the best mean *validation* accuracy over the suites (a run missing any suite is out)."""
    means = {k: sum(v[0] for v in s.values()) / len(s) for k, s in scores.items()
             if s and all(v[0] is not None for v in s.values())}
    if not means:
        raise SystemExit("no candidate has validation scores on every suite")
    return max(means, key=lambda k: (means[k], k == MAIN_KEY))


def markdown(scores: Mapping[str, Mapping[str, Tuple[Optional[float], Optional[float]]]], chosen: str) -> str:
    suites = list(next(iter(scores.values())))
    head = "| candidate | differs from the main row | " + " | ".join(
        f"{s} val | {s} test" for s in suites) + " | mean val |"
    lines = [head, "|---|---|" + "---|---|" * len(suites) + "---|"]
    for key, per_suite in scores.items():
        what = "the committed configuration when the runs were made" if key == MAIN_KEY else CANDIDATES[key][0]
        cells = []
        for s in suites:
            cells += ["" if x is None else f"{100 * x:.2f}" for x in per_suite[s]]
        vals = [v[0] for v in per_suite.values()]
        mean = "" if any(v is None for v in vals) else f"{100 * sum(vals) / len(vals):.2f}"
        name = f"**{key}** (chosen)" if key == chosen else key
        lines.append(f"| {name} | {what} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add-args", action="store_true", help="print the candidates' --add arguments")
    parser.add_argument("--only", help="with --add-args: a comma-separated subset of the candidates")
    parser.add_argument("--choose", nargs="+", type=Path, metavar="COMPARE_DIR")
    parser.add_argument("--replay", nargs="+", type=Path, metavar="COMPARE_DIR",
                        help="the two starts' probes replayed from the runs of each start (see replay_pick)")
    args = parser.parse_args(argv)
    for d in [*(args.choose or []), *(args.replay or [])]:
        if not Path(d, "results.json").is_file():
            parser.error(f"{d} holds no results.json: give statsmerging-compare output folders")
    if args.only and not args.add_args:
        parser.error("--only selects candidates for --add-args; give --add-args too")
    if args.add_args:
        print(" ".join(shlex.quote(a) for a in add_args(args.only.split(",") if args.only else None)))
    if args.choose:
        scores = collect(args.choose)
        chosen = choose(scores)
        print(markdown(scores, chosen))
        print(f"\nchosen on validation: {chosen}")
    if args.replay:
        print(replay_markdown(args.replay))


if __name__ == "__main__":
    main()
