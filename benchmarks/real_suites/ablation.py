"""StatsMerging-R's ablation on the real suites: candidate rows, scored on validation, chosen there.

The candidates are variants of ``method=statsmerging_residual_heads`` (the recommended configuration as
committed, the comparison's ``statsmerging_residual`` row). They run as extra rows of the same
``statsmerging-compare`` invocation as every other row (so they share the suite's build), with
``taskpool.extra_splits=[validation]``, so each run reports validation and test accuracy. The choice
reads validation only: the candidate with the best validation average over the given suites.

    python benchmarks/real_suites/ablation.py --add-args [--only K,K]  # rows for statsmerging-compare
    python benchmarks/real_suites/ablation.py --choose W/compare_vision W/compare_text W/compare_hetero
    python benchmarks/real_suites/ablation.py --promote KEY DIR...    # chosen candidate -> main row

``--promote`` renames rows in each ``results.json`` (backup ``results.before_promote.json``): the
chosen candidate becomes ``statsmerging_residual`` and the run that had that key becomes
``ablation_r_base``; nothing is rerun, and only validation scores have chosen the candidate. Every folder
is checked before any is written (atomically), so a folder without the candidate changes none.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from fusion_bench_statsmerging.compare.rows import TRAIN_UNLABELED_SELECTED  # plain constants, no torch

MAIN_KEY = "statsmerging_residual"
BASE_CONFIG = "method=statsmerging_residual_heads"
# Each candidate names every setting it ran with that differs from the configuration committed now, so a
# rerun measures what the tables report. The first campaigns varied the configuration committed then: a
# start at 0 with an unbounded learner output, 1600 unlabeled images per task, 10 epochs at a constant
# learning rate. The second campaign chose the 0.3 start (ablation_r_init03), the third the 3000-step
# schedule on every train image with it (ablation_r_init03_long3k, committed now).
INIT0 = {"method.output": "unbounded", "method.init_coefficient": "0.0"}
INIT03 = {"method.output": "sigmoid", "method.init_coefficient": "0.3"}
EPOCHS10 = {"method.max_samples_per_task": "1600", "method.max_epochs": "10", "method.max_steps": "null",
            "method.lr_step_size": "null"}
ALL_IMAGES = {"method.max_samples_per_task": "null"}
STEPS3K = {"method.max_samples_per_task": "null", "method.max_steps": "3000", "method.lr_step_size": "2000"}


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
    "ablation_r_init03_long3k_feat": ("the committed configuration plus feature distillation (weight 1): led "
                                      "text and real-image validation with the start at 0 (first campaign); not "
                                      "yet run with the 0.3 start", _overrides(INIT03, STEPS3K,
                                                                              {"method.feature_weight": "1.0"})),
    "ablation_r_initauto_long3k": ("the committed configuration with a label-free start (init_coefficient: auto): "
                                   "task arithmetic at 0.1-0.9 scored by agreement with the experts on unlabeled "
                                   "validation images; the text suite preferred the start at 0, the CNN suites "
                                   "0.3 (not yet run on the GPU)",
                                   _overrides(INIT03, STEPS3K, {"method.init_coefficient": "auto"})),
    "ablation_r_csam": ("SAM perturbs the merging coefficients, not the learner's weights (sam_space: coefficients)",
                        _overrides(INIT0, EPOCHS10, {"method.sam_space": "coefficients"})),
}


def override_holds(config: Mapping, override: str) -> bool:
    """Whether ``config`` (a method's config) has the value a ``method.key=value`` override sets."""
    name, value = override.split("=", 1)
    got = config[name.split(".", 1)[1]]
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


CHOSEN_LABEL = "StatsMerging-R (chosen on validation: {})"
MAIN_PROTOCOL = TRAIN_UNLABELED_SELECTED  # the main row's data protocol (an --add row has none of its own)


def promote_rows(rows: List[dict], chosen: str) -> List[dict]:
    """The rows with ``chosen`` as the main row (see :func:`promote`); a new list, ``rows`` untouched.

    A main row that an earlier promotion made goes back to its candidate key; a main row that ran as the
    committed configuration becomes ``ablation_r_base``; a comparison run without a main row (its
    candidates named every configuration in play) just gets the chosen one as its main row.
    """
    if chosen == MAIN_KEY:
        return [dict(r) for r in rows]
    if not any(r["key"] == chosen for r in rows):
        raise ValueError(f"no row {chosen!r} to promote")
    out = []
    for row in rows:
        row = dict(row)
        if row["key"] == MAIN_KEY:
            earlier = next((k for k in CANDIDATES if row["label"] == CHOSEN_LABEL.format(k)), None)
            if earlier is not None:
                row["key"] = row["label"] = earlier
            else:
                row["key"], row["label"] = "ablation_r_base", "StatsMerging-R as committed before the ablation"
        elif row["key"] == chosen:  # an --add row has no protocol of its own: the main row's
            row["key"], row["label"], row["protocol"] = MAIN_KEY, CHOSEN_LABEL.format(chosen), MAIN_PROTOCOL
        out.append(row)
    return out


def promote(chosen: str, dirs: List[Path]) -> None:
    """Make the chosen candidate's run the main row of each results.json (see the module docstring)."""
    from fusion_bench_statsmerging.utils.artifacts import save_json  # atomic; imports torch, so only here

    if chosen == MAIN_KEY:
        return
    loaded, promoted = {}, {}
    for d in dirs:  # every folder is checked before any is written: a promotion is all or nothing
        loaded[d] = json.loads((d / "results.json").read_text())
        try:
            promoted[d] = promote_rows(loaded[d]["rows"], chosen)
        except ValueError as e:
            raise SystemExit(f"{d}: {e}; nothing was promoted") from None
    for d, results in loaded.items():
        backup = d / "results.before_promote.json"
        if not backup.exists():  # the comparison's own output is kept once, whatever is promoted later
            save_json(backup, results)
        save_json(d / "results.json", {**results, "rows": promoted[d]})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add-args", action="store_true", help="print the candidates' --add arguments")
    parser.add_argument("--only", help="with --add-args: a comma-separated subset of the candidates")
    parser.add_argument("--choose", nargs="+", type=Path, metavar="COMPARE_DIR")
    parser.add_argument("--promote", nargs="+", metavar=("KEY", "COMPARE_DIR"))
    args = parser.parse_args(argv)
    for d in [*(args.choose or []), *(args.promote or [])[1:]]:
        if not Path(d, "results.json").is_file():
            parser.error(f"{d} holds no results.json: give statsmerging-compare output folders")
    if args.only and not args.add_args:
        parser.error("--only selects candidates for --add-args; give --add-args too")
    if args.promote and args.promote[0] not in [MAIN_KEY, *CANDIDATES]:
        parser.error(f"unknown candidate '{args.promote[0]}'; known: {[MAIN_KEY, *CANDIDATES]}")
    if args.add_args:
        print(" ".join(shlex.quote(a) for a in add_args(args.only.split(",") if args.only else None)))
    if args.choose:
        scores = collect(args.choose)
        chosen = choose(scores)
        print(markdown(scores, chosen))
        print(f"\nchosen on validation: {chosen}")
    if args.promote:
        promote(args.promote[0], [Path(p) for p in args.promote[1:]])


if __name__ == "__main__":
    main()
