"""statsmerging-prefetch and the offline error, against a fake Hugging Face cache (no network)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import make_algorithm
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench_statsmerging.utils import prefetch
from fusion_bench_statsmerging.utils.errors import PoolError
from fusion_bench_statsmerging.utils.prefetch import Need

TA8 = ["modelpool=clip-vit-base-patch32_TA8", "taskpool=clip-vit-classification_TA8"]


def fake_cache(root: Path, needs) -> tuple[Path, Path]:
    """A hub cache and a datasets cache holding ``needs`` in the layouts the libraries write."""
    hub, data = root / "hub", root / "datasets"
    for need in needs:
        if need.kind == "model":
            snap = hub / f"models--{need.repo.replace('/', '--')}" / "snapshots" / "0123abc"
            snap.mkdir(parents=True, exist_ok=True)
            (snap / "config.json").write_text("{}")
            (snap / "model.safetensors").write_bytes(b"\0" * 8)
        else:
            prepared = data / need.repo.replace("/", "___") / (need.config or "default") / "0.0.0" / "f00"
            prepared.mkdir(parents=True, exist_ok=True)
            (prepared / f"{need.repo.split('/')[-1]}-{need.split}.arrow").write_bytes(b"")
    return hub, data


def test_the_headline_run_needs_nine_models_and_eight_datasets():
    needs = prefetch.needs_of_run(["method=statsmerging", *TA8])
    models = [n.repo for n in needs if n.kind == "model"]
    datasets = {(n.repo, n.config) for n in needs if n.kind == "dataset"}
    assert models[0] == "openai/clip-vit-base-patch32" and len(models) == 9
    assert "tanganke/clip-vit-base-patch32_sun397" in models
    assert len(datasets) == 8 and ("svhn", "cropped_digits") in datasets and ("tanganke/sun397", None) in datasets
    assert {n.split for n in needs if n.kind == "dataset"} == {"train", "test"}


def test_local_paths_need_nothing_from_the_hub(tmp_path):
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "expert").mkdir()
    pool = CLIPVisionModelPool(OmegaConf.create({"_pretrained_": str(tmp_path / "pretrained"),
                                                 "a": str(tmp_path / "expert")}),
                               train_datasets=OmegaConf.create({"a": {"_target_": "datasets.load_from_disk",
                                                                      "dataset_path": str(tmp_path)}}))
    assert prefetch.needs_of_pools(pool) == []
    assert prefetch.needs_of_run(["modelpool=clip_suite", "taskpool=clip_suite"]) == []


def test_check_reads_the_caches_as_an_offline_run_would(tmp_path, monkeypatch, capsys):
    needs = prefetch.needs_of_run(TA8)
    hub, data = fake_cache(tmp_path, needs)
    monkeypatch.setattr(prefetch, "hub_cache", lambda: hub)
    monkeypatch.setattr(prefetch, "datasets_cache", lambda: data)
    assert prefetch.main(["--check", *TA8]) == 0
    assert "all cached" in capsys.readouterr().out
    # one dataset config and one model gone: both named, exit 1
    for p in [data / "svhn", hub / "models--tanganke--clip-vit-base-patch32_dtd"]:
        __import__("shutil").rmtree(p)
    assert prefetch.main(["--check", *TA8]) == 1
    out, err = capsys.readouterr()
    assert "MISSING  dataset svhn [cropped_digits/train]" in out and "cached   model openai/clip-vit-base-patch32" in out
    assert err.strip().splitlines()[-1].startswith("error: 3 of 25 not cached (an offline run would fail): dataset svhn")


def test_cli_offline_lists_what_is_missing(tmp_path):
    env = {"HF_HOME": str(tmp_path / "empty_hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "fusion_bench_statsmerging.utils.prefetch", *TA8], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "hub not reachable" in proc.stdout and "MISSING  model tanganke/clip-vit-base-patch32_sun397" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: 25 of 25 not cached")


def test_a_run_offline_fails_in_seconds_naming_what_is_missing_and_the_command(tmp_path, cpu_fabric, monkeypatch):
    monkeypatch.setattr(prefetch, "hub_reachable", lambda timeout=3.0: False)
    hub, data = fake_cache(tmp_path / "cache", [Need("model", "org/pretrained"), Need("model", "org/expert_a")])
    monkeypatch.setattr(prefetch, "hub_cache", lambda: hub)
    monkeypatch.setattr(prefetch, "datasets_cache", lambda: data)
    pool = CLIPVisionModelPool(
        OmegaConf.create({"_pretrained_": "org/pretrained", "a": "org/expert_a", "b": "org/expert_b"}),
        train_datasets=OmegaConf.create({t: {"_target_": "datasets.load_dataset", "path": f"org/data_{t}",
                                             "split": "train"} for t in ("a", "b")}))
    pool.load_pretrained_model = lambda *a, **k: pytest.fail("no model may load before the check")
    start = time.time()
    with pytest.raises(PoolError, match=r"hub cannot be reached.*3 of the 5 hub repositories.*model org/expert_b, "
                                         r"dataset org/data_a \[train\].*`statsmerging-prefetch modelpool="):
        make_algorithm(tmp_path, cpu_fabric).run(pool)
    assert time.time() - start < 10
    assert not [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
