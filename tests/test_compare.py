"""The comparison command end to end (real fusion_bench subprocesses) and its parsing pieces.

The end-to-end test brings its own pool configs (a temp dir on ``hydra.searchpath``) so it
does not depend on the package's ``clip_suite`` configs; the StatsMerging test uses the
package's configs, which ship with it: a missing one is a failure.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_bench_statsmerging import compare
from fusion_bench_statsmerging.compare.runner import _config_dirs

POOL = "cmp_tiny"
FAILING = {"missing": "method=no_such_method",
           "crash": "method=dummy method._target_=fusion_bench_statsmerging.compare.NoSuchAlgorithm"}


def _env(tmp_path: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
                TOKENIZERS_PARALLELISM="false")


def _write_pool_configs(conf: Path, suite_dir: Path) -> None:
    """Pool configs equivalent to the package's clip_suite ones, under a name of our own."""
    (conf / "modelpool").mkdir(parents=True)
    (conf / "taskpool").mkdir(parents=True)
    (conf / "modelpool" / f"{POOL}.yaml").write_text(
        "_target_: fusion_bench_statsmerging.modelpool.clip_suite.CLIPSuiteModelPool\n_recursive_: false\n"
        f"suite_dir: {suite_dir}\n")
    (conf / "taskpool" / f"{POOL}.yaml").write_text(
        "_target_: fusion_bench_statsmerging.modelpool.clip_suite.CLIPSuiteTaskPool\n_recursive_: false\n"
        f"suite_dir: {suite_dir}\n"
        "dataloader_kwargs: {batch_size: 128, num_workers: 0, shuffle: false}\n")


def _run_compare(args, tmp_path: Path) -> subprocess.CompletedProcess:
    cwd = tmp_path / "cwd"  # the host caches under ./outputs: keep it out of the checkout
    cwd.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "fusion_bench_statsmerging.compare", *args], cwd=cwd,
                          env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _assert_consistent_row(row: dict, tasks) -> None:
    accs = row["accuracies"]
    assert set(accs) == set(tasks), row
    assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs.values()), accs
    assert row["average"] == pytest.approx(sum(accs.values()) / len(accs), abs=1e-9)
    assert row["wall_time_s"] > 0 and row["peak_rss_mib"] > 0
    assert Path(row["run_dir"], "program_report.json").is_file()


def test_compare_runs_host_methods_and_lists_failures(tmp_path, suite_dir):
    conf = tmp_path / "conf"
    _write_pool_configs(conf, suite_dir)
    out = tmp_path / "out"
    methods = ["pretrained", "individual", "simple_average", "task_arithmetic", *FAILING]
    args = ["--modelpool", POOL, "--taskpool", POOL, "--out", str(out), "--methods", ",".join(methods),
            "--extra-overrides", f"hydra.searchpath=[file://{conf}] fabric.accelerator=cpu", "--timeout", "300",
            "--jobs", "2"]
    for key, overrides in FAILING.items():
        args += ["--add", f"{key}={overrides}"]
    proc = _run_compare(args, tmp_path)

    for name in ["results.md", "results.csv", "results.json", "results.png"]:
        assert (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "results.json").read_text())
    manifest = json.loads((suite_dir / "manifest.json").read_text())["tasks"]
    tasks = list(manifest)
    assert sorted(result["tasks"]) == sorted(tasks)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == methods  # failures are listed, in order, not dropped (also with --jobs 2)
    assert result["jobs"] == 2

    for key in ["pretrained", "individual", "simple_average", "task_arithmetic"]:
        assert rows[key]["status"] == "ok", rows[key]
        _assert_consistent_row(rows[key], tasks)
        assert rows[key]["reported_average"] in (None, pytest.approx(rows[key]["average"]))
    # The host's evaluation of the pretrained model and of each expert on its own task
    # reproduces what the fixture measured when it built the suite.
    for task, acc in manifest.items():
        assert rows["pretrained"]["accuracies"][task] == pytest.approx(acc["pretrained_test_accuracy"])
        assert rows["individual"]["accuracies"][task] == pytest.approx(acc["expert_test_accuracy"])
    assert rows["pretrained"]["protocol"] == compare.NO_DATA
    assert rows["individual"]["protocol"] == compare.REFERENCE

    assert rows["missing"]["status"] == "missing config"
    assert "method/no_such_method" in rows["missing"]["error"]
    assert rows["crash"]["status"] == "failed" and "NoSuchAlgorithm" in rows["crash"]["error"]
    assert "NoSuchAlgorithm" in rows["crash"]["error_tail"]

    with open(out / "results.csv") as fh:
        csv_rows = {r["key"]: r for r in csv.DictReader(fh)}
    assert list(csv_rows) == methods
    for key in ["pretrained", "simple_average", "task_arithmetic"]:
        values = [float(csv_rows[key][t]) for t in tasks]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert float(csv_rows[key]["average"]) == pytest.approx(sum(values) / len(values))
    assert csv_rows["crash"]["average"] == "" and "NoSuchAlgorithm" in csv_rows["crash"]["error"]

    md = (out / "results.md").read_text()
    for row in rows.values():
        assert row["label"] in md
    assert "## Failures" in md and "NoSuchAlgorithm" in md and "method/no_such_method" in md
    assert "`--jobs 2`" in md and "overlap" in md  # overlapping wall times are flagged
    assert "| Simple Average |" in proc.stdout  # the table is also printed


