"""Issue 15: every bad input that used to give a silently wrong result or lose a run is an error
naming the culprit, raised before any long work, with nothing half written."""

import functools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_algorithm
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench_statsmerging import compare
from fusion_bench_statsmerging.utils.preflight import PreflightError, check_writable
from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool, CLIPSuiteTaskPool

DROPPED = "vision_model.post_layernorm.weight"


def _edited_expert(suite_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of the tiny_colors expert whose safetensors file went through ``edit(state)``."""
    target = tmp_path / "broken_expert"
    shutil.copytree(suite_dir / "experts" / "tiny_colors", target)
    state = load_file(str(target / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def _no_files(directory: Path) -> bool:
    return not directory.exists() or not [p for p in directory.rglob("*") if p.is_file()]


def test_expert_missing_a_tensor_is_named_by_our_loader_and_by_the_method(tmp_path, suite_dir, cpu_fabric):
    broken = _edited_expert(suite_dir, tmp_path, lambda s: s.pop(DROPPED))
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir), experts={"tiny_colors": str(broken)})
    with pytest.raises(PreflightError, match=f"'tiny_colors'.*lacks tensor '{DROPPED}'.*initialise it randomly"):
        pool.load_model("tiny_colors")
    # a pool whose loader is the host's lenient one: the method's preflight still refuses it
    pool.load_model = functools.partial(CLIPVisionModelPool.load_model, pool)
    algorithm = make_algorithm(tmp_path, cpu_fabric)
    with pytest.raises(PreflightError, match=f"'tiny_colors'.*lacks tensor '{DROPPED}'"):
        algorithm.run(pool)
    assert _no_files(tmp_path / "artifacts")


def test_expert_with_an_extra_tensor_is_refused(tmp_path, suite_dir):
    broken = _edited_expert(suite_dir, tmp_path, lambda s: s.update(extra_head=torch.zeros(2)))
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir), experts={"tiny_colors": str(broken)})
    with pytest.raises(PreflightError, match="'tiny_colors'.*has tensor 'extra_head'"):
        pool.load_model("tiny_colors")


def test_nan_expert_is_named_with_its_tensor(tmp_path, suite_dir, cpu_fabric):
    def poison(state):
        state[DROPPED][0] = float("nan")

    broken = _edited_expert(suite_dir, tmp_path, poison)
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir), experts={"tiny_colors": str(broken)})
    # the host's simple_average loads through this pool too: it no longer ends in `loss: nan`
    with pytest.raises(PreflightError, match=f"Non-finite.*'{DROPPED}' of model 'tiny_colors'"):
        pool.load_model("tiny_colors")
    pool.load_model = functools.partial(CLIPVisionModelPool.load_model, pool)
    with pytest.raises(PreflightError, match=f"Non-finite.*'{DROPPED}' of model 'tiny_colors'"):
        make_algorithm(tmp_path, cpu_fabric).run(pool)
    assert _no_files(tmp_path / "artifacts")


def _suite_without(suite_dir: Path, tmp_path: Path, task: str, split: str) -> Path:
    """A suite of links to the fixture's parts, with one task's split left out."""
    suite = tmp_path / "partial_suite"
    (suite / "data").mkdir(parents=True)
    for part in ["pretrained", "experts", "tasks.json"]:
        (suite / part).symlink_to(suite_dir / part)
    for task_dir in (suite_dir / "data").iterdir():
        (suite / "data" / task_dir.name).mkdir()
        for split_dir in task_dir.iterdir():
            if (task_dir.name, split_dir.name) != (task, split):
                (suite / "data" / task_dir.name / split_dir.name).symlink_to(split_dir)
    return suite


def test_missing_test_split_is_an_error_not_a_shorter_average(tmp_path, suite_dir):
    suite = _suite_without(suite_dir, tmp_path, "tiny_stripes", "test")
    folder = suite / "data" / "tiny_stripes" / "test"
    with pytest.raises(PreflightError, match=rf"\['tiny_stripes'\].*test split is missing \('{folder}'\)"):
        CLIPSuiteTaskPool(suite_dir=str(suite))


def test_missing_train_split_names_the_folder(tmp_path, suite_dir, cpu_fabric):
    suite = _suite_without(suite_dir, tmp_path, "tiny_stripes", "train")
    pool = CLIPSuiteModelPool(suite_dir=str(suite))
    with pytest.raises(ValueError, match=f"no entry for \\['tiny_stripes'\\] \\(looked for '{suite}/data/tiny_stripes/train'\\)"):
        make_algorithm(tmp_path, cpu_fabric).run(pool)


def test_unwritable_artifact_dir_fails_before_any_model_loads(tmp_path, suite_dir, cpu_fabric):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")  # works as root too, unlike a read-only mode
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir))
    loaded = []
    pool.load_pretrained_model = lambda *a, **k: loaded.append(1)
    algorithm = make_algorithm(tmp_path, cpu_fabric, artifact_dir=str(blocker / "artifacts"))
    with pytest.raises(PreflightError, match=f"Cannot write to the artifact folder.*'{blocker / 'artifacts'}'"):
        algorithm.run(pool)
    assert loaded == [] and blocker.read_text() == "in the way"


def test_writable_check_leaves_nothing_behind(tmp_path):
    check_writable(tmp_path / "new" / "dir")
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_compare_checks_a_missing_suite_once_and_fast(tmp_path, capsys):
    out = tmp_path / "results"
    start = time.time()
    code = compare.main(["--suite", str(tmp_path / "nonexistent"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and time.time() - start < 5
    assert err.count("error:") == 1 and "no suite at" in err and err.strip().splitlines()[-1].startswith(
        "statsmerging-compare: error:")
    assert "[compare]" not in err  # no row was started
    assert not out.exists()


def test_samerging_taskwise_is_listed(capsys):
    compare.main(["--list"])
    assert "samerging_taskwise" in capsys.readouterr().out


def test_cli_error_is_the_last_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               STATSMERGING_SUITE_DIR=str(tmp_path / "nowhere"))
    proc = subprocess.run([str(Path(sys.executable).with_name("fusion_bench")), "method=statsmerging",
                           "modelpool=clip_suite", "taskpool=clip_suite", "fabric.accelerator=cpu",
                           f"path.log_dir={tmp_path / 'logs'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No suite at") and "--build-only --out DIR" in last


def test_a_missing_asset_fails_under_ci_and_skips_elsewhere(monkeypatch):
    from conftest import missing_asset

    monkeypatch.setenv("STATSMERGING_REQUIRE_ASSETS", "1")
    with pytest.raises(pytest.fail.Exception, match="required asset missing.*dataset-x"):
        missing_asset("apt-get install dataset-x")
    monkeypatch.delenv("STATSMERGING_REQUIRE_ASSETS")
    with pytest.raises(pytest.skip.Exception):
        missing_asset("apt-get install dataset-x")
