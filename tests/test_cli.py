"""The real fusion_bench CLI, as users run it, from the repository root and from elsewhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO_ROOT

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))


def _env(tmp_path, suite_dir=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if suite_dir is not None:
        env["STATSMERGING_SUITE_DIR"] = str(suite_dir)
    return env


def _run(args, cwd, env, timeout=600):
    proc = subprocess.run([FUSION_BENCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_users_two_argument_command_composes_to_our_class_and_the_hosts_pool(tmp_path):
    env = _env(tmp_path)
    ours = _run(["method=statsmerging", "modelpool=clip-vit-base-patch32_TA8", "--cfg", "job"], REPO_ROOT, env)
    host = _run(["method=dummy", "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8", "--cfg", "job"], tmp_path, env)
    ours_cfg, host_cfg = OmegaConf.create(ours.stdout), OmegaConf.create(host.stdout)
    assert ours_cfg.method._target_ == "fusion_bench_statsmerging.method.statsmerging.CLIPStatsMergingAlgorithm"
    assert ours_cfg.modelpool == host_cfg.modelpool
    with_eval = _run(["method=statsmerging", "modelpool=clip-vit-base-patch32_TA8",
                      "taskpool=clip-vit-classification_TA8", "--cfg", "job"], tmp_path, env)
    assert OmegaConf.create(with_eval.stdout).taskpool._target_ == "fusion_bench.taskpool.CLIPVisionModelTaskPool"


@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_cli_merges_and_evaluates_the_fixture(tmp_path, suite_dir, where):
    cwd = REPO_ROOT if where == "repo_root" else tmp_path
    log_dir = tmp_path / "logs"
    proc = _run(["method=statsmerging", "modelpool=clip_suite", "taskpool=clip_suite",
                 "method.max_steps=5", "method.data_fraction=0.25", "method.batch_size=8",
                 "fabric.accelerator=cpu", f"path.log_dir={log_dir}"], cwd, _env(tmp_path, suite_dir))
    report = json.loads((log_dir / "program_report.json").read_text())
    tasks = json.loads((suite_dir / "tasks.json").read_text())
    for task in tasks:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    assert abs(report["average"]["accuracy"] - sum(report[t]["accuracy"] for t in tasks) / len(tasks)) < 1e-6
    ours = json.loads((log_dir / "statsmerging_report.json").read_text())
    assert ours["protocol"]["name"] == "train_unlabeled"
    for name in ["coefficients.pt", "coefficients.csv", "coefficients_heatmap.png", "learner.pt"]:
        assert (log_dir / name).stat().st_size > 0
    assert list(log_dir.glob("events.out.tfevents.*")), "no TensorBoard scalars"
    assert "train_unlabeled" in proc.stdout + proc.stderr  # the log names the protocol


def test_dummy_taskpool_prints_hint(tmp_path, suite_dir):
    proc = _run(["method=statsmerging_taskwise", "modelpool=clip_suite", "method.max_steps=2",
                 "method.batch_size=8", "fabric.accelerator=cpu", f"path.log_dir={tmp_path / 'logs'}"],
                tmp_path, _env(tmp_path, suite_dir))
    assert "add `taskpool=clip_suite` to evaluate" in proc.stdout
