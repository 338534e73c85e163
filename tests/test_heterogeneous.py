"""Heterogeneous experts: the distil-then-merge model pool adapter, its builder and its CLI use.

Experts of other architectures, built here on CPU in seconds: a small ResNet (transformers
``ResNetForImageClassification``, from ``benchmarks/build_hetero_experts.py --tiny``) for
``tiny_colors`` and a CLIP model of another size (wider vision tower, larger patches) with its
own zero-shot head for ``tiny_stripes``. ``tiny_quadrant`` keeps its CLIP expert.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO_ROOT
from test_cli import _env, _run
from test_training import LabelTrap  # rows whose label raises when read

from fusion_bench_statsmerging.modelpool import heterogeneous
from fusion_bench_statsmerging.engine.student_distillation import DistillationSettings, HeteroPoolError
from fusion_bench_statsmerging.modelpool.heterogeneous import (
    DistillHeterogeneousExperts, HeterogeneousDistillationModelPool,
)
from fusion_bench_statsmerging.modelpool.clip_suite import read_suite_tasks, register_suite_tasks
from fusion_bench_statsmerging.models.teachers import (
    ExpertSpec, HeteroExpertError, ImageTransform, load_teacher,
)

TINY = {"max_steps": 15, "batch_size": 16, "lr": 1e-3, "warmup_steps": 2, "log_every": 5}


def _builder():
    spec = importlib.util.spec_from_file_location("build_hetero_experts", REPO_ROOT / "benchmarks" / "build_hetero_experts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clip_teacher_of_another_size(suite_dir: Path, out: Path) -> None:
    """A full CLIPModel whose vision tower differs from the suite's (width 48, patch 8), sharing
    the suite's text tower; its vision tower is fine-tuned a few steps on the task with its own head."""
    from transformers import CLIPModel, CLIPProcessor

    from fusion_bench_statsmerging.fixtures.clip import (
        finetune_expert, make_task_split, tiny_clip_config, zero_shot_head,
    )

    base = CLIPModel.from_pretrained(suite_dir / "pretrained")
    processor = CLIPProcessor.from_pretrained(suite_dir / "pretrained")
    config = tiny_clip_config()
    config.vision_config.hidden_size, config.vision_config.intermediate_size = 48, 96
    config.vision_config.patch_size = 8
    torch.manual_seed(1)
    teacher = CLIPModel(config)
    teacher.text_model.load_state_dict(base.text_model.state_dict())
    teacher.text_projection.load_state_dict(base.text_projection.state_dict())
    tasks = read_suite_tasks(suite_dir)
    head = zero_shot_head(teacher, processor, tasks["tiny_stripes"]["classnames"], tasks["tiny_stripes"]["templates"])
    train = make_task_split("tiny_stripes", 48, seed=7)
    teacher.vision_model = finetune_expert(teacher, processor, head, train, steps=10, lr=3e-3, seed=0)
    teacher.save_pretrained(out)
    processor.save_pretrained(out)


@pytest.fixture(scope="module")
def hetero_experts(suite_dir, tmp_path_factory) -> Path:
    """``<dir>/tiny_colors`` (ResNet, with expert.yaml) and ``<dir>/tiny_stripes`` (CLIP, kind detected)."""
    out = tmp_path_factory.mktemp("hetero_experts")
    assert _builder().main(["--suite", str(suite_dir), "--tasks", "tiny_colors", "--tiny", "--device", "cpu",
                            "--out", str(out)]) == 0
    _clip_teacher_of_another_size(suite_dir, out / "tiny_stripes")
    return out


def _pool(suite_dir, experts_dir, cache_dir, **kwargs) -> HeterogeneousDistillationModelPool:
    kwargs.setdefault("distillation", TINY)
    return HeterogeneousDistillationModelPool(
        base_pool={"_target_": "fusion_bench_statsmerging.modelpool.clip_suite.CLIPSuiteModelPool", "suite_dir": str(suite_dir)},
        experts_dir=str(experts_dir) if experts_dir else None, cache_dir=str(cache_dir), **kwargs)


