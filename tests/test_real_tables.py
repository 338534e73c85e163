"""The docs table of a real suite (benchmarks/real_suites/tables.py), from compare results."""

import json
import sys

import pytest

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import tables  # noqa: E402


def docs_text() -> str:
    """The current benchmarks page and the history (where superseded runs' tables live) together."""
    return "".join((REPO_ROOT / "docs" / name).read_text() for name in ("benchmarks.md", "history.md"))


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
    docs = docs_text()
    for name in ("real_vision_gpu", "real_hetero_gpu", "real_text_gpu",
                 "real_vision_gpu_issue19", "real_hetero_gpu_issue19", "real_text_gpu_issue19",
                 "real_vision_gpu_issue19b", "real_hetero_gpu_issue19b", "real_text_gpu_issue19b",
                 "real_vision_gpu_issue19c", "real_hetero_gpu_issue19c", "clip_suite_small_cpu_issue19"):
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


# each campaign's comparison folders (vision, text, hetero); the third did not rerun the text suite
CAMPAIGNS = {c: [f"real_{s}_gpu_{c}" for s in ("vision", "text", "hetero")] for c in ("issue19", "issue19b")}
CAMPAIGNS["issue19c"] = ["real_vision_gpu_issue19c", "real_text_gpu_issue19b", "real_hetero_gpu_issue19c"]


def _folders(campaign):
    return [REPO_ROOT / "docs" / "results" / name for name in CAMPAIGNS[campaign]]


@pytest.mark.parametrize("campaign", list(CAMPAIGNS))
def test_docs_ablation_table_is_the_committed_runs(campaign):
    """docs/benchmarks.md's GPU ablation tables are ablation.py's output on the committed runs (validation read)."""
    import ablation
    scores = ablation.collect(_folders(campaign))
    rendered = ablation.markdown(scores, ablation.choose(scores))
    assert rendered in docs_text()


def test_latest_campaign_chose_the_committed_configuration():
    """The committed StatsMerging-R configuration is what the latest campaign chose on validation, read from
    the settings its runs recorded (not from ablation.py's candidate table, which is written relative to the
    configuration itself): the two starts, each the start of one picked-from run, and every other setting of
    the configuration as those runs ran it. Its ``max_samples_per_task`` (the runs had no cap) is a cap no
    train split of the real suites reaches; ``max_epochs`` is unused beside ``max_steps``."""
    import ablation
    from omegaconf import OmegaConf
    folders = _folders("issue19c")
    assert ablation.choose(ablation.collect(folders)) == ablation.TWO_STARTS
    config = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "config" / "method" / "statsmerging_residual.yaml"))
    largest = max(size["train"] for name in ("real_vision_gpu_issue19c", "real_text_gpu_issue19b")
                  for task in json.loads((REPO_ROOT / "docs" / "results" / name / "manifest.json").read_text())[
                      "tasks"].values() for size in [task["sizes"]])
    assert config["max_samples_per_task"] >= largest, (config["max_samples_per_task"], largest)
    assert config["start_probe_steps"] == ablation.PROBE_STEPS and config["max_steps"] is not None
    assert {"output": config["output"], "init_coefficient": config["init_coefficient"]} == config["starts"][0]
    shared = {k: v for k, v in config.items() if k not in (
        "defaults", "name", "starts", "start_probe_steps", "output", "init_coefficient", "max_samples_per_task",
        "max_epochs")}
    for folder in folders:
        for key, start in zip(ablation.START_RUNS, config["starts"], strict=True):
            ran = json.loads((folder / "runs" / key / "statsmerging_report.json").read_text())["config"]
            assert {k: ran[k] for k in start} == start, (folder.name, key)
            differ = {k: (v, ran[k]) for k, v in shared.items() if not _same_setting(v, ran[k])}
            assert not differ, (folder.name, key, differ)


