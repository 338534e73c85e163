"""Each user mistake gets one clear message, raised before any long work."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import make_algorithm
from fusion_bench_statsmerging.engine.merge import ArchitectureMismatchError, HostLayerWiseEngine
from fusion_bench_statsmerging.utils.errors import PoolError
from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool, SuiteError


def test_unknown_protocol(tmp_path, cpu_fabric):
    with pytest.raises(ValueError, match="Unknown data protocol 'test'.*train_unlabeled"):
        make_algorithm(tmp_path, cpu_fabric, protocol="test")


@pytest.mark.parametrize("key,value,message", [
    ("mode", "row_wise", "Unknown mode"),
    ("loss", "mse", "Unknown loss"),
    ("output", "tanh", "Unknown learner output"),
    ("features", ["mean", "skew"], "subset of"),
    ("merge_engine", "magic", "Unknown merge_engine"),
    ("optimizer", "sgd", "Unknown optimizer"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("data_fraction", 0.0, "data_fraction"),
])
def test_bad_config(tmp_path, cpu_fabric, key, value, message):
    with pytest.raises(ValueError, match=message):
        make_algorithm(tmp_path, cpu_fabric, **{key: value})


def test_pool_without_pretrained(tmp_path, suite_dir, cpu_fabric):
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir))
    del pool._models["_pretrained_"]
    with pytest.raises(PoolError, match="no `_pretrained_` model"):
        make_algorithm(tmp_path, cpu_fabric).run(pool)


def test_pool_with_one_expert(tmp_path, suite_dir, cpu_fabric):
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir), tasks=["tiny_colors"])
    with pytest.raises(PoolError, match="at least two"):
        make_algorithm(tmp_path, cpu_fabric).run(pool)


def test_task_without_train_data(tmp_path, suite_dir, cpu_fabric):
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir))
    del pool._train_datasets["tiny_stripes"]
    with pytest.raises(PoolError, match=r"`train_datasets` has no entry for \['tiny_stripes'\]"):
        make_algorithm(tmp_path, cpu_fabric).run(pool)


def test_empty_and_too_small_datasets(tmp_path, suite_dir, cpu_fabric, monkeypatch):
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir))
    real = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda n: real(n).select([]) if n == "tiny_colors" else real(n))
    with pytest.raises(PoolError, match="train dataset of task 'tiny_colors' is empty"):
        make_algorithm(tmp_path, cpu_fabric).run(pool)
    monkeypatch.setattr(pool, "load_train_dataset", lambda n: real(n).select(range(3)))
    with pytest.raises(PoolError, match="fewer than one batch"):
        make_algorithm(tmp_path, cpu_fabric, batch_size=8).run(pool)


def test_mismatched_architecture_points_to_adapter(tmp_path, suite_dir):
    pretrained = CLIPVisionModel.from_pretrained(suite_dir / "pretrained")
    other = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=16, patch_size=4))
    with pytest.raises(ArchitectureMismatchError, match="heterogeneous-distillation adapter"):
        HostLayerWiseEngine(pretrained, [other, CLIPVisionModel.from_pretrained(suite_dir / "pretrained")])


def test_non_finite_weights(tmp_path, suite_dir):
    pretrained = CLIPVisionModel.from_pretrained(suite_dir / "pretrained")
    broken = CLIPVisionModel.from_pretrained(suite_dir / "experts" / "tiny_colors")
    with torch.no_grad():
        broken.vision_model.post_layernorm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite values.*post_layernorm.weight"):
        HostLayerWiseEngine(pretrained, [broken, CLIPVisionModel.from_pretrained(suite_dir / "pretrained")])


def test_missing_suite(tmp_path):
    with pytest.raises(SuiteError, match="No suite at"):
        CLIPSuiteModelPool(suite_dir=str(tmp_path / "nowhere"))