def test_compare_runs_statsmerging_with_package_configs(tmp_path, suite_dir):
    dirs = _config_dirs([])
    for group, name in [("method", "statsmerging"), ("modelpool", "clip_suite"), ("taskpool", "clip_suite")]:
        assert any((d / group / f"{name}.yaml").is_file() for d in dirs), f"package config {group}/{name} missing"
    out = tmp_path / "out"
    _run_compare(["--suite", str(suite_dir), "--out", str(out), "--fast", "--fast-steps", "3",
                  "--methods", "statsmerging_layer",
                  "--set", "statsmerging_layer:method.data_fraction=0.25",
                  "--set", "statsmerging_layer:method.batch_size=8",
                  "--extra-overrides", "fabric.accelerator=cpu", "--timeout", "300"], tmp_path)
    result = json.loads((out / "results.json").read_text())
    rows = {r["key"]: r for r in result["rows"]}
    for row in rows.values():
        assert row["status"] == "ok", row.get("error_tail")
        _assert_consistent_row(row, result["tasks"])
    assert rows["statsmerging_layer"]["protocol"] == compare.TRAIN_UNLABELED
    assert "method.max_steps=3" in rows["statsmerging_layer"]["overrides"]


def test_compare_on_a_per_task_head_suite(tmp_path):
    """A per-task-head --suite picks the heads pools and rows: individual experts on their own
    task, a host baseline, AdaMerging through the heads hooks and ours, all through the CLI."""
    from fusion_bench_statsmerging.fixtures.heads import build_tiny_cnn_suite

    suite = build_tiny_cnn_suite(tmp_path / "cnn")
    out = tmp_path / "out"
    methods = "pretrained,individual,task_arithmetic,adamerging_layer_train,statsmerging_layer"
    _run_compare(["--suite", str(suite), "--out", str(out), "--fast", "--fast-steps", "2", "--methods", methods,
                  "--set", "statsmerging_layer:method.data_fraction=0.25", "--jobs", "2",
                  "--extra-overrides", "fabric.accelerator=cpu taskpool.batchnorm_reestimate=true",
                  "--timeout", "300"], tmp_path)
    result = json.loads((out / "results.json").read_text())
    assert result["modelpool"] == "heads_suite" and result["taskpool"] == "heads_suite"
    assert result["tasks"] == list(json.loads((suite / "tasks.json").read_text()))
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == methods.split(",")
    for row in rows.values():
        assert row["status"] == "ok", row.get("error_tail")
        _assert_consistent_row(row, result["tasks"])
    assert rows["adamerging_layer_train"]["protocol"] == compare.TRAIN_UNLABELED
    assert "method=adamerging_heads" in rows["adamerging_layer_train"]["overrides"]
    assert "method=statsmerging_heads" in rows["statsmerging_layer"]["overrides"]
    # experts are scored on their own task only (the taskpool narrowed to it), and beat the rest
    experts = rows["individual"]["accuracies"]
    assert experts and min(experts.values()) > 0.5
    assert (out / "results.md").read_text().count("| Pretrained backbone + expert heads |") == 1


