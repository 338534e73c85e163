"""The evidence: every evidence row over several builds of each real suite, with intervals.

Raw runs (never edited): ``docs/results/evidence/<suite>/seed<k>/`` hold one ``statsmerging-compare
--methods evidence`` output each (``evidence_campaign.sh``'s comparison of build ``k``) and the builder's
``manifest.json`` (test-set sizes). This command derives ``docs/results/evidence/summary.json`` and the
README's table from them:

    python benchmarks/real_suites/evidence.py --unpack campaign.tgz --seed 1   # a lease's runs -> raw folders
    python benchmarks/real_suites/evidence.py                                 # summary.json + the table
    python benchmarks/real_suites/evidence.py --readme README.md              # ... and the README's table

Per suite: each row's mean and standard deviation over builds, its budget; the headline gap (the best
StatsMerging row against the best other merge, by mean) and the learner's contribution (StatsMerging-R
minus free coefficients at its budget), each a mean with a 95 % interval from a two-level bootstrap:
builds resampled with replacement, then each resampled build's test images (per task, a binomial draw
at the row's accuracy and the task's test size; the two rows drawn independently, which ignores that
they share the images and so errs wide). With one build only the test images are resampled.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[2] / "docs" / "results" / "evidence"
SUITES = ("vision", "hetero", "text")
REFERENCES = ("pretrained", "individual")
RECOMMENDED, FREE = "statsmerging_residual", "samerging_matched"
ABLATIONS = (FREE, "statsmerging_learner_matched")  # ours with a part removed: not a peer, not a pick
DRAWS = 4000

# (accuracy of row a, accuracy of row b, test images) per task, for one build
Build = Mapping[str, Tuple[float, float, int]]


# --------------------------------------------------------------------------- intervals
def bootstrap_difference(builds: Sequence[Build], draws: int = DRAWS, seed: int = 0) -> Dict[str, object]:
    """Mean over builds of (a - b), the task-averaged accuracy difference, with a 95 % percentile
    interval: builds resampled with replacement (when there are several), and in each its test images
    (per task a binomial draw at each row's accuracy; independent draws, so the interval errs wide)."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([np.mean([a - b for a, b, _ in build.values()]) for build in builds]))
    stats = np.empty(draws)
    for i in range(draws):
        picked = rng.integers(0, len(builds), len(builds)) if len(builds) > 1 else [0]
        gaps = []
        for j in picked:
            build = builds[j]
            n = np.array([t[2] for t in build.values()])
            a = rng.binomial(n, [t[0] for t in build.values()]) / n
            b = rng.binomial(n, [t[1] for t in build.values()]) / n
            gaps.append(float(np.mean(a - b)))
        stats[i] = np.mean(gaps)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": point, "ci95": [float(lo), float(hi)], "n_builds": len(builds),
            "interval": "bootstrap: builds with replacement, then test images per task (binomial, unpaired)"}


# --------------------------------------------------------------------------- reading raw runs
def _ok_rows(results: Mapping) -> Dict[str, Mapping]:
    return {r["key"]: r for r in results["rows"] if r.get("status") == "ok" and r.get("accuracies")}


