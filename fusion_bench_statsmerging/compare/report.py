"""Reading a finished row (status, accuracies, error) and writing the comparison's result files.

:func:`collect_report` turns a run's exit code, ``program_report.json`` and stderr into a row;
:func:`write_outputs` writes ``results.md`` / ``.csv`` / ``.json`` / ``.png`` from the rows.
"""

from __future__ import annotations

import csv
import json
import math
import re
import signal
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .budget import budget_cells
from .rows import PROTOCOL_NOTE, MethodSpec


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



# --------------------------------------------------------------------------- outputs
BUDGET_NOTE = (
    "Budget: unlabeled images per task a row fitted on, its optimisation steps (start probes and searches "
    "included), forward+backward passes per step (2 under SAM), and which state it kept; read from each run's "
    "own report where it writes one, else from the row's settings. 'Settings chosen' says where a row's "
    "settings come from. Margins between rows of unequal budget are not a comparison of methods.")


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
    head = ["Method", "Data protocol", *tasks, "Avg.", "Images/task", "Steps", "Passes/step", "Selection",
            "Settings chosen", "Time (s)", "Peak RSS (MiB)", "Peak CUDA (MiB)", "Status"]
    lines = ["# Model merging comparison", "",
             f"modelpool `{meta['modelpool']}`, taskpool `{meta['taskpool']}`; accuracy in %; "
             f"{meta['created']}{'; fast mode' if meta.get('fast') else ''}.", ""]
    if meta.get("jobs", 1) > 1:
        lines += [f"**{meta['jobs']} methods ran at a time (`--jobs {meta['jobs']}`)**: their wall times "
                  "overlap and include contention for the GPU and CPU, so they are not comparable "
                  "to a serial run's; peak memory is still measured per process.", ""]
    lines += [PROTOCOL_NOTE, "", BUDGET_NOTE, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accs = r.get("accuracies") or {}
        status = "ok" if r["status"] == "ok" else f"{r['status']}: {r.get('error') or ''}"
        cells = [r["label"], r["protocol"], *[_pct(accs.get(t)) for t in tasks], _pct(r.get("average")),
                 *budget_cells(r.get("budget")).values(), r.get("settings", ""), _num(r.get("wall_time_s")),
                 _num(r.get("peak_rss_mib"), "{:.0f}"), _num(r.get("peak_cuda_mib"), "{:.0f}"), status]
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
    cols = ["method", "key", "protocol", *tasks, "average", "images_per_task", "steps", "passes_per_step",
            "selection", "settings", "wall_time_s", "peak_rss_mib", "peak_cuda_mib", "status", "error"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            accs = r.get("accuracies") or {}
            w.writerow([r["label"], r["key"], r["protocol"], *[accs.get(t, "") for t in tasks],
                        "" if r.get("average") is None else r["average"],
                        *budget_cells(r.get("budget")).values(), r.get("settings", ""),
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
    ax.set_yticks(ys, [_budget_label(r) for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(0, 110)
    ax.set_xlabel("average accuracy (%)")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in protocols]
    ax.legend(handles, protocols, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=2, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _budget_label(row: Mapping[str, Any]) -> str:
    """A bar's label with its budget, so the chart never compares rows of unequal budget silently."""
    cells = budget_cells(row.get("budget"))
    if not cells["steps"] or cells["steps"] == "0":
        return row["label"] + (" [no training]" if cells["steps"] == "0" else "")
    return f"{row['label']} [{cells['images/task']} img/task, {cells['steps']} steps x{cells['passes/step']}]"


def write_outputs(out: Path, rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    """Write the four result files and return the markdown."""
    tasks = task_order(rows)
    md = markdown(rows, tasks, meta)
    (out / "results.md").write_text(md)
    write_csv(out / "results.csv", rows, tasks)
    (out / "results.json").write_text(json.dumps({**meta, "tasks": tasks, "rows": rows}, indent=2))
    plot(out / "results.png", rows, f"{meta['modelpool']} / {meta['taskpool']}")
    return md
