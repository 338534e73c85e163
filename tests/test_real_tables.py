"""The docs table of a real suite (benchmarks/real_suites/tables.py), from compare results."""

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import tables  # noqa: E402


def _row(key, label, accuracies=None, status="ok", error=None):
    average = sum(accuracies.values()) / len(accuracies) if accuracies else None
    return dict(key=key, label=label, protocol="p", accuracies=accuracies, average=average, status=status,
                error=error, wall_time_s=12.3)


def test_rows_in_reading_order_with_failures_and_references():
    results = dict(tasks=["a", "b"], rows=[
        _row("samerging", "SAM", {"a": 0.5, "b": 0.7}),
        _row("adamerging_layer_train", "Ada", status="timeout", error="timed out after 840 s"),
        _row("pretrained", "Pre", {"a": 0.1, "b": 0.2}),
        _row("custom", "Other", {"a": 0.3, "b": 0.4}),
    ])
    manifest = {"tasks": {"a": {"linear_probe_test_accuracy": 0.8}, "b": {"linear_probe_test_accuracy": 0.6}}}
    lines = tables.table(results, manifest).splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| Pre", "| Ada", "| SAM", "| Other",
                                                          "| Linear probe on the frozen pretrained backbone (builder)"]
    assert "| **60.00** | 12 |" in lines[4]
    assert "timeout: timed out after 840 s" in lines[3]
    assert lines[-1].endswith("| 80.00 | 60.00 | 70.00 | |")  # a reference the manifest lacks is left out


def test_docs_tables_are_the_committed_results():
    """Each GPU table in docs/benchmarks.md is tables.py's output on the raw results committed beside it,
    so no figure there is typed by hand."""
    docs = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    for name in ("real_vision_gpu", "real_hetero_gpu", "real_text_gpu",
                 "real_vision_gpu_issue19", "real_hetero_gpu_issue19", "real_text_gpu_issue19"):
        folder = REPO_ROOT / "docs" / "results" / name
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        rendered = tables.table(json.loads((folder / "results.json").read_text()), manifest).strip()
        if rendered not in docs:
            pytest.fail(f"docs/benchmarks.md lacks the {name} table that tables.py prints from {folder}")


def test_builder_readme_quotes_the_committed_vision_manifest():
    """The last column of benchmarks/real_suites/README.md's expert table is the GPU build's manifest."""
    manifest = json.loads((REPO_ROOT / "docs" / "results" / "real_vision_gpu" / "manifest.json").read_text())
    readme = (REPO_ROOT / "benchmarks" / "real_suites" / "README.md").read_text().splitlines()
    for task, entry in manifest["tasks"].items():
        row = next(line for line in readme if line.startswith(f"| {task} | "))
        assert row.endswith(f"| {entry['expert_test_accuracy']:.3f} |"), (task, row)


def test_docs_ablation_table_is_the_committed_runs():
    """docs/benchmarks.md's GPU ablation table is ablation.py's output on the committed runs (validation read)."""
    import ablation
    folders = [REPO_ROOT / "docs" / "results" / f"real_{s}_gpu_issue19" for s in ("vision", "text", "hetero")]
    scores = ablation.collect(folders)
    rendered = ablation.markdown(scores, ablation.choose(scores))
    assert rendered in (REPO_ROOT / "docs" / "benchmarks.md").read_text()
