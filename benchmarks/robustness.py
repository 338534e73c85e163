"""Robustness of merged models to corrupted test images on an offline CLIP suite (Table 10).

    python benchmarks/robustness.py --suite /data/clip_suite --out results/robustness \\
        [--methods task_arithmetic,adamerging,statsmerging] [--corruptions motion_blur,impulse_noise,gaussian_noise] \\
        [--severity 3] [--tasks a,b,c,d] [--fast] [--extra-overrides '...']

Protocol: each method runs ONCE through the ``fusion_bench`` CLI (compare's launcher, one
process per method). Its merge is fitted as usual on CLEAN data (Task Arithmetic: none;
AdaMerging: layer-wise entropy minimisation on label-free clean TRAIN images via
``method=adamerging_train``, or the host's test-time AdaMerging on clean TEST images when
that config is missing, which the row then says; StatsMerging: layer-wise, teacher
distillation on label-free clean train images). The merged model it returns is then
evaluated, in the same process, by the ``clip_suite_corrupted`` task pool under every
condition in turn: ``clean`` and each corruption at ``--severity`` (1..5, ImageNet-C scale),
on the test split. Corruptions are deterministic per image (see
``fusion_bench_statsmerging.taskpool.corruptions``), so every method sees the same corrupted pixels.
Nothing is adapted to the corrupted images; this differs from the AdaMerging paper's
robustness experiment, where AdaMerging adapts at test time on the corrupted test images.

Outputs under ``--out``: ``robustness.md`` (a summary of averages per condition, then one
table per condition with per-task accuracy), ``robustness.csv`` (one line per method and
condition), ``robustness.json`` and ``runs/<method>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generalization.py, next to this file
from generalization import (  # noqa: E402
    adamerging_spec, add_common_args, complete_mean, list_override, make_context, md_row, mean, parse_methods,
    pct, run_all, run_row, status_text, write_csv,
)

from fusion_bench_statsmerging import compare  # noqa: E402
from fusion_bench_statsmerging.taskpool.corruptions import (  # noqa: E402
    CLEAN, CORRUPTIONS, check_corruption, condition_accuracies,
)
from fusion_bench_statsmerging.modelpool.clip_suite import read_suite_tasks  # noqa: E402

DEFAULT_METHODS = ["task_arithmetic", "adamerging", "statsmerging"]


def method_specs() -> Dict[str, compare.MethodSpec]:
    reg = compare.REGISTRY
    return {
        "pretrained": reg["pretrained"],
        "task_arithmetic": reg["task_arithmetic"],
        "adamerging": dataclasses.replace(adamerging_spec(), label="AdaMerging (layer-wise)"),
        "statsmerging": reg["statsmerging_layer"],
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="robustness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, DEFAULT_METHODS)
    p.add_argument("--corruptions", default=",".join(CORRUPTIONS),
                   help=f"comma-separated corruptions (default: {','.join(CORRUPTIONS)}); clean is always added")
    p.add_argument("--severity", type=int, default=3, help="1..5 (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption noise (default 0)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the suite's tasks (default: all)")
    return p.parse_args(argv)


def summary(rows: List[Dict[str, Any]], conditions: List[str], tasks: List[str], meta: Dict[str, Any]) -> str:
    lines = ["# Robustness to corrupted test images", "",
             f"Suite `{meta['suite']}`; tasks {', '.join(tasks)}; severity {meta['severity']}; accuracy in % on "
             f"the test splits; merges fitted on clean data only; {meta['created']}"
             f"{'; fast mode' if meta['fast'] else ''}.", "", "## Average accuracy per condition", ""]
    head = ["Method", "Fit data", *conditions, "Corrupted avg", "Drop vs clean", "Time (s)", "Status"]
    lines += [md_row(head), "|" + "---|" * len(head)]
    for r in rows:
        avgs = r.get("condition_averages") or {}
        corrupted = mean([avgs.get(c) for c in conditions if c != CLEAN]) if avgs else None
        drop = None if corrupted is None or avgs.get(CLEAN) is None else avgs[CLEAN] - corrupted
        lines.append(md_row([r["label"], r["fit_data"], *[pct(avgs.get(c)) for c in conditions], pct(corrupted),
                             pct(drop), "" if r.get("wall_time_s") is None else f"{r['wall_time_s']:.1f}",
                             status_text(r)]))
    for c in conditions:
        lines += ["", f"## {c}" + ("" if c == CLEAN else f" (severity {meta['severity']})"), ""]
        head = ["Method", *tasks, "Avg"]
        lines += [md_row(head), "|" + "---|" * len(head)]
        for r in rows:
            accs = (r.get("by_condition") or {}).get(c, {})
            lines.append(md_row([r["label"], *[pct(accs.get(t)) for t in tasks],
                                 pct((r.get("condition_averages") or {}).get(c))]))
    lines += ["", "## Commands", ""] + [f"- {r['label']}: `{r['command']}`" for r in rows if r.get("command")]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows, conditions, tasks, meta) -> str:
    md = summary(rows, conditions, tasks, meta)
    (out / "robustness.md").write_text(md)
    header = ["method", "key", "fit_data", "condition", "severity", *tasks, "average", "status", "error"]
    lines = []
    for r in rows:
        for c in conditions:
            accs = (r.get("by_condition") or {}).get(c, {})
            avg = (r.get("condition_averages") or {}).get(c)
            lines.append([r["label"], r["key"], r["fit_data"], c, "" if c == CLEAN else meta["severity"],
                          *[accs.get(t, "") for t in tasks], "" if avg is None else avg, r["status"],
                          r.get("error") or ""])
    write_csv(out / "robustness.csv", header, lines)
    (out / "robustness.json").write_text(json.dumps({**meta, "conditions": conditions, "tasks": tasks, "rows": rows},
                                                    indent=2, default=str))
    return md


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.out, args.suite = args.out.resolve(), args.suite.resolve()  # children run in their own cwd
    all_tasks = list(read_suite_tasks(args.suite))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else all_tasks
    unknown = [t for t in tasks if t not in all_tasks]
    if unknown or len(tasks) < 2:
        raise SystemExit(f"--tasks must name at least two of the suite's tasks {all_tasks}; got {tasks}")
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip() and c.strip() != CLEAN]
    for c in corruptions:
        try:
            check_corruption(c, args.severity)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
    conditions = [CLEAN, *corruptions]
    defs = method_specs()
    keys = parse_methods(args.methods, list(defs))

    ctx = make_context(args, "clip_suite_corrupted")
    ctx.extra_overrides += [list_override("taskpool.corruption", conditions), f"taskpool.severity={args.severity}",
                            f"taskpool.seed={args.seed}"]
    if args.tasks:
        ctx.extra_overrides += [list_override("modelpool.tasks", tasks), list_override("taskpool.tasks", tasks)]
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ctx.cache_dir, ignore_errors=True)
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "suite": str(args.suite), "fast": args.fast,
            "severity": args.severity, "seed": args.seed, "argv": list(sys.argv[1:] if argv is None else argv),
            "protocol": "merge fitted once on clean data; evaluated on clean and corrupted test images"}
    def make_row(key: str) -> Dict[str, Any]:
        row = run_row(dataclasses.replace(defs[key], key=key), ctx)
        protocol = row.get("protocol", "")  # compare's text, following any --set protocol override
        fit_data = protocol + ("" if protocol == compare.NO_DATA else ", clean images")
        by_condition = condition_accuracies(row.get("accuracies") or {})
        averages = {c: complete_mean(accs, tasks) for c, accs in by_condition.items()}
        row.update(fit_data=fit_data, by_condition=by_condition,
                   condition_averages={c: a for c, a in averages.items() if a is not None})
        missing = [c for c in conditions if c not in row["condition_averages"]]
        if row["status"] == "ok" and missing:
            row.update(status="incomplete", error=f"report lacks conditions {missing}")
        return row

    return run_all(keys, make_row, lambda rows: write_outputs(args.out, rows, conditions, tasks, meta))

if __name__ == "__main__":
    sys.exit(main())