def test_heads_family_rows_and_detection(tmp_path):
    (tmp_path / "suite.json").write_text(json.dumps({"format": "per_task_heads/1"}))
    assert compare.suite_family(tmp_path, "clip_suite") == "heads"
    assert compare.suite_family(None, "heads_suite_hetero") == "heads"
    assert compare.suite_family(None, "clip_suite") == "clip"
    reg, default = compare.family_registry("heads")
    assert "fisher_merging" not in default and "regmean" not in default  # the host's are CLIP-only
    for key in ("adamerging_layer", "adamerging_task"):
        assert compare.row_protocol(reg[key], reg[key].overrides) == compare.TEST_TIME
    for key in ("adamerging_layer_train", "statsmerging_layer", "samerging"):
        assert compare.row_protocol(reg[key], reg[key].overrides) == compare.TRAIN_UNLABELED
    dirs = _config_dirs([])
    assert all(compare.config_file(reg[k], dirs) is not None for k in default if k not in ("individual",))


# --------------------------------------------------------------------------- pieces
def _ctx(tmp_path, **kw) -> compare.Context:
    base = dict(out=tmp_path, modelpool="mp", taskpool="tp", extra_overrides=[], per_method={}, env={},
                timeout=10.0, fast=False, fast_steps=4)
    base.update(kw)
    return compare.Context(**base)


def test_overrides_fill_placeholders_but_keep_hydra_interpolations(tmp_path):
    spec = compare.REGISTRY["adamerging_layer"]
    ctx = _ctx(tmp_path, fast=True, extra_overrides=["x=${oc.env:HOME}"],
               per_method={"adamerging_layer": ["method.lr=0.1"]})
    overrides = compare.build_overrides(spec, ctx)
    assert overrides[:2] == ["modelpool=mp", "taskpool=tp"]
    run_dir = (tmp_path / "runs" / "adamerging_layer").resolve()
    assert f"method.cache_dir={run_dir}/adamerging_cache" in overrides  # per run: runs may overlap
    assert "method.max_steps=4" in overrides and "x=${oc.env:HOME}" in overrides
    assert overrides.index("method.lr=0.1") > overrides.index("method.max_steps=4")
    assert overrides[-2] == f"path.log_dir={(tmp_path / 'runs' / 'adamerging_layer').resolve()}"


def test_protocol_follows_our_protocol_override(tmp_path):
    spec = compare.REGISTRY["statsmerging_layer"]
    assert compare.row_protocol(spec, ["method=statsmerging"]) == compare.TRAIN_UNLABELED
    assert compare.row_protocol(spec, ["method.protocol=test_time_adaptation"]) == compare.TEST_TIME
    assert compare.row_protocol(spec, ["method.protocol=train_ground_truth"]) == compare.USES_LABELS
    assert compare.row_protocol(compare.REGISTRY["adamerging_task"], []) == compare.TEST_TIME
    assert compare.row_protocol(compare.REGISTRY["regmean"], []) == compare.TRAIN_UNLABELED


def test_data_driven_methods_run_under_both_protocols():
    reg, default = compare.REGISTRY, compare.DEFAULT_METHODS
    expected = {"adamerging_task": compare.TEST_TIME, "adamerging_layer": compare.TEST_TIME,
                "adamerging_task_train": compare.TRAIN_UNLABELED, "adamerging_layer_train": compare.TRAIN_UNLABELED,
                "statsmerging_task": compare.TRAIN_UNLABELED, "statsmerging_layer": compare.TRAIN_UNLABELED,
                "statsmerging_plusplus": compare.TRAIN_UNLABELED, "statsmerging_task_tta": compare.TEST_TIME,
                "statsmerging_layer_tta": compare.TEST_TIME, "statsmerging_plusplus_tta": compare.TEST_TIME}
    for key, protocol in expected.items():
        assert key in default
        assert compare.row_protocol(reg[key], reg[key].overrides) == protocol, key
    assert "method=adamerging_train" in reg["adamerging_layer_train"].overrides
    # the train-split AdaMerging follows an explicit protocol override like ours do
    assert compare.row_protocol(reg["adamerging_task_train"], ["method.protocol=validation_unlabeled"]) \
        == compare.VALIDATION_UNLABELED
    assert compare.config_file(reg["adamerging_layer_train"], _config_dirs([])) is not None


