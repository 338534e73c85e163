"""Print a real suite's docs table from `statsmerging-compare` results (and the builder's manifest).

The comparison writes rows in the order they were asked for (longest first, to finish sooner);
the docs list them in a fixed reading order, without the memory columns, and add the builder's
label-using references (linear probe, experts as fine-tuned) from its manifest.

    python benchmarks/real_suites/tables.py docs/results/real_vision_gpu/results.json \
        --manifest docs/results/real_vision_gpu/manifest.json
    python benchmarks/real_suites/tables.py docs/results/real_vision_gpu/results.json --gap   # acceptance margin
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

ORDER = ["pretrained", "individual", "simple_average", "task_arithmetic", "ties_merging",
         "adamerging_layer_train", "adamerging_layer", "statsmerging_task", "statsmerging_layer",
         "wudi", "iso_c", "iso_cts", "tsv_m", "regmean_plusplus", "statsmerging_plusplus", "samerging",
         "statsmerging_residual"]
REFERENCES = {"linear_probe_test_accuracy": "Linear probe on the frozen pretrained backbone (builder)",
              "expert_test_accuracy": "Experts as fine-tuned (builder's manifest)"}


def _cells(values: List[Optional[float]]) -> List[str]:
    return ["" if v is None else f"{100 * v:.2f}" for v in values]


def table(results: Mapping[str, Any], manifest: Optional[Mapping[str, Any]] = None) -> str:
    """Markdown rows: each method's per-task test accuracy (%), average, wall time; failures say why."""
    tasks: List[str] = list(results["tasks"])
    # the ablation's candidate rows have their own table (ablation.py), chosen on validation
    rows: Dict[str, Mapping[str, Any]] = {r["key"]: r for r in results["rows"] if not r["key"].startswith("ablation_")}
    keys = [k for k in ORDER if k in rows] + [k for k in rows if k not in ORDER]
    lines = ["| Method | Data protocol | " + " | ".join(tasks) + " | Avg. | Time (s) |",
             "|---|---|" + "---|" * len(tasks) + "---|---|"]
    for key in keys:
        row = rows[key]
        accuracies = row.get("accuracies") or {}
        average = row.get("average")
        shown = f"**{100 * average:.2f}**" if average is not None else f"{row['status']}: {row.get('error')}"
        lines.append(f"| {row['label']} | {row['protocol']} | "
                     + " | ".join(_cells([accuracies.get(t) for t in tasks]))
                     + f" | {shown} | {row['wall_time_s']:.0f} |")
    for field, label in REFERENCES.items():
        if manifest is None or not all(field in manifest["tasks"].get(t, {}) for t in tasks):
            continue
        values = [manifest["tasks"][t][field] for t in tasks]
        lines.append(f"| {label} | labels (reference) | " + " | ".join(_cells(values))
                     + f" | {100 * sum(values) / len(values):.2f} | |")
    return "\n".join(lines)


NOT_A_MERGE = ("individual",)  # one expert per task: a reference, not a single merged model


def gap(results: Mapping[str, Any]) -> str:
    """Issue 19's acceptance line: the best row whose key starts with ``statsmerging`` against the best other
    single-merged-model row (test average), and the rows that have no average (they are not in the max)."""
    rows = [r for r in results["rows"] if not r["key"].startswith("ablation_") and r["key"] not in NOT_A_MERGE]
    ours = [r for r in rows if r["key"].startswith("statsmerging") and r.get("average") is not None]
    others = [r for r in rows if not r["key"].startswith("statsmerging") and r.get("average") is not None]
    missing = [r["key"] for r in rows if r.get("average") is None]
    if not ours or not others:
        return "no comparison: a side has no finished row"
    best, rival = max(ours, key=lambda r: r["average"]), max(others, key=lambda r: r["average"])
    line = (f"{best['key']} {100 * best['average']:.2f} vs {rival['key']} {100 * rival['average']:.2f}: "
            f"{100 * (best['average'] - rival['average']):+.2f}")
    return line + (f" (without {', '.join(missing)}: no average)" if missing else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json written by statsmerging-compare")
    parser.add_argument("--manifest", type=Path, help="the suite's manifest.json (adds the reference rows)")
    parser.add_argument("--gap", action="store_true", help="print only the best statsmerging row's margin")
    args = parser.parse_args(argv)
    for path in (args.results, args.manifest):
        if path is not None and not path.is_file():
            parser.error(f"{path} does not exist (results.json: statsmerging-compare's output; manifest.json: the builder's)")
    manifest = json.loads(args.manifest.read_text()) if args.manifest else None
    results = json.loads(args.results.read_text())
    print(gap(results) if args.gap else table(results, manifest))


if __name__ == "__main__":
    main()