def _forbid_labels_and_other_splits(pool, monkeypatch):
    load_train = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name, *a, **k: LabelTrap(load_train(name, *a, **k)))
    for method in ("load_val_dataset", "load_test_dataset"):
        monkeypatch.setattr(pool, method, lambda *a, **k: pytest.fail("distillation read a non-train split"))


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_adapter_presents_target_architecture_label_free_and_reuses_cache(suite_dir, hetero_experts, tmp_path, monkeypatch):
    same_arch = {"kind": "clip", "path": str(suite_dir / "experts" / "tiny_quadrant"),
                 "clip_model": str(suite_dir / "pretrained")}
    pool = _pool(suite_dir, hetero_experts, tmp_path / "cache", experts={"tiny_quadrant": same_arch})
    assert {pool.expert_spec("tiny_colors").kind, pool.expert_spec("tiny_stripes").kind} == {"hf_image_classifier", "clip"}
    _forbid_labels_and_other_splits(pool, monkeypatch)
    pretrained = pool.load_pretrained_model()
    models = {name: pool.load_model(name) for name in pool.model_names}
    assert sorted(models) == ["tiny_colors", "tiny_quadrant", "tiny_stripes"]
    for name, model in models.items():
        assert type(model).__name__ == "CLIPVisionModel"
        assert _shapes(model) == _shapes(pretrained), name
    # the same-architecture expert passes through unchanged; the students moved away from the init
    from transformers import CLIPVisionModel

    quadrant = CLIPVisionModel.from_pretrained(suite_dir / "experts" / "tiny_quadrant").state_dict()
    assert all(torch.equal(models["tiny_quadrant"].state_dict()[k], v) for k, v in quadrant.items())
    assert "tiny_quadrant" not in pool.distillation_reports
    for task in ("tiny_colors", "tiny_stripes"):
        assert any(not torch.equal(models[task].state_dict()[k], v) for k, v in pretrained.state_dict().items())
        entry = Path(pool.student_path(task))
        report = json.loads((entry / "distillation.json").read_text())
        assert report == pool.distillation_reports[task]
        assert report["uses_ground_truth_labels"] is False and report["split"] == "train"
        assert report["settings"]["temperature"] == 4.0 and report["settings"]["alpha"] == 0.7
        agree = report["agreement_with_teacher"]
        assert report["num_held_out_images"] > 0 and 0.0 <= agree["held_out"] <= 1.0
        assert agree["held_out_before_distillation"] is not None and len(report["history"]) >= 3
        assert list((tmp_path / "cache" / "tensorboard" / entry.name).glob("events.out.tfevents.*"))

    # a second pool with the same settings loads the cached students: no distillation at all
    def no_distillation(*args, **kwargs):
        raise AssertionError("distilled again instead of loading the cache")

    monkeypatch.setattr(heterogeneous, "distill_student", no_distillation)
    again = _pool(suite_dir, hetero_experts, tmp_path / "cache", experts={"tiny_quadrant": same_arch})
    _forbid_labels_and_other_splits(again, monkeypatch)
    for task in ("tiny_colors", "tiny_stripes"):
        reloaded = again.load_model(task).state_dict()
        assert all(torch.equal(reloaded[k], v) for k, v in models[task].state_dict().items())
    assert _shapes(DistillHeterogeneousExperts().run(again)) == _shapes(pretrained)  # the pre-distil step
    # changing a setting that changes the student is a cache miss
    changed = _pool(suite_dir, hetero_experts, tmp_path / "cache", distillation={**TINY, "alpha": 0.5})
    _forbid_labels_and_other_splits(changed, monkeypatch)
    with pytest.raises(AssertionError, match="distilled again"):
        changed.load_model("tiny_colors")


def test_missing_target_is_a_clear_error(suite_dir, hetero_experts):
    with pytest.raises(HeteroPoolError, match="no `_pretrained_`"):
        HeterogeneousDistillationModelPool(
            models={"tiny_colors": {"kind": "hf_image_classifier", "path": str(hetero_experts / "tiny_colors")},
                    "tiny_quadrant": str(suite_dir / "experts" / "tiny_quadrant")},
            processor=str(suite_dir / "pretrained"))


