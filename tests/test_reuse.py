"""Learner reuse: learner.pt round trip, another number of layers, clear errors, the config."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from conftest import REPO_ROOT, make_algorithm
from fusion_bench_statsmerging.fixtures.clip import tiny_clip_config
from fusion_bench_statsmerging.engine.learner import relative_depth
from fusion_bench_statsmerging.engine.merge import HostLayerWiseEngine
from fusion_bench_statsmerging.engine.reuse import FORMAT_VERSION, LearnerFileError, load_learner
from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool
from fusion_bench_statsmerging.engine.trainer import Trainer

REUSE = dict(mode=None, features=None, rank=None)  # as config/method/statsmerging_reuse.yaml leaves them


@pytest.fixture(scope="module")
def trained(tmp_path_factory, suite_dir) -> Path:
    """Artefacts of a short StatsMerging run on the tiny suite (its learner.pt is reused below)."""
    out = tmp_path_factory.mktemp("trained")
    algorithm = make_algorithm(out, L.Fabric(accelerator="cpu", devices=1), max_steps=3)
    algorithm.run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))
    return out / "artifacts"


def _no_images(modelpool, monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("a reused learner with max_steps 0 must not read any dataset")

    for name in ("load_train_dataset", "load_val_dataset", "load_test_dataset"):
        monkeypatch.setattr(modelpool, name, trap)


def test_saved_learner_predicts_the_same_coefficients_without_data(trained, tmp_path, modelpool, cpu_fabric,
                                                                   monkeypatch):
    saved = load_learner(trained / "learner.pt")
    assert saved.format_version == FORMAT_VERSION
    assert saved.options["features"] == ["mean", "variance", "norm", "singular_values"] and saved.options["rank"] == 3
    assert saved.pool["model_names"] == list(modelpool.model_names)
    assert saved.raw_statistics.shape == (3, len(saved.pool["param_names"]), 6)

    _no_images(modelpool, monkeypatch)
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=0, learner_path=str(trained / "learner.pt"), **REUSE)
    assert algorithm.reuses_without_training and algorithm.features == saved.options["features"]
    algorithm.run(modelpool)

    out = tmp_path / "artifacts"
    torch.testing.assert_close(torch.load(out / "coefficients.pt"), torch.load(trained / "coefficients.pt"),
                               rtol=0, atol=1e-6)
    report = json.loads((out / "statsmerging_report.json").read_text())
    assert report["protocol"]["name"] == "reused_learner_no_data" and report["fit_data"] == {}
    reuse = json.loads((out / "reuse_report.json").read_text())
    assert reuse["images_read"] is False and reuse["loaded_from"] == str(trained / "learner.pt")
    # the reused learner is saved again, with the same weights, and can itself be reused
    again = load_learner(out / "learner.pt")
    for k, v in saved.state_dict.items():
        torch.testing.assert_close(again.state_dict[k], v, rtol=0, atol=0)


def _deeper_engine(num_layers: int, num_experts: int = 2):
    """A CLIP vision tower of another depth and experts = pretrained + small updates."""
    torch.manual_seed(1)
    cfg = CLIPVisionConfig(**{**tiny_clip_config().vision_config.to_dict(), "num_hidden_layers": num_layers})
    pretrained = CLIPVisionModel(cfg)
    experts = []
    for _ in range(num_experts):
        expert = CLIPVisionModel(cfg)
        expert.load_state_dict({k: v + 0.01 * torch.randn_like(v) for k, v in pretrained.state_dict().items()})
        experts.append(expert)
    return HostLayerWiseEngine(pretrained, experts)


@pytest.mark.parametrize("normalizer", ["saved", "refit"])
def test_saved_learner_scores_a_pool_with_another_number_of_layers(trained, tmp_path, cpu_fabric, normalizer):
    saved = load_learner(trained / "learner.pt")
    engine = _deeper_engine(num_layers=4)
    num_tensors = len(engine.param_names)
    assert num_tensors > len(saved.pool["param_names"])  # a deeper model than the one it was trained on

    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=0, learner_path=str(trained / "learner.pt"),
                               normalizer=normalizer, **REUSE)
    module = algorithm.build_coefficient_module(engine, ["a", "b"])
    coef = module()
    assert coef.shape == (2, num_tensors) and torch.isfinite(coef).all()
    assert ((coef > 0) & (coef < saved.options["max_coefficient"])).all()
    torch.testing.assert_close(module.depth, relative_depth(num_tensors))
    # exactly the saved learner on the new pool's statistics, with the chosen transform
    raw = algorithm._raw_statistics
    transform = saved.normalizer if normalizer == "saved" else type(saved.normalizer).fit(raw)
    expected = saved.build()(transform(raw).float(), relative_depth(num_tensors))
    torch.testing.assert_close(coef, expected)

    files = algorithm.extra_artifacts(module, str(tmp_path / "out"))
    reuse = json.loads(Path(files["reuse_report"]).read_text())
    mapping = reuse["relative_depth_mapping"]
    assert len(mapping) == num_tensors and mapping[0]["relative_depth"] == 0 and mapping[-1]["relative_depth"] == 1
    assert mapping[-1]["nearest_training_tensor"] == saved.pool["param_names"][-1]


def test_mismatched_options_and_bad_files_fail_clearly(trained, tmp_path, cpu_fabric):
    path = str(trained / "learner.pt")
    for override, key in [({"features": ["mean", "norm"]}, "features"), ({"rank": 2}, "rank"),
                          ({"mode": "task_wise"}, "mode"), ({"hidden_dim": 64}, "hidden_dim")]:
        with pytest.raises(LearnerFileError, match=rf"{key}: configured .* saved") as info:
            make_algorithm(tmp_path, cpu_fabric, max_steps=0, learner_path=path, **{**REUSE, **override})
        assert "set them to null" in str(info.value)
    with pytest.raises(LearnerFileError, match="does not exist"):
        make_algorithm(tmp_path, cpu_fabric, learner_path=str(tmp_path / "nope.pt"), **REUSE)
    with pytest.raises(LearnerFileError, match="not a StatsMerging learner file"):
        make_algorithm(tmp_path, cpu_fabric, learner_path=str(trained / "coefficients.pt"), **REUSE)
    future = torch.load(path)
    future["format_version"] = FORMAT_VERSION + 1
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(LearnerFileError, match="format version"):
        make_algorithm(tmp_path, cpu_fabric, learner_path=str(tmp_path / "future.pt"), **REUSE)
    with pytest.raises(ValueError, match="only with learner_path"):
        make_algorithm(tmp_path, cpu_fabric, **REUSE)
    with pytest.raises(ValueError, match="normalizer"):
        make_algorithm(tmp_path, cpu_fabric, learner_path=path, normalizer="pool", **REUSE)


def test_version_0_files_still_load(trained, tmp_path):
    state = torch.load(trained / "learner.pt")
    legacy = {k: state[k] for k in ("learner_state_dict", "normalizer", "raw_statistics", "learner_config",
                                    "mode", "features", "rank")}
    torch.save(legacy, tmp_path / "v0.pt")
    old, new = load_learner(tmp_path / "v0.pt"), load_learner(trained / "learner.pt")
    assert old.format_version == 0 and old.options == new.options


def test_fine_tuning_starts_from_the_loaded_learner(trained, tmp_path, modelpool, cpu_fabric, monkeypatch):
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=2, learner_path=str(trained / "learner.pt"), **REUSE)
    assert not algorithm.reuses_without_training
    start = {}
    original = Trainer.train

    def spy(trainer, engine, module, fit, *rest, **kwargs):
        start["coef"] = module().detach().cpu()
        start["tasks"] = sorted(fit.inputs)
        return original(trainer, engine, module, fit, *rest, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    algorithm.run(modelpool)
    torch.testing.assert_close(start["coef"], torch.load(trained / "coefficients.pt"), rtol=0, atol=1e-6)
    assert start["tasks"] == sorted(modelpool.model_names)  # it did read fitting data, as training must
    after = torch.load(tmp_path / "artifacts" / "coefficients.pt")
    assert (after - start["coef"]).abs().max() > 0  # and it trained


def test_reuse_config_composes_and_requires_a_learner(trained):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        cfg = compose(overrides=["+method=statsmerging_reuse", f"method.learner_path={trained / 'learner.pt'}"])
        algorithm = instantiate(cfg.method)
        assert algorithm.reuses_without_training and algorithm.normalizer == "saved"
        assert algorithm.rank == 3 and algorithm.mode == "layer_wise"
        with pytest.raises(MissingMandatoryValue):
            instantiate(compose(overrides=["+method=statsmerging_reuse"]).method)
