"""Generalisation to unseen tasks on an offline CLIP suite (the StatsMerging paper's Table 2).

    python benchmarks/generalization.py --suite /data/clip_suite --out results/generalization \\
        [--seen a,b,c,d,e,f] [--unseen g,h] [--methods ...] [--fast] [--extra-overrides '...']

Default split: the suite's first tasks are seen and its last two unseen (6 + 2 on an
eight-task suite; with fewer tasks, at least two stay seen). Every run goes through the
``fusion_bench`` CLI in its own process (``fusion_bench_statsmerging.compare``'s launcher:
wall time and peak memory per row, a crash only costs its row).

Protocol ``seen experts`` (Table 2, which follows AdaMerging's generalisation experiment):
the merged model is built from the experts of the SEEN tasks only; any coefficients are
fitted on data of the seen tasks only; the model is then evaluated on the test splits of the
seen and of the unseen tasks (each task scored with its zero-shot head). No image, label or
expert of an unseen task is used before evaluation.

- ``pretrained``: the pretrained model (zero-shot reference), no merging;
- ``task_arithmetic``: Task Arithmetic, lambda = 0.3, over the seen experts (no data);
- ``adamerging``: layer-wise AdaMerging (entropy minimisation) over the seen experts, fitted
  on label-free TRAIN images of the seen tasks (``method=adamerging_train``). Where that
  config is missing, the host's AdaMerging is used and the row says that it adapted on the
  seen tasks' unlabeled TEST images;
- ``statsmerging``: layer-wise StatsMerging over the seen experts, its learner trained by
  teacher distillation on label-free train images of the seen tasks (the default protocol).

Protocol ``transfer`` (learner reuse, experimental; not in the paper's table): the experts of
ALL tasks (seen and unseen) are merged, but no data of the unseen tasks is used:

- ``statsmerging_reuse``: the learner trained in the ``statsmerging`` row (on the seen pool,
  with seen tasks' train images) predicts the coefficients of the all-experts pool from its
  weight statistics, without training and without reading any image
  (``method=statsmerging_reuse``, ``max_steps: 0``, saved normaliser); ``--learner PATH``
  uses another saved learner instead;
- ``task_arithmetic_all``: Task Arithmetic, lambda = 0.3, over all experts (no data): the
  data-free reference of the transfer rows.

Outputs under ``--out``: ``generalization.md`` (table: per-task accuracy, seen average,
unseen average), ``generalization.csv``, ``generalization.json`` and ``runs/<row>/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from fusion_bench_statsmerging import compare
from fusion_bench_statsmerging.compare.runner import _hydra_value
from fusion_bench_statsmerging.modelpool.clip_suite import read_suite_tasks

SEEN_EXPERTS = "seen experts"
TRANSFER = "transfer"
DEFAULT_METHODS = ["pretrained", "task_arithmetic", "adamerging", "statsmerging", "statsmerging_reuse",
                   "task_arithmetic_all"]


# --------------------------------------------------------------------------- shared with robustness.py
def add_common_args(p: argparse.ArgumentParser, default_methods: Sequence[str]) -> None:
    p.add_argument("--suite", type=Path, required=True, help="suite directory (benchmarks/build_clip_suite.py)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--methods", default=",".join(default_methods),
                   help=f"comma-separated rows (default: {','.join(default_methods)})")
    p.add_argument("--fast", action="store_true", help="smoke run: few optimisation steps for fitted methods")
    p.add_argument("--fast-steps", type=int, default=5, help="max_steps used by --fast (default 5)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run (default 3 h)")
    p.add_argument("--extra-overrides", action="append", default=[], metavar="OVERRIDES",
                   help="Hydra overrides for every run (shell-split; repeatable), e.g. 'fabric.accelerator=cpu'")
    p.add_argument("--set", action="append", default=[], metavar="ROW:OVERRIDE",
                   help="a Hydra override for one row, e.g. statsmerging:method.max_steps=200")


def make_context(args: argparse.Namespace, taskpool: str) -> compare.Context:
    """compare's run context for the suite pools (STATSMERGING_SUITE_DIR set for the children),
    built through compare's own argument parser so that its defaults apply."""
    argv = ["--modelpool", "clip_suite", "--taskpool", taskpool, "--suite", str(args.suite), "--out", str(args.out),
            "--timeout", str(args.timeout), "--fast-steps", str(args.fast_steps)]
    argv += ["--fast"] if args.fast else []
    argv += [a for o in args.extra_overrides for a in ("--extra-overrides", o)]
    argv += [a for o in args.set for a in ("--set", o)]
    return compare.build_context(compare.parse_args(argv))


