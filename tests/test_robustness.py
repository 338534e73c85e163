"""Corruptions (deterministic, pixel-changing), the corrupted task pool, and benchmarks/robustness.py."""

import csv
import json
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
from PIL import Image
from transformers import CLIPVisionModel

from conftest import REPO_ROOT
from fusion_bench_statsmerging.taskpool.corruptions import (
    CLEAN, CORRUPTIONS, CLIPSuiteCorruptedTaskPool, CorruptedImageDataset, corrupt_image,
)

SCRIPT = REPO_ROOT / "benchmarks" / "robustness.py"


def _image(seed=0, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8))


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_deterministic_and_change_pixels(name):
    image = _image()
    clean = np.asarray(image, dtype=np.int64)
    changes = []
    for severity in (1, 3, 5):
        a = np.asarray(corrupt_image(image, name, severity, index=7), dtype=np.int64)
        b = np.asarray(corrupt_image(image.copy(), name, severity, index=7), dtype=np.int64)
        assert a.shape == clean.shape and a.dtype == clean.dtype
        assert np.array_equal(a, b)  # same image, index, severity, seed -> same pixels
        changes.append(np.abs(a - clean).mean())
        assert changes[-1] > 1.0, (name, severity, changes[-1])
    assert changes[0] < changes[-1]  # severity 5 is stronger than severity 1
    other = np.asarray(corrupt_image(image, name, 3, index=8), dtype=np.int64)
    assert not np.array_equal(other, np.asarray(corrupt_image(image, name, 3, index=7)))  # per-image draws
    seeded = np.asarray(corrupt_image(image, name, 3, index=7, seed=1), dtype=np.int64)
    assert not np.array_equal(seeded, np.asarray(corrupt_image(image, name, 3, index=7)))


def test_clean_is_the_identity_and_bad_names_fail():
    image = _image()
    assert corrupt_image(image, CLEAN, 3) is image
    with pytest.raises(ValueError, match="Unknown corruption"):
        corrupt_image(image, "fog", 3)
    with pytest.raises(ValueError, match="severity"):
        corrupt_image(image, "gaussian_noise", 6)


def test_corrupted_dataset_keeps_labels_and_is_reproducible():
    items = [{"image": _image(i, 16), "label": i % 3} for i in range(4)]
    one, two = CorruptedImageDataset(items, "impulse_noise", 4), CorruptedImageDataset(items, "impulse_noise", 4)
    for i in range(4):
        assert one[i]["label"] == items[i]["label"]
        assert np.array_equal(np.asarray(one[i]["image"]), np.asarray(two[i]["image"]))
        assert not np.array_equal(np.asarray(one[i]["image"]), np.asarray(items[i]["image"]))
    assert CorruptedImageDataset([(items[0]["image"], 5)], "motion_blur")[0][1] == 5


def test_corrupted_task_pool_evaluates(suite_dir):
    manifest = json.loads((suite_dir / "manifest.json").read_text())["tasks"]
    fabric = L.Fabric(accelerator="cpu", devices=1)
    loader = {"batch_size": 64, "num_workers": 0, "shuffle": False}
    pretrained = CLIPVisionModel.from_pretrained(suite_dir / "pretrained")

    pool = CLIPSuiteCorruptedTaskPool(str(suite_dir), corruption=[CLEAN, "gaussian_noise"], severity=5,
                                      dataloader_kwargs=loader)
    pool._fabric_instance = fabric
    report = pool.evaluate(pretrained)
    for task, acc in manifest.items():  # the clean condition is the ordinary evaluation
        assert report[f"clean/{task}"]["accuracy"] == pytest.approx(acc["pretrained_test_accuracy"])
        assert 0 <= report[f"gaussian_noise/{task}"]["accuracy"] <= 1
    assert set(report["conditions"]) == {CLEAN, "gaussian_noise"}
    assert report["conditions"]["gaussian_noise"]["severity"] == 5

    # one corruption: a plain report; the stripes expert loses accuracy on motion-blurred stripes
    expert = CLIPVisionModel.from_pretrained(suite_dir / "experts" / "tiny_stripes")
    blurred = CLIPSuiteCorruptedTaskPool(str(suite_dir), corruption="motion_blur", severity=5,
                                         tasks=["tiny_stripes"], dataloader_kwargs=loader)
    blurred._fabric_instance = fabric
    result = blurred.evaluate(expert)
    assert set(result) == {"model_info", "tiny_stripes", "average"}
    assert result["tiny_stripes"]["accuracy"] < manifest["tiny_stripes"]["expert_test_accuracy"]


def test_robustness_command_on_the_tiny_suite(tmp_path, suite_dir):
    out = tmp_path / "out"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--suite", str(suite_dir), "--out", str(out), "--methods", "task_arithmetic",
         "--corruptions", "gaussian_noise,motion_blur", "--severity", "5", "--tasks", "tiny_colors,tiny_stripes",
         "--extra-overrides", "fabric.accelerator=cpu", "--timeout", "300"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "robustness.json").read_text())
    assert result["conditions"] == [CLEAN, "gaussian_noise", "motion_blur"]
    (row,) = result["rows"]
    assert row["status"] == "ok", row.get("error_tail")
    tasks = ["tiny_colors", "tiny_stripes"]
    for condition in result["conditions"]:
        accs = row["by_condition"][condition]
        assert set(accs) == set(tasks) and all(0 <= a <= 1 for a in accs.values())
        assert row["condition_averages"][condition] == pytest.approx(sum(accs.values()) / 2)
    with open(out / "robustness.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert [r["condition"] for r in lines] == result["conditions"]
    md = (out / "robustness.md").read_text()
    assert "## motion_blur (severity 5)" in md and "| Task Arithmetic (λ=0.3) | no data |" in md
