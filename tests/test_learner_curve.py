"""The learner's data curve: its summary has the issue's structure and the learner-minus-free interval."""

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import learner_curve  # noqa: E402


def _point(root, n, learner, free):
    folder = root / "vision" / f"images{n}" / "seed1"
    folder.mkdir(parents=True)
    rows = [{"key": k, "label": k, "protocol": "p", "status": "ok", "accuracies": {"a": v}, "average": v,
             "budget": {"images_per_task": n, "steps": 10}} for k, v in
            (("statsmerging_residual", learner), ("samerging_matched", free), ("statsmerging_learner_matched", 0.4))]
    (folder / "results.json").write_text(json.dumps({"tasks": ["a"], "rows": rows}))
    (folder / "manifest.json").write_text(json.dumps({"tasks": {"a": {"sizes": {"test": 1000}}}}))


def test_summary_structure_and_learner_minus_free(tmp_path):
    for n, learner, free in ((16, 0.6, 0.5), (64, 0.6, 0.6), (256, 0.6, 0.7)):
        _point(tmp_path, n, learner, free)
    assert learner_curve.main(["summary", "--out", str(tmp_path), "--draws", "300"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    curve = summary["vision"]["curve"]
    assert list(curve) == ["16", "64", "256"] and "status" in summary["vision"]["reuse"]
    assert [round(curve[n]["learner_minus_free"]["mean"], 6) for n in curve] == [0.1, 0.0, -0.1]
    lo, hi = curve["16"]["learner_minus_free"]["ci95"]
    assert lo < 0.1 < hi and lo > 0.05  # 1000 test images: about +-0.043
    assert curve["64"]["rows"]["statsmerging_learner_matched"]["mean"] == pytest.approx(0.4)
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_docs_curve_table_is_the_committed_runs():
    root = REPO_ROOT / "docs" / "results" / "learner_tiny_cpu"
    summary = json.loads((root / "summary.json").read_text())
    assert learner_curve.markdown(summary) in (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    assert json.loads(json.dumps(learner_curve.summarize(root))) == summary
