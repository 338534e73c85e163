"""The evidence summary: intervals with a known answer, summaries from raw builds, raw runs never replaced."""

import io
import json
import math
import sys
import tarfile

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import evidence  # noqa: E402


def test_one_build_interval_is_the_test_images_binomial_spread():
    """One build, one task of 20000 images, 70 % against 60 %: the interval is the normal one,
    0.10 +- 1.96 * sqrt(.7*.3/n + .6*.4/n)."""
    n = 20000
    result = evidence.bootstrap_difference([{"t": (0.7, 0.6, n)}], draws=4000)
    half = 1.96 * math.sqrt(0.7 * 0.3 / n + 0.6 * 0.4 / n)
    assert result["mean"] == pytest.approx(0.1)
    assert result["ci95"][0] == pytest.approx(0.1 - half, abs=0.002)
    assert result["ci95"][1] == pytest.approx(0.1 + half, abs=0.002)


def test_builds_spread_dominates_when_test_sets_are_huge():
    """Gaps of 0, 0.1 and 0.2 on three builds with (nearly) exact test sets: the mean is 0.1 and the
    interval spans what resampling three builds gives (between the smallest and the largest)."""
    builds = [{"t": (0.5 + g, 0.5, 10**9)} for g in (0.0, 0.1, 0.2)]
    result = evidence.bootstrap_difference(builds, draws=2000)
    assert result["mean"] == pytest.approx(0.1)
    lo, hi = result["ci95"]
    assert 0.0 <= lo < 0.07 and 0.13 < hi <= 0.2 + 1e-6


def _results(rows):
    return {"tasks": ["a", "b"], "rows": [
        {"key": k, "label": k, "protocol": "p", "status": "ok", "accuracies": {"a": v, "b": v}, "average": v,
         "budget": {"images_per_task": 1, "steps": 2, "passes_per_step": 2, "selection": "s"}, "settings": "x"}
        for k, v in rows.items()]}


def _build(root, suite, seed, rows):
    folder = root / suite / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(_results(rows)))
    (folder / "manifest.json").write_text(json.dumps({"tasks": {t: {"sizes": {"test": 100}} for t in "ab"}}))


def test_summary_picks_the_best_of_ours_and_the_best_peer_and_the_learners_part(tmp_path, capsys):
    for seed, shift in ((1, 0.0), (2, 0.02)):
        _build(tmp_path, "vision", seed, {"individual": 0.9, "task_arithmetic": 0.5 + shift, "samerging": 0.6 + shift,
                                          "statsmerging_residual": 0.65 + shift, "samerging_matched": 0.66 + shift,
                                          "statsmerging_learner_matched": 0.5})
    assert evidence.main(["--root", str(tmp_path), "--draws", "200"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())["vision"]
    assert summary["n_seeds"] == 2
    assert summary["rows"]["samerging"]["mean"] == pytest.approx(0.61)
    assert summary["rows"]["samerging"]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    gap = summary["gap"]  # ablation rows (free coefficients, the learner alone) are neither ours nor a peer
    assert (gap["ours"], gap["peer"], gap["mean"]) == ("statsmerging_residual", "samerging", pytest.approx(0.05))
    assert summary["learner_contribution"]["mean"] == pytest.approx(-0.01)
    assert set(gap) >= {"ci95", "mean"} and gap["ci95"][0] < 0.05 < gap["ci95"][1]
    assert "| statsmerging_residual | 66.00 ± 1.41 |" in capsys.readouterr().out


def test_unpack_never_replaces_a_raw_build(tmp_path):
    payload = json.dumps(_results({"samerging": 0.5})).encode()
    manifest = json.dumps({"tasks": {t: {"sizes": {"test": 10}} for t in "ab"}}).encode()
    archive = tmp_path / "campaign.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("real/compare_text/results.json", payload), ("real/manifests/text.json", manifest),
                           ("real/compare_text/runs/samerging/checkpoint.pt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    root = tmp_path / "evidence"
    [written] = evidence.unpack(archive, 3, root)
    assert written == root / "text" / "seed3" and (written / "manifest.json").is_file()
    assert not (written / "runs" / "samerging" / "checkpoint.pt").exists()
    with pytest.raises(SystemExit, match="never replaced"):
        evidence.unpack(archive, 3, root)


def test_committed_summary_and_readme_table_are_derived_from_the_raw_runs():
    """docs/results/evidence/summary.json is evidence.py's output on the raw builds beside it, and the README's
    results table is its markdown: no figure typed by hand."""
    root = REPO_ROOT / "docs" / "results" / "evidence"
    committed = json.loads((root / "summary.json").read_text())
    assert committed == json.loads(json.dumps(evidence.summarize(root)))
    readme = (REPO_ROOT / "README.md").read_text()
    assert evidence.replace_table(readme, evidence.markdown(committed)) == readme
    for suite in ("vision", "hetero", "text"):
        assert suite in committed


def test_readme_prose_quotes_the_summary():
    """The figures the README's prose cites are the summary's (and the runs' wall times), not typed by hand."""
    summary = json.loads((REPO_ROOT / "docs" / "results" / "evidence" / "summary.json").read_text())
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    vision, text = summary["vision"], summary["text"]
    assert (f"is {100 * vision['learner_contribution']['mean']:.2f} points on vision and "
            f"{100 * text['learner_contribution']['mean']:+.2f} on text") in readme
    assert f"data-free TSV-M ({100 * text['rows']['tsv_m']['mean']:.2f})" in readme
    assert vision["gap"]["peer"] == "samerging" and f"on vision ({100 * vision['gap']['mean']:+.2f}," in readme
    minutes = [row["wall_time_s"] / 60 for s in ("vision", "text") for row in
               [r for b in evidence.load_builds(REPO_ROOT / "docs" / "results" / "evidence", s)
                for r in b[1]["rows"] if r["key"] == "statsmerging_residual"]]
    assert f"rows took {min(minutes):.0f}-{max(minutes):.0f} minutes" in readme


def test_benchmarks_page_table_is_the_summarys():
    text = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    summary = json.loads((REPO_ROOT / "docs" / "results" / "evidence" / "summary.json").read_text())
    assert evidence.replace_table(text, evidence.markdown(summary)) == text