def _same_setting(configured, ran) -> bool:
    """YAML keeps ``5e-4`` as text, the run's report as the number it became."""
    if isinstance(configured, str) and isinstance(ran, float):
        return float(configured) == ran
    return configured == ran


def test_gap_is_the_best_statsmerging_row_against_the_best_other_merge():
    results = dict(tasks=["a"], rows=[
        _row("statsmerging_residual", "R", {"a": 0.72}), _row("statsmerging_layer", "L", {"a": 0.60}),
        _row("samerging", "SAM", {"a": 0.70}), _row("individual", "Ind", {"a": 0.90}),
        _row("ablation_r_x", "X", {"a": 0.99}), _row("adamerging_layer_train", "Ada", status="timeout", error="t"),
    ])
    assert tables.gap(results) == ("statsmerging_residual 72.00 vs samerging 70.00: +2.00 "
                                   "(without adamerging_layer_train: no average)")


def test_docs_exported_pool_tables_are_the_committed_results():
    """The OpenCLIP / LoRA tables in docs/benchmarks.md are the rows statsmerging-compare wrote (results.md)."""
    docs = docs_text()
    for pool in ("dense", "openclip", "lora"):
        written = (REPO_ROOT / "docs" / "results" / "exported_pools_tiny_cpu" / pool / "results.md").read_text()
        rows = [line for line in written.splitlines() if line.startswith("|")]
        assert len(rows) == 10 and "\n".join(rows) in docs, pool  # header, separator, eight rows


def test_tables_names_a_missing_results_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tables.main([str(tmp_path / "results.json"), "--gap"])
    assert f"{tmp_path / 'results.json'} does not exist" in capsys.readouterr().err.strip().splitlines()[-1]


def test_docs_loop_step_figures_are_the_committed_engine_results():
    """The 1.3x check in docs/benchmarks.md (loop step vs merge_speed.py) quotes the raw JSON beside it."""
    raw = REPO_ROOT / "docs" / "results" / "engine_gpu_issue19d"
    docs = docs_text()
    section = docs[docs.index("### The training loop's step against"):docs.index("### Scaling with the number")]
    for name, tag in (("e2e_b32_issue19d.json", "| `--profile 20` |"), ("e2e_b32_issue19d_noprofile.json", "| no profile |")):
        run = json.loads((raw / name).read_text())["results"][0]
        row = next(line for line in section.splitlines() if line.startswith(tag))
        loop = run["loop"]
        assert f"| {run['method_seconds']:.1f} | {run['phase_seconds']['teacher targets']:.1f} |" in row
        assert f"{loop['ms_per_step_steady']:.1f} ({loop['steps']['steps']} steps)" in row
        assert f"| {run['process_wall_s']:.1f} |" in row
    speed = {r["variant"]: r["step"] for r in json.loads((raw / "merge_speed_b32_issue19d.json").read_text())["results"]}
    assert f"{speed['bf16']['mean_ms']:.1f} ms a step (median {speed['bf16']['median_ms']:.1f})" in section
    assert f"{speed['fp32']['mean_ms']:.1f} ms (median {speed['fp32']['median_ms']:.1f})" in section
    steady = json.loads((raw / "e2e_b32_issue19d_noprofile.json").read_text())["results"][0]["loop"]["ms_per_step_steady"]
    assert steady <= 1.3 * min(speed["bf16"]["mean_ms"], speed["fp32"]["mean_ms"])  # issue 19's 1.3x
    assert f"{steady / speed['bf16']['mean_ms']:.2f}x the bf16 step" in section
    assert f"{steady / speed['fp32']['mean_ms']:.2f}x the fp32 one" in section