def parse_methods(text: str, known: Sequence[str]) -> List[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown or not keys:
        raise SystemExit(f"unknown or no method(s) {unknown or keys}; known: {', '.join(known)}")
    return keys


def list_override(key: str, values: Sequence[str]) -> str:
    return f"{key}=[{','.join(values)}]"


def has_method_config(name: str) -> bool:
    return resources.files("fusion_bench_statsmerging.config").joinpath("method", f"{name}.yaml").is_file()


def adamerging_spec() -> compare.MethodSpec:
    """Layer-wise AdaMerging on label-free train images; the host's test-time variant if the
    train-split config is not installed (its row then says so)."""
    if has_method_config("adamerging_train") and "adamerging_layer_train" in compare.REGISTRY:
        return compare.REGISTRY["adamerging_layer_train"]
    return compare.REGISTRY["adamerging_layer"]


def run_row(spec: compare.MethodSpec, ctx: compare.Context) -> Dict[str, Any]:
    print(f"[{ctx.out.name}] {spec.label} ...", file=sys.stderr, flush=True)
    row = compare.launch(spec, ctx)
    print(f"[{ctx.out.name}] {spec.label}: {row['status']} in {row['wall_time_s']:.1f} s"
          + (f" ({row['error']})" if row.get("error") else ""), file=sys.stderr, flush=True)
    return row


def run_all(keys: Sequence[str], make_row: Callable[[str], Dict[str, Any]],
            write: Callable[[List[Dict[str, Any]]], str]) -> int:
    """Run the rows in order, rewriting the outputs after each (partial results survive an
    interruption); print the table; exit code 1 if any row did not succeed."""
    rows: List[Dict[str, Any]] = []
    for key in keys:
        rows.append(make_row(key))
        write(rows)
    print(write(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def skipped(spec: compare.MethodSpec, reason: str) -> Dict[str, Any]:
    return {"key": spec.key, "label": spec.label, "status": "skipped", "error": reason, "accuracies": {},
            "wall_time_s": None, "command": "", "overrides": list(spec.overrides)}


def pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def complete_mean(accs: Dict[str, float], tasks: Sequence[str]) -> Optional[float]:
    """Mean accuracy over ``tasks``, or None unless every one of them was evaluated."""
    return mean([accs[t] for t in tasks]) if all(t in accs for t in tasks) else None


def md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def status_text(row: Dict[str, Any]) -> str:
    return "ok" if row["status"] == "ok" else f"{row['status']}: {(row.get('error') or '')[:200]}"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# --------------------------------------------------------------------------- this protocol
@dataclasses.dataclass(frozen=True)
class Row:
    """A row of the table: the compare spec to run, which experts it merges and what it fitted on."""

    spec: compare.MethodSpec
    protocol: str
    experts: str  # "seen" | "all"
    needs: Optional[Path] = None  # a file an earlier row writes (the reused learner)


def split_tasks(all_tasks: List[str], seen: Optional[str], unseen: Optional[str]) -> tuple[List[str], List[str]]:
    """Seen and unseen task lists from the options (defaults in the module docstring)."""
    def parse(text):
        return [t.strip() for t in text.split(",") if t.strip()]

    if seen is None and unseen is None:
        n_unseen = min(2, max(1, len(all_tasks) - 2))
        s, u = all_tasks[:-n_unseen], all_tasks[-n_unseen:]
    elif unseen is None:
        s = parse(seen)
        u = [t for t in all_tasks if t not in s]
    elif seen is None:
        u = parse(unseen)
        s = [t for t in all_tasks if t not in u]
    else:
        s, u = parse(seen), parse(unseen)
    unknown = [t for t in s + u if t not in all_tasks]
    if unknown:
        raise SystemExit(f"tasks {unknown} are not in the suite; it has {all_tasks}")
    if set(s) & set(u):
        raise SystemExit(f"tasks {sorted(set(s) & set(u))} are both seen and unseen")
    if len(s) < 2 or not u:
        raise SystemExit(f"need at least two seen tasks (merging needs two experts) and one unseen task; "
                         f"got seen={s}, unseen={u}")
    return s, u


def build_rows(seen: List[str], unseen: List[str], learner: Optional[Path], ctx: compare.Context) -> Dict[str, Row]:
    seen_pool = (list_override("modelpool.tasks", seen),)
    all_pool = (list_override("modelpool.tasks", seen + unseen),)
    reg = compare.REGISTRY

    def variant(key: str, base: compare.MethodSpec, pool, label: str, *extra: str) -> compare.MethodSpec:
        return dataclasses.replace(base, key=key, label=label, overrides=base.overrides + pool + extra)

    learner = learner or (ctx.run_dir("statsmerging") / "artifacts" / "learner.pt").resolve()
    reuse_overrides = ("method=statsmerging_reuse", f"method.learner_path={_hydra_value(learner)}")
    reuse = compare.MethodSpec("statsmerging_reuse", "StatsMerging, reused learner (all experts)",
                               reuse_overrides + all_pool, "no data (saved learner)")
    return {
        "pretrained": Row(variant("pretrained", reg["pretrained"], seen_pool, "Pretrained (zero-shot)"),
                          SEEN_EXPERTS, "none"),
        "task_arithmetic": Row(variant("task_arithmetic", reg["task_arithmetic"], seen_pool,
                                       "Task Arithmetic (λ=0.3)"), SEEN_EXPERTS, "seen"),
        "adamerging": Row(variant("adamerging", adamerging_spec(), seen_pool, "AdaMerging (layer-wise)"),
                          SEEN_EXPERTS, "seen"),
        "statsmerging": Row(variant("statsmerging", reg["statsmerging_layer"], seen_pool, "StatsMerging (layer-wise)",
                                    "method.artifact_dir={run_dir}/artifacts"), SEEN_EXPERTS, "seen"),
        "statsmerging_reuse": Row(reuse, TRANSFER, "all", needs=learner),
        "task_arithmetic_all": Row(variant("task_arithmetic_all", reg["task_arithmetic"], all_pool,
                                           "Task Arithmetic (λ=0.3, all experts)"), TRANSFER, "all"),
    }


def table(rows: List[Dict[str, Any]], seen: List[str], unseen: List[str], meta: Dict[str, Any]) -> str:
    head = ["Method", "Protocol", "Merged experts", "Fit data", *seen, "Seen avg", *unseen, "Unseen avg",
            "Time (s)", "Status"]
    lines = ["# Generalisation to unseen tasks", "",
             f"Suite `{meta['suite']}`; seen tasks {', '.join(seen)}; unseen tasks {', '.join(unseen)}; "
             f"accuracy in % on the test splits; {meta['created']}{'; fast mode' if meta['fast'] else ''}.", "",
             f"- **{SEEN_EXPERTS}** (Table 2's protocol): only the seen tasks' experts are merged and only seen "
             "tasks' data is used; unseen columns measure generalisation.",
             f"- **{TRANSFER}** (learner reuse, experimental): all experts are merged, no data of the unseen "
             "tasks is used; the reused learner reads no image at all.", "",
             md_row(head), "|" + "---|" * len(head)]
    for r in rows:
        accs = r.get("accuracies") or {}
        lines.append(md_row([r["label"], r["table_protocol"], r["experts"], r["fit_data"],
                             *[pct(accs.get(t)) for t in seen], pct(r.get("seen_average")),
                             *[pct(accs.get(t)) for t in unseen], pct(r.get("unseen_average")),
                             "" if r.get("wall_time_s") is None else f"{r['wall_time_s']:.1f}", status_text(r)]))
    lines += ["", "## Commands", ""] + [f"- {r['label']}: `{r['command']}`" for r in rows if r.get("command")]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, rows, seen, unseen, meta) -> str:
    md = table(rows, seen, unseen, meta)
    (out / "generalization.md").write_text(md)
    header = ["method", "key", "protocol", "merged_experts", "fit_data", *seen, "seen_average", *unseen,
              "unseen_average", "wall_time_s", "status", "error"]
    write_csv(out / "generalization.csv", header, [
        [r["label"], r["key"], r["table_protocol"], r["experts"], r["fit_data"],
         *[(r.get("accuracies") or {}).get(t, "") for t in seen], r.get("seen_average") or "",
         *[(r.get("accuracies") or {}).get(t, "") for t in unseen], r.get("unseen_average") or "",
         r.get("wall_time_s") or "", r["status"], r.get("error") or ""] for r in rows])
    (out / "generalization.json").write_text(json.dumps({**meta, "seen": seen, "unseen": unseen, "rows": rows},
                                                        indent=2, default=str))
    return md


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generalization", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, DEFAULT_METHODS)
    p.add_argument("--seen", default=None, help="comma-separated seen tasks (default: all but the last two)")
    p.add_argument("--unseen", default=None, help="comma-separated unseen tasks (default: the last two)")
    p.add_argument("--learner", type=Path, default=None,
                   help="learner.pt for the statsmerging_reuse row (default: the statsmerging row's)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.out, args.suite = args.out.resolve(), args.suite.resolve()  # children run in their own cwd
    seen, unseen = split_tasks(list(read_suite_tasks(args.suite)), args.seen, args.unseen)
    ctx = make_context(args, "clip_suite")
    ctx.extra_overrides.append(list_override("taskpool.tasks", seen + unseen))
    rows_def = build_rows(seen, unseen, args.learner.resolve() if args.learner else None, ctx)
    keys = parse_methods(args.methods, list(rows_def))
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(ctx.cache_dir, ignore_errors=True)
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "suite": str(args.suite.resolve()), "fast": args.fast,
            "argv": list(sys.argv[1:] if argv is None else argv), "protocols": {
                SEEN_EXPERTS: "merge the seen tasks' experts; fit on seen tasks' data only; test on seen + unseen",
                TRANSFER: "merge all experts; no data of unseen tasks; reused learner reads no image"}}
    protocols: Dict[str, str] = {}  # row key -> compare's data-protocol text, once it ran

    def make_row(key: str) -> Dict[str, Any]:
        rd = rows_def[key]
        if rd.needs is not None and not rd.needs.is_file():
            row = skipped(rd.spec, f"no learner at {rd.needs} (run the statsmerging row first, or pass --learner)")
        else:
            row = run_row(rd.spec, ctx)
        protocols[key] = row.get("protocol", "")
        if key == "statsmerging_reuse":  # compare cannot know what the reused learner was fitted on
            origin = (f"the statsmerging row's: {protocols['statsmerging']}, seen tasks only"
                      if args.learner is None and "statsmerging" in protocols else f"{rd.needs}")
            fit_data = f"none (learner: {origin})"
        else:
            fit_data = protocols[key] + ("" if protocols[key] == compare.NO_DATA else ", seen tasks only")
        accs = row.get("accuracies") or {}
        row.update(table_protocol=rd.protocol, experts=rd.experts, fit_data=fit_data,
                   seen_average=complete_mean(accs, seen), unseen_average=complete_mean(accs, unseen))
        return row

    return run_all(keys, make_row, lambda rows: write_outputs(args.out, rows, seen, unseen, meta))

if __name__ == "__main__":
    sys.exit(main())