def test_expert_whose_head_does_not_fit_the_task_is_a_clear_error(suite_dir, tmp_path):
    builder = _builder()
    wrong = tmp_path / "seven_way"
    builder.make_model([f"c{i}" for i in range(7)], 8, [1, 1, 1, 1]).save_pretrained(wrong)
    builder.make_processor(16).save_pretrained(wrong)
    pool = _pool(suite_dir, None, tmp_path / "cache",
                 experts={"tiny_colors": {"kind": "hf_image_classifier", "path": str(wrong)}})
    with pytest.raises(HeteroExpertError, match="7-way head, but task 'tiny_colors' has 4 classes"):
        pool.load_model("tiny_colors")


def _direct_pool(suite_dir, hetero_experts, tmp_path, train_datasets=None):
    register_suite_tasks(read_suite_tasks(suite_dir))
    return HeterogeneousDistillationModelPool(
        models={"_pretrained_": str(suite_dir / "pretrained"),
                "tiny_colors": {"kind": "hf_image_classifier", "path": str(hetero_experts / "tiny_colors")}},
        processor=str(suite_dir / "pretrained"), train_datasets=train_datasets,
        cache_dir=str(tmp_path / "cache"), distillation=TINY)


def test_task_without_unlabeled_data_is_a_clear_error(suite_dir, hetero_experts, tmp_path, monkeypatch):
    with pytest.raises(HeteroPoolError, match="'tiny_colors' has no unlabeled data.*`train_datasets` has no entry"):
        _direct_pool(suite_dir, hetero_experts, tmp_path).load_model("tiny_colors")
    data = {"tiny_colors": {"_target_": "datasets.load_from_disk",
                            "dataset_path": str(suite_dir / "data" / "tiny_colors" / "train")}}
    pool = _direct_pool(suite_dir, hetero_experts, tmp_path, train_datasets=data)
    load = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: load(name).select([]))
    with pytest.raises(HeteroPoolError, match="'tiny_colors' has 0 unlabeled image"):
        pool.load_model("tiny_colors")


def test_settings_refuse_the_test_split_and_typos():
    with pytest.raises(HeteroPoolError, match="allow_test_split"):
        DistillationSettings.from_config({"split": "test"})
    assert DistillationSettings.from_config({"split": "test", "allow_test_split": True}).split == "test"
    with pytest.raises(HeteroPoolError, match="Unknown distillation settings"):
        DistillationSettings.from_config({"temprature": 2})
    with pytest.raises(HeteroExpertError, match="unknown kind"):
        ExpertSpec.parse("x", {"kind": "onnx", "path": "m.onnx"})


class TinyNet(nn.Module):
    """A stand-in for a torchvision classifier (``weights=None, num_classes=...``)."""

    def __init__(self, weights=None, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def test_torchvision_and_torch_module_teachers(suite_dir, tmp_path, monkeypatch):
    import datasets

    fake = types.ModuleType("torchvision")
    fake.models = types.ModuleType("torchvision.models")
    fake.models.resnet18 = TinyNet
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake.models)
    torch.save(TinyNet(num_classes=4).state_dict(), tmp_path / "four.pt")
    torch.save(TinyNet(num_classes=10).state_dict(), tmp_path / "ten.pt")
    images = datasets.load_from_disk(str(suite_dir / "data" / "tiny_colors" / "train"))[:3]["image"]
    classnames = read_suite_tasks(suite_dir)["tiny_colors"]["classnames"]
    pre = {"resize": 16, "crop_size": 12}
    specs = [{"kind": "torchvision", "arch": "resnet18", "path": str(tmp_path / "four.pt"), "preprocessing": pre},
             {"kind": "torch", "model": {"_target_": f"{__name__}.TinyNet", "num_classes": 4},
              "path": str(tmp_path / "four.pt"), "preprocessing": pre}]
    for cfg in specs:
        teacher = load_teacher(ExpertSpec.parse("tiny_colors", cfg), "tiny_colors", classnames, [])
        pixels = teacher.pixels(images)
        assert pixels.shape == (3, 3, 12, 12)
        assert teacher.logits(pixels).shape == (3, 4)
    assert isinstance(teacher.preprocess, ImageTransform)
    with pytest.raises(HeteroExpertError, match="head size != number of classes"):
        load_teacher(ExpertSpec.parse("tiny_colors", {**specs[0], "path": str(tmp_path / "ten.pt")}),
                     "tiny_colors", classnames, [])
    with pytest.raises(HeteroExpertError, match="has no 'resnet999'"):
        load_teacher(ExpertSpec.parse("tiny_colors", {**specs[0], "arch": "resnet999"}), "tiny_colors", classnames, [])


