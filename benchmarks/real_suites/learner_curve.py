"""Where the statistics learner should win: the data curve (issue 31), learner against free coefficients
at the same budget for each number of unlabeled images per task.

For each ``--images`` value N the suite's comparison runs the learner rows and free coefficients with
``statsmerging-compare --budget images=N,steps=...`` (the same steps, probes and label-free selection at every
point; only the images change), into ``OUT/<suite>/images<N>/seed<k>/``. ``--summary`` derives
``OUT/summary.json`` (per suite ``{"curve": {N: {"rows": ..., "learner_minus_free": {"mean", "ci95"}}},
"reuse": ...}``) and ``OUT/curve.png`` (accuracy against images per task; mean over builds, 95 % interval of the
test images' binomial spread and the builds'):

    python benchmarks/real_suites/learner_curve.py run SUITE_DIR --suite-name vision --seed 1 --out docs/results/learner \\
        --images 16,64,256,4000 --budget-rest steps=3000,starts=2,probe_steps=300 -- --extra-overrides "fabric.accelerator=cuda"
    python benchmarks/real_suites/learner_curve.py summary --out docs/results/learner
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence  # noqa: E402  (the raw-run reader and the interval)

ROWS = ["statsmerging_residual", "samerging_matched", "statsmerging_learner_matched"]
REUSE_NOT_RUN = {"status": "not run: the data-free reuse table needs GPU builds of the three suites "
                           "(a learner trained on some and applied unchanged to the others)"}


def run(suite: Path, name: str, seed: int, out: Path, images: Sequence[int], rest: str,
        compare_args: Sequence[str], rows: Sequence[str] = ROWS) -> List[Path]:
    """One comparison per point of the curve; each writes its raw folder (never replaced) and the manifest."""
    if not (suite / "manifest.json").is_file():
        raise SystemExit(f"learner_curve.py: error: {suite} holds no manifest.json: give a suite a builder of "
                         "benchmarks/real_suites/ wrote")
    written = []
    for n in images:
        dest = out / name / f"images{n}" / f"seed{seed}"
        if dest.exists():
            raise SystemExit(f"{dest} exists: a raw run is never replaced")
        code = subprocess.run([sys.executable, "-m", "fusion_bench_statsmerging.compare", "--suite", str(suite),
                               "--out", str(dest), "--methods", ",".join(rows), "--budget", f"images={n},{rest}",
                               *compare_args]).returncode
        if code:
            raise SystemExit(f"learner_curve.py: error: the comparison at {n} images per task ended with exit "
                             f"{code} (its output above; its folder, if any: {dest})")
        shutil.copy2(suite / "manifest.json", dest / "manifest.json")
        shutil.rmtree(dest / "cache", ignore_errors=True)
        for path in dest.rglob("*"):  # keep the result files and reports only (as evidence.py does)
            if path.is_file() and not evidence.KEEP.search(path.name) and path.name != "manifest.json":
                path.unlink()
        written.append(dest)
    return written


def point_summary(builds, draws: int) -> Dict[str, object]:
    """Rows (mean, std, n over builds) and the learner minus free coefficients at one point of the curve."""
    summary = evidence.suite_summary(builds, draws)
    learner = summary.get("learner_contribution")  # evidence.RECOMMENDED minus evidence.FREE, bootstrapped
    return {"rows": {k: {x: v[x] for x in ("label", "mean", "std", "n", "budget")} for k, v in summary["rows"].items()},
            "learner_minus_free": None if learner is None else
            {k: learner[k] for k in ("mean", "ci95", "n_builds", "interval")}}


def summarize(out: Path, draws: int = evidence.DRAWS) -> Dict[str, object]:
    result: Dict[str, object] = {}
    for suite_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        points = sorted(suite_dir.glob("images*"), key=lambda p: int(p.name[len("images"):]))
        curve = {p.name[len("images"):]: point_summary(evidence.load_builds(suite_dir, p.name), draws)
                 for p in points}
        result[suite_dir.name] = {"curve": curve, "reuse": REUSE_NOT_RUN}
    return result


def markdown(summary: Dict[str, object]) -> str:
    """The curve as a table: per suite and images per task, each row's mean and the learner minus free."""
    lines = ["| suite | images/task | " + " | ".join(ROWS) + " | learner minus free [95 % interval] |",
             "|" + "---|" * (len(ROWS) + 3)]
    for suite, entry in summary.items():
        for n, point in entry["curve"].items():
            cells = [f"{100 * point['rows'][k]['mean']:.2f}" if k in point["rows"] else "" for k in ROWS]
            diff = point["learner_minus_free"]
            gap = "" if diff is None else (f"{100 * diff['mean']:+.2f} [{100 * diff['ci95'][0]:+.2f}, "
                                           f"{100 * diff['ci95'][1]:+.2f}]")
            lines.append(f"| {suite} | {n} | " + " | ".join(cells) + f" | {gap} |")
    return "\n".join(lines) + "\n"


def plot(summary: Dict[str, object], path: Path) -> None:
    """Accuracy against unlabeled images per task, one panel per suite; bars: std over builds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.6), squeeze=False)
    for ax, (suite, entry) in zip(axes[0], summary.items()):
        xs = [int(n) for n in entry["curve"]]
        for key in ROWS:
            points = [(x, p["rows"][key]) for x, p in zip(xs, entry["curve"].values()) if key in p["rows"]]
            if points:
                ax.errorbar([x for x, _ in points], [100 * r["mean"] for _, r in points],
                            yerr=[100 * (r["std"] or 0) for _, r in points], marker="o", capsize=3,
                            label=points[0][1]["label"])
        ax.set_xscale("log")
        ax.set_xlabel("unlabeled images per task")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(suite, fontsize=9)
        ax.legend(fontsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the curve's comparisons on one built suite")
    r.add_argument("suite", type=Path)
    r.add_argument("--suite-name", required=True)
    r.add_argument("--seed", type=int, required=True, help="the seed the suite was built with")
    r.add_argument("--images", default="16,64,256,4000")
    r.add_argument("--budget-rest", default="steps=3000,starts=2,probe_steps=300",
                   help="the rest of --budget, the same at every point")
    s = sub.add_parser("summary", help="summary.json and curve.png from the raw runs")
    for p in (r, s):
        p.add_argument("--out", type=Path, default=Path("docs/results/learner"))
    s.add_argument("--draws", type=int, default=evidence.DRAWS)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.suite, args.suite_name, args.seed, args.out, [int(n) for n in args.images.split(",")],
            args.budget_rest, extra)
        return 0
    summary = summarize(args.out, args.draws)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, args.out / "curve.png")
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