def load_builds(root: Path, suite: str) -> List[Tuple[str, Mapping, Mapping[str, int]]]:
    """(build name, results.json, test size per task) of each build of a suite, in seed order."""
    builds = []
    for folder in sorted((root / suite).glob("seed*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        results = json.loads((folder / "results.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
        sizes = {t: int(v["sizes"]["test"]) for t, v in manifest["tasks"].items()}
        builds.append((folder.name, results, sizes))
    return builds


def _pair(builds, a: str, b: str) -> List[Build]:
    """Per build where both rows ran: task -> (acc a, acc b, test images)."""
    out = []
    for _, results, sizes in builds:
        rows = _ok_rows(results)
        if a in rows and b in rows:
            out.append({t: (rows[a]["accuracies"][t], rows[b]["accuracies"][t], sizes[t])
                        for t in rows[a]["accuracies"]})
    return out


def _ours(key: str) -> bool:
    return key.startswith("statsmerging") and key not in ABLATIONS


def suite_summary(builds, draws: int = DRAWS) -> Dict[str, object]:
    """The summary.json entry of one suite (see the module docstring)."""
    rows: Dict[str, Dict[str, object]] = {}
    for name, results, _ in builds:
        for key, row in _ok_rows(results).items():
            entry = rows.setdefault(key, {"label": row["label"], "protocol": row["protocol"],
                                          "settings": row.get("settings", ""), "budget": row.get("budget", {}),
                                          "averages": {}, "wall_time_s": {}})
            entry["averages"][name] = row["average"]
            entry["wall_time_s"][name] = row.get("wall_time_s")
    for entry in rows.values():
        values = list(entry["averages"].values())
        entry.update(mean=float(np.mean(values)), n=len(values),
                     std=float(np.std(values, ddof=1)) if len(values) > 1 else None)
    merges = {k: v for k, v in rows.items() if k not in REFERENCES and k not in ABLATIONS}
    full = [k for k, v in merges.items() if v["n"] == len(builds)]  # a pick ran on every build
    ours = max((k for k in full if _ours(k)), key=lambda k: rows[k]["mean"], default=None)
    peer = max((k for k in full if not _ours(k)), key=lambda k: rows[k]["mean"], default=None)
    summary: Dict[str, object] = {"n_seeds": len(builds), "builds": [b[0] for b in builds], "rows": rows}
    if ours and peer:
        summary["gap"] = {"ours": ours, "peer": peer, **bootstrap_difference(_pair(builds, ours, peer), draws)}
    pairs = _pair(builds, RECOMMENDED, FREE)
    if pairs:
        summary["learner_contribution"] = {"minuend": RECOMMENDED, "subtrahend": FREE,
                                           **bootstrap_difference(pairs, draws)}
    return summary


def summarize(root: Path = ROOT, draws: int = DRAWS) -> Dict[str, object]:
    return {suite: suite_summary(load_builds(root, suite), draws) for suite in SUITES
            if (root / suite).is_dir() and list((root / suite).glob("seed*"))}


# --------------------------------------------------------------------------- the table
def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def _interval(entry: Mapping) -> str:
    lo, hi = entry["ci95"]
    return f"{100 * entry['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def markdown(summary: Mapping[str, Mapping]) -> str:
    """The README's results table: per suite and row, mean ± sd over builds (n), with its budget."""
    suites = [s for s in SUITES if s in summary]
    keys: List[str] = []
    for s in suites:
        keys += [k for k in summary[s]["rows"] if k not in keys]
    head = ["Method", *[f"{s} (n={summary[s]['n_seeds']})" for s in suites], "Images/task", "Steps (x passes)",
            "Selection", "Settings chosen"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        entry = next(summary[s]["rows"][key] for s in suites if key in summary[s]["rows"])
        cells = [entry["label"]]
        for s in suites:
            e = summary[s]["rows"].get(key)
            cells.append("" if e is None else _pct(e["mean"]) + ("" if e["std"] is None else f" ± {100 * e['std']:.2f}"))
        b = entry["budget"]
        steps, images = b.get("steps"), b.get("images_per_task", "")
        if isinstance(images, list):  # per task (capped at each task's train split)
            images = f"{images[0]}-{images[-1]}" if len(images) > 1 else str(images[0])
        cells += [str(images), "" if steps is None else f"{steps} (x{b.get('passes_per_step')})",
                  str(b.get("selection", "")), entry["settings"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines.append("")
    for s in suites:
        gap, learner = summary[s].get("gap"), summary[s].get("learner_contribution")
        parts = []
        if gap:
            parts.append(f"best of ours ({gap['ours']}) minus best other merge ({gap['peer']}): {_interval(gap)}")
        if learner:
            parts.append(f"the learner's contribution ({RECOMMENDED} minus {FREE}): {_interval(learner)}")
        lines.append(f"- **{s}**: " + ("; ".join(parts) + " points (mean [95 % interval])" if parts else
                                        "no StatsMerging row finished on every build: no gap"))
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- evidence table: begin (benchmarks/real_suites/evidence.py --readme README.md) -->", \
    "<!-- evidence table: end -->"


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between the evidence markers replaced by ``table``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"evidence.py: error: the README has no '{BEGIN}' ... '{END}' markers to write between")
    head, rest = text.split(BEGIN, 1)
    return head + BEGIN + "\n" + table + rest[rest.index(END):]


# --------------------------------------------------------------------------- unpacking a lease's runs
KEEP = re.compile(r"(results\.(json|md|csv|png)|program_report\.json|\w+_report\.json|start_probe\.json|"
                  r"coefficients_heatmap\.png)$")  # no logs (progress bars: megabytes), weights or checkpoints


def unpack(archive: Path, seed: int, root: Path = ROOT) -> List[Path]:
    """A campaign archive (pack_campaign.sh) -> ``root/<suite>/seed<seed>/``: each comparison's result
    files, its runs' reports, and the builder's manifest. Refuses to overwrite a build already there."""
    written = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        real = Path(tmp) / "real"
        for suite in SUITES:
            compare = real / f"compare_{suite}"
            if not (compare / "results.json").is_file():
                continue
            dest = root / suite / f"seed{seed}"
            if dest.exists():
                raise SystemExit(f"{dest} exists: a raw run is never replaced; unpack another seed")
            for path in compare.rglob("*"):
                if path.is_file() and KEEP.search(path.name) and "cache" not in path.parts:
                    target = dest / path.relative_to(compare)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
            manifest = real / "manifests" / f"{'vision' if suite == 'hetero' else suite}.json"
            shutil.copy2(manifest, dest / "manifest.json")
            written.append(dest)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="raw runs' folder (default docs/results/evidence)")
    parser.add_argument("--unpack", type=Path, metavar="CAMPAIGN_TGZ", help="add a lease's runs as build --seed")
    parser.add_argument("--seed", type=int, help="with --unpack: the seed the suites were built with")
    parser.add_argument("--draws", type=int, default=DRAWS, help="bootstrap draws")
    parser.add_argument("--readme", type=Path, help="also write the table between the evidence markers of this file")
    args = parser.parse_args(argv)
    if args.unpack:
        if args.seed is None:
            parser.error("--unpack needs --seed (the seed of the builds it holds)")
        if not args.unpack.is_file():
            parser.error(f"{args.unpack} does not exist: give the campaign.tgz a lease brought back")
        for d in unpack(args.unpack, args.seed, args.root):
            print(f"wrote {d}")
    summary = summarize(args.root, args.draws)
    if not summary:
        print(f"evidence.py: error: no build under {args.root}/<suite>/seed*/", file=sys.stderr)
        return 2
    (args.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    if args.readme:
        args.readme.write_text(replace_table(args.readme.read_text(), table))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