def test_ta8_hetero_config_composes_to_the_adapter():
    """Composed in-process with the host's config tree plus ours (what `fusion_bench` does)."""
    import fusion_bench_config
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=list(fusion_bench_config.__path__)[0], version_base=None):
        cfg = compose("fabric_model_fusion", overrides=["method=task_arithmetic",
                                                         "modelpool=clip-vit-base-patch32_TA8_hetero"])
    pool = cfg.modelpool
    assert pool._target_ == "fusion_bench_statsmerging.modelpool.heterogeneous.HeterogeneousDistillationModelPool"
    assert pool.models._pretrained_ == "openai/clip-vit-base-patch32" and len(pool.models) == 9
    assert {t: e.path for t, e in pool.experts.items()} == {
        "eurosat": "tanganke/clip-vit-base-patch16_eurosat", "dtd": "tanganke/clip-vit-base-patch16_dtd"}
    assert pool.distillation.temperature == 4.0 and pool.distillation.alpha == 0.7
    assert pool.distillation.split == "train" and "eurosat" in pool.train_datasets


def test_cli_merges_the_adapted_pool_with_ours_and_the_hosts_method(tmp_path, suite_dir, hetero_experts):
    env = _env(tmp_path, suite_dir)
    pool = ["modelpool=clip_suite_hetero", "taskpool=clip_suite", f"modelpool.experts_dir={hetero_experts}",
            f"modelpool.cache_dir={tmp_path / 'students'}", "fabric.accelerator=cpu"]
    pool += [f"modelpool.distillation.{k}={v}" for k, v in TINY.items()]
    tasks = json.loads((suite_dir / "tasks.json").read_text())
    runs = {"statsmerging": ["method=statsmerging", "method.max_steps=3", "method.data_fraction=0.25",
                             "method.batch_size=8"],
            "task_arithmetic": ["method=task_arithmetic", "method.scaling_factor=0.3"]}
    outputs, students = {}, tmp_path / "students"
    for name, method in runs.items():
        log_dir = tmp_path / name
        proc = _run([*method, *pool, f"path.log_dir={log_dir}"], REPO_ROOT, env)
        outputs[name] = proc.stdout + proc.stderr
        report = json.loads((log_dir / "program_report.json").read_text())
        assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in tasks)
        if name == "statsmerging":
            written = {p: p.stat().st_mtime_ns for p in students.glob("*/distillation.json")}
    # the progress bars of the two distillations (the host's method ran under no_grad: still fine)
    assert "Distilling hf_image_classifier expert -> CLIP (tiny_colors)" in outputs["statsmerging"]
    assert "Distilling clip expert -> CLIP (tiny_stripes)" in outputs["statsmerging"]
    assert len(written) == 2
    # the host's method ran second: it loaded both students from the cache, distilling nothing
    assert "expert -> CLIP" not in outputs["task_arithmetic"]
    assert {p: p.stat().st_mtime_ns for p in students.glob("*/distillation.json")} == written


def test_publishing_a_student_is_atomic_and_the_first_writer_wins(suite_dir, tmp_path):
    from transformers import CLIPVisionModel

    model = CLIPVisionModel.from_pretrained(suite_dir / "pretrained")
    entry = tmp_path / "cache" / "task-kind-0123"
    assert heterogeneous._publish(entry, model, {"run": 1}) == {"run": 1}
    assert heterogeneous._publish(entry, model, {"run": 2}) == {"run": 1}  # e.g. two methods run with --jobs 2
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left behind
