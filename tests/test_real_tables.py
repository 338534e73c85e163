"""The docs table of a real suite (benchmarks/real_suites/tables.py), from compare results."""

import sys

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
