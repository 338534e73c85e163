"""Offline demo: build the tiny CLIP fixture and merge it with StatsMerging through the real CLI.

    python -m fusion_bench_statsmerging.demo [--out DIR] [--steps N] [--build-only]

Runs in about a minute on a laptop CPU and prints per-task accuracies of the merged model
next to simple averaging, both evaluated by the host's CLIP task pool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .fixtures import build_tiny_clip_suite


def _fusion_bench(args: list[str], env: dict, cwd: Path) -> None:
    exe = shutil.which("fusion_bench") or str(Path(sys.executable).with_name("fusion_bench"))
    subprocess.run([exe, *args], env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="working directory (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=100, help="StatsMerging training steps")
    parser.add_argument("--build-only", action="store_true", help="only build the tiny suite under --out")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="statsmerging_demo_"))
    suite = out / "suite"
    if not (suite / "tasks.json").exists():
        build_tiny_clip_suite(suite)
    print(f"tiny suite: {suite}")
    if args.build_only:
        return 0
    env = dict(os.environ, STATSMERGING_SUITE_DIR=str(suite), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    rows = {}
    for label, overrides in {
        "simple average": ["method=simple_average"],
        "StatsMerging (layer-wise)": ["method=statsmerging", f"method.max_steps={args.steps}",
                                      "method.batch_size=8", "method.data_fraction=0.5"],
    }.items():
        log_dir = out / "runs" / label.split()[0].lower()
        _fusion_bench([*overrides, "modelpool=clip_suite", "taskpool=clip_suite", "fabric.accelerator=cpu",
                       f"path.log_dir={log_dir}"], env, out)
        rows[label] = json.loads((log_dir / "program_report.json").read_text())
    tasks = [t for t in json.loads((suite / "tasks.json").read_text())]
    print("\n| method | " + " | ".join(tasks) + " | average |")
    print("|---" * (len(tasks) + 2) + "|")
    for label, report in rows.items():
        cells = [f"{100 * report[t]['accuracy']:.1f}" for t in tasks]
        print(f"| {label} | " + " | ".join(cells) + f" | {100 * report['average']['accuracy']:.1f} |")
    print(f"\nStatsMerging artefacts (coefficients, heatmap, learner, report): {out / 'runs' / 'statsmerging'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
