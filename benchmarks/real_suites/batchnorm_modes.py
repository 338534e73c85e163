"""What BatchNorm statistics a merged per-task-head CNN should get: a measured comparison.

For StatsMerging (label-free, train_unlabeled) it compares ``batchnorm: reestimate`` (batch
statistics while fitting, running statistics re-estimated on the unlabeled fit inputs after
merging), ``merge`` (running statistics merged with the per-layer coefficients) and
``pretrained`` (left alone); for the host's task arithmetic and simple average, their own
state-dict merge of the statistics vs the task pool's label-free re-estimation. Accuracy is
the mean over tasks of each task's own head on the test split.

    python benchmarks/real_suites/batchnorm_modes.py --tiny            # two tiny CNN suites, CPU, ~1.5 min
    python benchmarks/real_suites/batchnorm_modes.py --suite DIR --steps 500 --fraction 0.01
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import lightning as L
import torch

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm
from fusion_bench_statsmerging.modelpool.heads import PerTaskHeadsModelPool
from fusion_bench_statsmerging.taskpool.heads import PerTaskHeadsTaskPool
from fusion_bench_statsmerging.method.statsmerging.heads_statsmerging import HeadsStatsMergingAlgorithm


def evaluate(taskpool, model) -> float:
    return taskpool.evaluate(model)["average"]["accuracy"]


def run_suite(suite: Path, seeds, steps: int, fraction: float, batch_size: int, out: Path, fabric) -> dict:
    pool = PerTaskHeadsModelPool(suite_dir=str(suite))
    plain = PerTaskHeadsTaskPool(suite_dir=str(suite))
    reest = PerTaskHeadsTaskPool(suite_dir=str(suite), batchnorm_reestimate=True)
    plain.fabric = reest.fabric = fabric
    rows: dict = {}
    for seed in seeds:
        for mode in ("reestimate", "merge", "pretrained"):
            algorithm = HeadsStatsMergingAlgorithm(
                batchnorm=mode, max_steps=steps, data_fraction=fraction, batch_size=batch_size, seed=seed,
                lr=1e-2, lr_step_size=None, artifact_dir=str(out / f"{suite.name}_{mode}_{seed}"))
            algorithm.fabric = fabric
            rows.setdefault(f"StatsMerging, batchnorm: {mode}", []).append(evaluate(plain, algorithm.run(pool)))
    for name, make in [("task arithmetic (0.3)", lambda: TaskArithmeticAlgorithm(scaling_factor=0.3)),
                       ("simple average", lambda: SimpleAverageAlgorithm())]:
        rows[f"{name}, its state-dict merge of the stats"] = [evaluate(plain, make().run(pool))]
        rows[f"{name}, stats re-estimated by the task pool"] = [evaluate(reest, make().run(pool))]
    rows["pretrained backbone + experts' heads"] = [evaluate(plain, pool.load_pretrained_model())]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", default=[], help="a per-task-head suite (repeatable)")
    parser.add_argument("--tiny", action="store_true", help="build and use tiny CNN suites (see --suite-seeds)")
    parser.add_argument("--suite-seeds", type=int, nargs="+", default=[0, 1], help="tiny suites to build")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="outputs/batchnorm_modes")
    args = parser.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(1)  # tiny models: threads only spin
    out = Path(args.out)
    suites = [Path(s) for s in args.suite]
    if args.tiny:
        from fusion_bench_statsmerging.fixtures.heads import build_tiny_cnn_suite

        tmp = Path(tempfile.mkdtemp(prefix="tiny_cnn_suites_"))
        suites += [build_tiny_cnn_suite(tmp / f"tiny_cnn_seed{s}", seed=s) for s in args.suite_seeds]
    fabric = L.Fabric(accelerator="auto", devices=1)
    results = {s.name: run_suite(s, args.seeds, args.steps, args.fraction, args.batch_size, out, fabric)
               for s in suites}
    lines = ["| configuration | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for row in next(iter(results.values())):
        cells = []
        for suite_rows in results.values():
            values = suite_rows[row]
            cell = f"{100 * statistics.mean(values):.1f}"
            if len(values) > 1:
                cell += f" ± {100 * statistics.stdev(values):.1f}"
            cells.append(cell)
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
