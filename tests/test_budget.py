"""Budgets: every compare row states what it spent, and --budget gives every trained row the same."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusion_bench_statsmerging.compare import budget as B
from fusion_bench_statsmerging.compare.rows import HEADS_REGISTRY, REGISTRY
from fusion_bench_statsmerging.compare.runner import _config_dirs
from fusion_bench_statsmerging.utils.errors import UserError

from conftest import REPO_ROOT


def test_matched_is_the_committed_recommended_configuration():
    """'matched' reads statsmerging_residual.yaml: its images, its steps with the probes, its selection."""
    import yaml
    cfg = yaml.safe_load((REPO_ROOT / "fusion_bench_statsmerging" / "config" / "method" /
                          "statsmerging_residual.yaml").read_text())
    b = B.parse_budget("matched", _config_dirs([]))
    assert (b.images_per_task, b.train_steps, b.starts, b.probe_steps) == (
        cfg["max_samples_per_task"], cfg["max_steps"], len(cfg["starts"]), cfg["start_probe_steps"])
    assert b.steps == cfg["max_steps"] + len(cfg["starts"]) * cfg["start_probe_steps"]
    assert B.parse_budget(None, []) is None and B.parse_budget("own", []) is None
    for bad in ("images=4", "steps=3,images=x", "foo=1,images=2,steps=3"):
        with pytest.raises(SystemExit):
            B.parse_budget(bad, [])


def test_a_probing_row_without_probes_in_the_budget_trains_one_start_for_every_step():
    b = B.Budget(images_per_task=8, train_steps=10)
    spec = REGISTRY["samerging_matched"]
    overrides = B.matched_overrides(spec.matched, spec.probes, b)
    assert "method.starts=null" in overrides and "method.max_steps=10" in overrides
    assert not any("start_probe_steps" in o for o in overrides)


def test_every_trained_row_has_a_common_budget_and_every_data_free_row_none():
    for registry in (REGISTRY, HEADS_REGISTRY):
        for key, spec in registry.items():
            trained = spec.protocol not in ("no data", "individual experts (reference)") and key not in (
                "fisher_merging", "regmean", "regmean_plusplus")
            assert bool(spec.matched) == trained, key


def _env(tmp_path):
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))


def test_matched_budget_reaches_every_trained_rows_run(tmp_path):
    """On a tiny per-task-head suite: each trained row's own report (or, for the host's AdaMerging, its
    settings) shows the common images per task, steps (probes included) and selection."""
    from fusion_bench_statsmerging.fixtures.heads import build_tiny_cnn_suite

    suite = build_tiny_cnn_suite(tmp_path / "cnn")
    out = tmp_path / "out"
    methods = "samerging,statsmerging_layer,samerging_matched,statsmerging_learner_matched,adamerging_layer_train"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_bench_statsmerging.compare", "--suite", str(suite), "--out", str(out),
         "--methods", methods, "--jobs", "2", "--timeout", "300",
         "--budget", "images=24,steps=6,starts=2,probe_steps=2,select_every=2,select_samples=8",
         "--extra-overrides", "fabric.accelerator=cpu"], cwd=cwd, env=_env(tmp_path), capture_output=True,
        text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert result["budget"]["steps"] == 10
    rows = {r["key"]: r for r in result["rows"]}
    for key in methods.split(","):
        assert rows[key]["status"] == "ok", rows[key].get("error_tail")
        assert "common budget" in rows[key]["settings"]
    for key in ("samerging", "statsmerging_layer", "samerging_matched", "statsmerging_learner_matched"):
        budget = rows[key]["budget"]
        assert budget["read_from"] == "the run's report"
        report = json.loads(next(p for p in Path(rows[key]["run_dir"]).glob("*_report.json") if p.name != "program_report.json").read_text())
        sizes = {v["num_samples"] for v in report["fit_data"].values()}
        assert sizes == {24} and budget["images_per_task"] == 24, (key, sizes)
        assert budget["steps"] == 10, key  # 6 + 2 probes of 2, or 10 plain steps
        assert report["config"]["select_by"] == "validation_agreement" and "agreement_by_step" in report["selection"]
        assert budget["selection"].startswith("label-free agreement on 8 unlabeled validation images")
    probing = json.loads((Path(rows["samerging_matched"]["run_dir"]) / "statsmerging_report.json").read_text())
    assert probing["schedule"]["max_steps"] == 6 and len(probing["start_probe"]["results"]) == 2
    assert probing["config"]["learner_frozen"] is True
    assert rows["adamerging_layer_train"]["budget"] == {
        "images_per_task": "all", "steps": 10, "passes_per_step": 1, "selection": "last state",
        "read_from": "the row's settings"}
    md = (out / "results.md").read_text()
    assert "| Images/task | Steps | Passes/step | Selection | Settings chosen |" in md
    header = (out / "results.csv").read_text().splitlines()[0]
    assert "images_per_task,steps,passes_per_step,selection,settings" in header


def test_a_frozen_learner_is_free_coefficients_from_the_start(tmp_path, cpu_fabric, modelpool):
    """learner_frozen: every coefficient starts exactly at init_coefficient whatever the statistics, only
    the residual trains, and a frozen learner without residual may only merge at its start (max_steps 0)."""
    from conftest import make_algorithm

    algo = make_algorithm(tmp_path, cpu_fabric, residual=True, learner_frozen=True, init_coefficient=0.3,
                          max_steps=2)
    algo.run(modelpool)
    report = json.loads(next(Path(algo.out_dir()).glob("*report.json")).read_text())
    learner = torch.load(Path(algo.out_dir()) / "learner.pt", weights_only=False)
    head = [v for k, v in learner["learner_state_dict"].items() if k.endswith("head.weight")][0]
    assert torch.count_nonzero(head) == 0
    assert report["config"]["learner_frozen"] is True
    with pytest.raises(UserError, match="leaves nothing to train"):
        make_algorithm(tmp_path, cpu_fabric, learner_frozen=True, max_steps=3)
    make_algorithm(tmp_path, cpu_fabric, learner_frozen=True, max_steps=0)