def test_jobs_must_be_positive():
    with pytest.raises(SystemExit):
        compare.parse_args(["--jobs", "0"])


def test_parse_report_merged_and_experts():
    merged = {"model_info": {"all_params": 3}, "a": {"accuracy": 0.5, "loss": 1.0},
              "b": {"accuracy": 1.0, "loss": 0.1}, "average": {"accuracy": 0.75, "loss": 0.55}}
    parsed = compare.parse_report(compare.REGISTRY["simple_average"], merged)
    assert parsed["accuracies"] == {"a": 0.5, "b": 1.0} and parsed["average"] == 0.75
    wrapped = compare.parse_report(compare.REGISTRY["simple_average"], {"model": merged, "weights": [1, 2]})
    assert wrapped["accuracies"] == {"a": 0.5, "b": 1.0}
    experts = {"a": {"a": {"accuracy": 0.9}, "average": {"accuracy": 0.9}},
               "b": {"a": {"accuracy": 0.1}, "b": {"accuracy": 0.7}, "average": {"accuracy": 0.4}}}
    parsed = compare.parse_report(compare.REGISTRY["individual"], experts)
    assert parsed["accuracies"] == {"a": 0.9, "b": 0.7}
    assert parsed["average"] == pytest.approx(0.8)


def test_summarize_error_prefers_the_exception_line():
    stderr = "Traceback...\n  File x\nValueError: bad rank\nSet the environment variable HYDRA_FULL_ERROR=1\n"
    assert compare.summarize_error(stderr) == ("failed", "ValueError: bad rank")
    missing = "In 'fabric_model_fusion': Could not find 'method/foo'\n\nAvailable options in 'method':\n\tdummy\n"
    assert compare.summarize_error(missing) == ("missing config", "config 'method/foo' not found on the search path")
    assert compare.error_tail(missing).startswith("In 'fabric_model_fusion': Could not find")


def test_unknown_method_is_a_usage_error():
    args = compare.parse_args(["--methods", "pretrained,nope"])
    with pytest.raises(SystemExit, match="nope"):
        compare.select_specs(args, compare.REGISTRY)


def test_added_rows_run_beside_a_method_list():
    args = compare.parse_args(["--methods", "pretrained", "--add", "ta05=method=task_arithmetic method.scaling_factor=0.5"])
    registry = {**compare.REGISTRY,
                "ta05": compare.MethodSpec("ta05", "ta05", ("method=task_arithmetic",), compare.CUSTOM)}
    assert [s.key for s in compare.select_specs(args, registry)] == ["pretrained", "ta05"]


def test_outputs_from_rows(tmp_path):
    rows = [{"key": "x", "label": "X | y", "protocol": compare.NO_DATA, "status": "ok", "error": None,
             "accuracies": {"t1": 0.5, "t2": 0.25}, "average": 0.375, "wall_time_s": 1.5,
             "peak_rss_mib": 100.0, "peak_cuda_mib": None, "command": "fusion_bench a=b", "settings": "host defaults",
             "budget": {"images_per_task": [16, 32], "steps": 40, "passes_per_step": 2, "selection": "last state"}},
            {"key": "z", "label": "Z", "protocol": compare.CUSTOM, "status": "failed", "error": "Boom: x",
             "error_tail": "line\nBoom: x", "accuracies": {}, "average": None, "wall_time_s": 0.2,
             "peak_rss_mib": None, "peak_cuda_mib": None, "command": "fusion_bench c=d"}]
    md = compare.write_outputs(tmp_path, rows, {"created": "now", "modelpool": "mp", "taskpool": "tp"})
    assert ("| X \\| y | no data | 50.00 | 25.00 | 37.50 | 16-32 | 40 | 2 | last state | host defaults | 1.5 | 100 |  "
            "| ok |") in md
    assert "failed: Boom: x" in md and "```\nline\nBoom: x\n```" in md
    assert (tmp_path / "results.png").stat().st_size > 0
    with open(tmp_path / "results.csv") as fh:
        got = list(csv.DictReader(fh))
    assert got[0]["t1"] == "0.5" and got[1]["status"] == "failed"
    assert (got[0]["images_per_task"], got[0]["steps"], got[0]["selection"]) == ("16-32", "40", "last state")