def test_readme_cost_line_is_the_committed_real_schedule_run():
    """The README's cost line quotes the run of end_to_end.py with each configuration's own schedule (CPU
    figures, labelled so), and docs/benchmarks.md's table of it; no fixed-step benchmark stands for a merge."""
    run = json.loads((REPO_ROOT / "docs" / "results" / "e2e_real_tiny_cpu" / "e2e_real_tiny_cpu.json").read_text())
    assert run["meta"]["schedule"] == "real" and run["meta"]["device"] == "cpu"
    rows = {r["variant"]: r for r in run["results"]}
    default, residual = rows["default"], rows["residual"]
    assert residual["planned_steps"] == {"start probes": 600, "training": 3000} and default["steps"] == 500
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    assert "CPU figures only" in readme and "took 49.7 s in the method" not in readme
    assert (f"the default's {default['steps']} steps at {default['ms_per_step']:.2f} ms a step, StatsMerging-R's "
            f"{residual['steps']} (600 + 3000) steps at {residual['ms_per_step']:.2f} ms a step") in readme
    docs = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    for r in (default, residual):
        row = next(line for line in docs.splitlines() if line.startswith(f"| {r['variant']} | {r['steps']}"))
        assert f"| {r['method_seconds']:.1f} |" in row and f"| {r['ms_per_step']:.2f} | {r['process_wall_s']:.1f} |" in row


def test_docs_auto_start_check_is_the_committed_runs():
    """The CPU check of init_coefficient: auto quotes ablation.py's rows and the search's scores of the raw runs."""
    import ablation
    raw = REPO_ROOT / "docs" / "results" / "ablation_initauto_tiny_cpu"
    docs = docs_text()
    scores = ablation.collect([raw])
    rendered = ablation.markdown(scores, ablation.choose(scores)).splitlines()
    for key in ("**statsmerging_residual**", "ablation_r_initauto_long3k |"):
        assert next(line for line in rendered if line.startswith(f"| {key}")) in docs
    search = json.loads((raw / "runs" / "ablation_r_initauto_long3k" / "statsmerging_report.json").read_text())[
        "start_search"]
    agreement = {float(k): v for k, v in search["agreement"].items()}
    assert search["chosen"] == max(agreement, key=agreement.get) == 0.4
    assert f"{100 * agreement[0.3]:.1f} %\nat 0.3, {100 * agreement[0.4]:.1f} % at 0.4" in docs


def _start_run(runs, key, agreement_by_step, val, test):
    folder = runs / key
    folder.mkdir(parents=True)
    (folder / "statsmerging_report.json").write_text(json.dumps({"selection": {"agreement_by_step": agreement_by_step}}))
    (folder / "program_report.json").write_text(json.dumps({"validation_split": {"average": {"accuracy": val}},
                                                            "average": {"accuracy": test}}))


def test_two_starts_replay_picks_by_agreement_within_the_probe_and_stands_for_the_picked_run(tmp_path):
    """Until the two starts run as a row, their scores are the picked start's run: picked by the best
    agreement logged at steps <= 300 (a start that overtakes later is not seen by the probes)."""
    import ablation
    suite = tmp_path / "suite"
    late, early = ablation.START_RUNS
    _start_run(suite / "runs", late, {"0": 0.5, "300": 0.6, "1000": 0.95}, 0.9, 0.8)
    _start_run(suite / "runs", early, {"0": 0.4, "200": 0.7, "1000": 0.75}, 0.7, 0.6)
    assert ablation.replay_pick(suite / "runs") == early
    assert ablation.replay_pick(suite / "runs", steps=1000) == late
    assert ablation.collect([suite])[ablation.TWO_STARTS] == {"suite": (0.7, 0.6)}  # no label read to pick
    assert ablation.replay_pick(tmp_path / "empty") is None



def test_docs_two_starts_replay_is_the_committed_runs():
    """The probes' replay in docs/benchmarks.md is ablation.py --replay on the committed runs' own logs."""
    import ablation
    folders = [REPO_ROOT / "docs" / "results" / name for name in (
        "real_vision_gpu_issue19c", "real_text_gpu_issue19b", "real_hetero_gpu_issue19c", "real_vision_gpu_issue19b")]
    assert ablation.replay_markdown(folders) in docs_text()
