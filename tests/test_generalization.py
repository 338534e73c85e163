"""Held-out-task protocol (benchmarks/generalization.py) on the tiny suite, through the real CLI."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "generalization.py"
sys.path.insert(0, str(SCRIPT.parent))
import generalization  # noqa: E402

SEEN, UNSEEN = ["tiny_colors", "tiny_stripes"], ["tiny_quadrant"]


def test_default_and_explicit_task_splits():
    eight = [f"t{i}" for i in range(8)]
    assert generalization.split_tasks(eight, None, None) == (eight[:6], eight[6:])
    assert generalization.split_tasks(eight[:3], None, None) == (eight[:2], eight[2:3])
    assert generalization.split_tasks(eight, None, "t0,t1") == (eight[2:], ["t0", "t1"])
    assert generalization.split_tasks(eight, "t0,t1", None) == (["t0", "t1"], eight[2:])
    for seen, unseen in [("t0,t1", "t1"), ("t0", "t1"), ("t0,t1,x", None), ("t0,t1", "")]:
        with pytest.raises(SystemExit):
            generalization.split_tasks(eight, seen, unseen)


def test_held_out_tasks_table_on_the_tiny_suite(tmp_path, suite_dir):
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"  # the host writes ./outputs: keep it out of the checkout
    cwd.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--suite", str(suite_dir), "--out", str(out), "--seen", ",".join(SEEN),
         "--unseen", ",".join(UNSEEN), "--methods", "statsmerging,statsmerging_reuse", "--fast", "--fast-steps", "2",
         "--set", "statsmerging:method.batch_size=8", "--extra-overrides", "fabric.accelerator=cpu",
         "--timeout", "300"], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((out / "generalization.json").read_text())
    assert result["seen"] == SEEN and result["unseen"] == UNSEEN
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["statsmerging", "statsmerging_reuse"]
    for row in rows.values():
        assert row["status"] == "ok", row.get("error_tail")
        accs = row["accuracies"]
        assert set(accs) == set(SEEN + UNSEEN) and all(0 <= a <= 1 for a in accs.values())
        assert row["seen_average"] == pytest.approx(sum(accs[t] for t in SEEN) / len(SEEN))
        assert row["unseen_average"] == pytest.approx(accs[UNSEEN[0]])

    # Table 2's row: the seen experts only, fitted on the seen tasks' train split only
    ours = json.loads((out / "runs" / "statsmerging" / "artifacts" / "statsmerging_report.json").read_text())
    assert ours["models"] == SEEN and sorted(ours["fit_data"]) == sorted(SEEN)
    assert {v["split"] for v in ours["fit_data"].values()} == {"train"}
    # transfer row: that learner on all experts, no data at all
    reused = json.loads((out / "runs" / "statsmerging_reuse" / "statsmerging_report.json").read_text())
    assert reused["models"] == SEEN + UNSEEN and reused["fit_data"] == {}
    assert reused["protocol"]["name"] == "reused_learner_no_data"
    assert reused["files"]["reuse_report"]
    reuse = json.loads((out / "runs" / "statsmerging_reuse" / "reuse_report.json").read_text())
    assert reuse["loaded_from"] == str(out / "runs" / "statsmerging" / "artifacts" / "learner.pt")

    md = (out / "generalization.md").read_text()
    head = "| Method | Protocol | Merged experts | Fit data | tiny_colors | tiny_stripes | Seen avg | tiny_quadrant"
    assert head in md
    assert "StatsMerging, reused learner (all experts)" in md and "Unseen avg" in md
    with open(out / "generalization.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert [r["key"] for r in lines] == ["statsmerging", "statsmerging_reuse"]
    assert float(lines[0]["unseen_average"]) == pytest.approx(rows["statsmerging"]["unseen_average"])
