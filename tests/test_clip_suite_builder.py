"""End-to-end test of benchmarks/build_clip_suite.py at --size tiny (about one minute on 2 CPU cores).

The build runs once per session in a subprocess (exactly the documented command line); the
tests then load every artefact the way FusionBench would and re-derive the manifest's
accuracies from disk, so a mismatch anywhere in data -> processor -> model -> head shows up.

Set CLIP_SUITE_DIR=/path/to/a/built/suite to check an existing build (e.g. the full GPU one,
or one written by another transformers version) instead of building the tiny one.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
pytest.importorskip("sklearn", reason="pip install scikit-learn (bundled digits)")
pytest.importorskip("skimage", reason="pip install scikit-image (bundled sample photos)")

from clip_suite.data import SPLITS  # noqa: E402
from clip_suite.sources import find_fashion_mnist  # noqa: E402
from conftest import missing_asset  # noqa: E402

NUM_TASKS = 8
COMPARE_METHODS = ["pretrained", "individual", "statsmerging_layer"]


def _need_fashion_mnist() -> None:
    try:
        find_fashion_mnist()
    except FileNotFoundError as exc:  # pragma: no cover - depends on the machine
        missing_asset(f"Fashion-MNIST missing ({exc}); apt-get install -y dataset-fashion-mnist")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """Build the tiny suite once for the whole module (or reuse CLIP_SUITE_DIR)."""
    if os.environ.get("CLIP_SUITE_DIR"):
        return Path(os.environ["CLIP_SUITE_DIR"])
    _need_fashion_mnist()
    out = tmp_path_factory.mktemp("clip_suite") / "tiny"
    cmd = [sys.executable, str(BENCH / "build_clip_suite.py"), "--out", str(out), "--size", "tiny", "--seed", "0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "average" in proc.stdout  # the final summary table was printed
    return out


@pytest.fixture(scope="module")
def manifest(suite: Path) -> dict:
    return json.loads((suite / "manifest.json").read_text())


@pytest.fixture(scope="module")
def tasks(suite: Path) -> dict:
    return json.loads((suite / "tasks.json").read_text())


@pytest.fixture(scope="module")
def clip(suite: Path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(suite / "pretrained")).eval(), CLIPProcessor.from_pretrained(str(suite / "pretrained"))


def test_all_artefacts_exist(suite: Path, tasks: dict) -> None:
    for small in ("manifest.json", "summary.md"):  # written last, and small enough to bring back
        assert 0 < (suite / small).stat().st_size < 64 * 1024, small
    assert "zero-shot" in (suite / "summary.md").read_text()
    pre = suite / "pretrained"
    for f in ("config.json", "model.safetensors", "preprocessor_config.json", "tokenizer_config.json",
              "vocab.json", "merges.txt"):
        assert (pre / f).is_file(), f
    assert not (pre / "_tokenizer_src").exists()
    for t in tasks:
        assert (suite / "experts" / t / "config.json").is_file()
        assert (suite / "experts" / t / "model.safetensors").is_file()
        for split in SPLITS:
            assert (suite / "data" / t / split / "dataset_info.json").is_file()


def test_tasks_json(tasks: dict, manifest: dict) -> None:
    assert len(tasks) == NUM_TASKS
    names = list(tasks)
    assert names == list(manifest["tasks"])  # stable order
    assert all(n.startswith("syn_") and n == n.lower() for n in names)
    try:
        from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

        builtin = set(CLIPTemplateFactory._dataset_mapping)
    except Exception:  # pragma: no cover - fusion_bench layout changed
        builtin = {"mnist", "svhn", "gtsrb", "dtd", "eurosat", "sun397", "resisc45", "fashion_mnist"}
    assert not builtin & set(names)
    for name, spec in tasks.items():
        assert len(spec["classnames"]) == manifest["tasks"][name]["num_classes"] >= 2
        assert len(set(spec["classnames"])) == len(spec["classnames"])
        assert spec["templates"] and all(t.count("{}") == 1 for t in spec["templates"])


def test_datasets_load_with_labels(suite: Path, tasks: dict, manifest: dict) -> None:
    from datasets import ClassLabel, load_from_disk

    size = manifest["model"]["image_size"]
    for name, spec in tasks.items():
        for split in SPLITS:
            ds = load_from_disk(str(suite / "data" / name / split))
            assert set(ds.column_names) >= {"image", "label"}
            assert len(ds) == manifest["tasks"][name]["splits"][split] > 0
            assert isinstance(ds.features["label"], ClassLabel)
            assert ds.features["label"].names == spec["classnames"]
            labels = np.asarray(ds["label"])
            assert labels.min() >= 0 and labels.max() < len(spec["classnames"])
            img = ds[0]["image"]
            assert img.size == (size, size) and img.mode == "RGB"


def test_pretrained_loads_and_runs(suite: Path, clip) -> None:
    from datasets import load_from_disk
    from transformers import CLIPVisionModel

    from clip_suite.model import normalize_pixels

    model, processor = clip
    ids = processor.tokenizer("a photo of a cat.")["input_ids"]
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
    # Byte-level with no merges: each word is its bytes, the last one in its "</w>" form (+256).
    words = ["a", "photo", "of", "a", "cat", "."]
    assert ids[1:-1] == [b + (256 if j == len(w) - 1 else 0) for w in words for j, b in enumerate(w.encode())]
    ds = load_from_disk(str(suite / "data" / "syn_fashion" / "test"))
    images = [ds[i]["image"] for i in range(4)]
    inputs = processor(text=["a photo of a dress.", "a photo of a bag."], images=images, return_tensors="pt", padding=True,
                       truncation=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits_per_image.shape == (4, 2)
    # The builder trains on its own tensor pipeline; it must match the saved processor exactly.
    mine = normalize_pixels(torch.from_numpy(np.stack([np.asarray(im) for im in images])))
    assert torch.allclose(inputs["pixel_values"], mine, atol=1e-5)
    vision = CLIPVisionModel.from_pretrained(str(suite / "pretrained")).eval()
    with torch.no_grad():
        a = vision(pixel_values=inputs["pixel_values"]).pooler_output
        b = model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output
    assert torch.allclose(a, b, atol=1e-5)


def _head(model, tokenizer, classnames, templates) -> "torch.Tensor":
    """Zero-shot head as FusionBench builds it: mean of normalised template embeddings."""
    rows = []
    for c in classnames:
        enc = tokenizer([t.format(c) for t in templates], padding=True, return_tensors="pt")
        with torch.no_grad():
            e = model.text_projection(model.text_model(**enc).pooler_output)
        e = torch.nn.functional.normalize(e, dim=-1).mean(0)
        rows.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.stack(rows)


def _accuracy(vision, model, processor, head, ds) -> float:
    pix = processor.image_processor(images=[ds[i]["image"] for i in range(len(ds))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = torch.nn.functional.normalize(model.visual_projection(vision(pixel_values=pix).pooler_output), dim=-1)
    return float(((emb @ head.t()).argmax(1).numpy() == np.asarray(ds["label"])).mean())


def test_saved_models_reproduce_manifest_accuracies(suite: Path, clip, tasks: dict, manifest: dict) -> None:
    from datasets import load_from_disk
    from transformers import CLIPVisionModel

    model, processor = clip
    pre_state = {k: v for k, v in CLIPVisionModel.from_pretrained(str(suite / "pretrained")).state_dict().items()}
    for name, spec in tasks.items():
        head = _head(model, processor.tokenizer, spec["classnames"], spec["templates"])
        ds = load_from_disk(str(suite / "data" / name / "test"))
        zs = _accuracy(model.vision_model, model, processor, head, ds)
        assert abs(zs - manifest["tasks"][name]["zero_shot"]["test"]) <= 0.02, name
        expert = CLIPVisionModel.from_pretrained(str(suite / "experts" / name)).eval()
        state = expert.state_dict()
        assert state.keys() == pre_state.keys()
        assert any(not torch.equal(state[k], pre_state[k]) for k in state), f"{name}: expert == pretrained"
        ft = _accuracy(expert, model, processor, head, ds)
        assert abs(ft - manifest["tasks"][name]["expert"]["test"]) <= 0.02, name


def test_manifest_numbers(manifest: dict) -> None:
    assert manifest["size"] in ("tiny", "small", "full") and isinstance(manifest["seed"], int)
    assert manifest["builder_version"] and manifest["wall_time_s"] > 0
    for name, t in manifest["tasks"].items():
        for k in ("validation", "test"):
            assert 0.0 <= t["zero_shot"][k] <= 1.0
            assert 0.0 <= t["expert"][k] <= 1.0
        assert t["expert"]["best_step"] > 0
    av = manifest["averages"]
    assert all(0.0 <= v <= 1.0 for v in av.values())
    # Genuinely learned: fine-tuning on a task helps that task, on average over tasks.
    assert av["expert_test"] > av["zero_shot_test"]
    assert av["expert_validation"] > av["zero_shot_validation"]
    cross = manifest["expert_cross_task"]["test_accuracy"]
    assert len(cross) == NUM_TASKS and all(len(r) == NUM_TASKS for r in cross)
    diag = [cross[i][i] for i in range(NUM_TASKS)]
    assert np.allclose(diag, [t["expert"]["test"] for t in manifest["tasks"].values()], atol=1e-3)


def test_generation_is_deterministic_and_worker_independent() -> None:
    """Same seed -> same pixels, whether generated serially or in forked workers."""
    _need_fashion_mnist()
    from clip_suite.data import build_task_split, plan_resources
    from clip_suite.pretrain_data import build_pretrain_pool
    from clip_suite.tasks import TASKS

    sizes = {t.name: {"train": 16, "validation": 8, "test": 8} for t in TASKS}
    res = plan_resources(16, 3, sizes, None, [t.name for t in TASKS])
    for i, t in enumerate(TASKS):
        a = build_task_split(t, "train", 16, res, 3, i, workers=1, chunk=5)
        b = build_task_split(t, "train", 16, res, 3, i, workers=2, chunk=5)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), t.name
    p1 = build_pretrain_pool(40, res, 3, workers=1, chunk=16)
    p2 = build_pretrain_pool(40, res, 3, workers=2, chunk=16)
    assert np.array_equal(p1[0], p2[0]) and p1[1] == p2[1]
    assert all(len(c) == 3 and all(isinstance(s, str) and s for s in c) for c in p1[1])


def test_fonts_fall_back_to_matplotlib_copy(monkeypatch, tmp_path) -> None:
    """No system fonts (the GPU machine): every DejaVu face resolves to matplotlib's bundled copy,
    which is also the preferred source, and glyphs render from it; without any copy, Pillow's
    built-in font still renders."""
    from clip_suite import render as R

    mpl = R.matplotlib_font_dir()
    assert mpl is not None
    monkeypatch.setattr(R, "SYSTEM_FONT_DIRS", [str(tmp_path / "no_fonts_here")])
    R.set_font_dir(None)  # clears the resolution caches
    try:
        assert R.available_fonts() == list(R.FONT_NAMES)
        assert all(Path(p).parent == mpl for p in R.font_sources().values())
        ink = R.glyph_layer("7", "DejaVuSans-Bold.ttf", 32, 0.8, 0.0, 0.5, 0.5)
        assert np.asarray(ink).max() > 0
        monkeypatch.setattr(R, "matplotlib_font_dir", lambda: None)
        R.set_font_dir(None)
        assert R.available_fonts() == [] and R.font_sources()["DejaVuSans.ttf"] is None
        assert np.asarray(R.glyph_layer("7", "DejaVuSans-Bold.ttf", 32, 0.8, 0.0, 0.5, 0.5)).max() > 0
    finally:
        monkeypatch.undo()
        R.set_font_dir(None)


def test_step_budget_fits_steps_into_the_allowance() -> None:
    from clip_suite.train import StepBudget

    now = [0.0]
    clock = lambda: now[0]  # noqa: E731 - each step takes 0.5 s of this fake clock
    b = StepBudget(1000, seconds=50.0, skip=2, calibrate=4, safety=1.0, clock=clock)
    step = 0
    while step < b.total:
        now[0] += 0.5
        b.step_done(step)
        step += 1
    assert b.step_seconds == pytest.approx(0.5)
    assert step == b.total == 100 and b.info()["planned_steps"] == 1000
    unlimited = StepBudget(7)
    for i in range(7):
        unlimited.step_done(i)
    assert unlimited.total == 7 and unlimited.info()["step_seconds"] is None


def test_compare_runs_on_the_built_suite(suite: Path, tmp_path) -> None:
    """The comparison command over the builder's own output (not the test fixture)."""
    out = tmp_path / "compare"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "fusion_bench_statsmerging.compare", "--suite", str(suite), "--out", str(out),
           "--fast", "--methods", ",".join(COMPARE_METHODS), "--jobs", "2",
           "--extra-overrides", "fabric.accelerator=cpu", "--timeout", "600"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    tasks = list(json.loads((suite / "tasks.json").read_text()))
    assert sorted(result["tasks"]) == sorted(tasks)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == COMPARE_METHODS
    for key, row in rows.items():
        assert row["status"] == "ok", (key, row.get("error_tail"))
        assert set(row["accuracies"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in row["accuracies"].values())
    manifest = json.loads((suite / "manifest.json").read_text())["tasks"]
    for t in tasks:  # the host's evaluation agrees with the builder's own
        assert abs(rows["pretrained"]["accuracies"][t] - manifest[t]["zero_shot"]["test"]) <= 0.02, t
        assert abs(rows["individual"]["accuracies"][t] - manifest[t]["expert"]["test"]) <= 0.02, t
    md = (out / "results.md").read_text()
    assert all(row["label"] in md for row in rows.values())
    with open(out / "results.csv") as fh:
        assert [r["key"] for r in csv.DictReader(fh)] == COMPARE_METHODS
