"""The paper's schedule in epochs, the residual learner of StatsMerging-R, and label-free selection."""

import json
from pathlib import Path

import pytest
import torch

from conftest import make_algorithm
from test_training import LabelTrap
from fusion_bench_statsmerging.engine.learner import StatsMergeLearner
from fusion_bench_statsmerging.method.statsmerging.coefficients import LearnerCoefficients
from fusion_bench_statsmerging.engine.schedule import resolve_schedule, steps_per_epoch
from fusion_bench_statsmerging.engine.selection import BestState
from fusion_bench_statsmerging.engine.trainer import Trainer


def test_an_epoch_is_one_pass_over_the_largest_fit_set():
    assert steps_per_epoch({"a": 40, "b": 16, "c": 17}, 16) == 3  # ceil(40 / 16)
    assert steps_per_epoch({"a": 16}, 16) == 1
    s = resolve_schedule({"a": 40, "b": 16}, 16, max_epochs=500, lr_step_epochs=100)
    assert (s.max_steps, s.lr_step_size, s.steps_per_epoch, s.epochs) == (1500, 300, 3, 500)


def test_explicit_steps_override_epochs():
    s = resolve_schedule({"a": 40}, 16, max_steps=7, max_epochs=500, lr_step_size=2, lr_step_epochs=100)
    assert (s.max_steps, s.lr_step_size) == (7, 2)
    assert resolve_schedule({"a": 40}, 16, max_epochs=2).lr_step_size is None
    with pytest.raises(ValueError, match="max_epochs"):
        resolve_schedule({"a": 40}, 16)
    with pytest.raises(ValueError, match="lr_step_epochs"):
        resolve_schedule({"a": 40}, 16, max_epochs=1, lr_step_epochs=0)


def test_training_runs_epochs_and_steps_the_learning_rate_per_epoch(tmp_path, modelpool, cpu_fabric):
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=None, max_epochs=4, lr_step_size=None,
                               lr_step_epochs=2, data_fraction=0.2)
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    sizes = {t: d["num_samples"] for t, d in report["fit_data"].items()}
    per_epoch = -(-max(sizes.values()) // algorithm.batch_size)
    assert per_epoch > 1  # the test means something: an epoch is several steps here
    assert report["schedule"] == {"max_steps": 4 * per_epoch, "lr_step_size": 2 * per_epoch,
                                  "steps_per_epoch": per_epoch, "epochs": 4.0}
    lr = {h["step"]: h["train/lr"] for h in report["history"]}  # logged after the step's scheduler update
    assert lr[0] == pytest.approx(1e-3)
    assert lr[2 * per_epoch - 1] == pytest.approx(1e-4) and lr[2 * per_epoch - 2] == pytest.approx(1e-3)
    assert len(report["history"]) == 4 * per_epoch


def test_residual_and_learner_both_get_gradients():
    torch.manual_seed(0)
    learner = StatsMergeLearner(5)
    module = LearnerCoefficients(learner, torch.randn(3, 7, 5), 7, "layer_wise", residual=True)
    torch.testing.assert_close(module(), learner(module.features, module.depth))  # residual starts at 0
    (module() * torch.randn(3, 7)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert module.residual.shape == (3, 7)


def test_best_state_keeps_the_highest_score():
    module = torch.nn.Linear(2, 1)
    best = BestState()
    best.offer(0.5, 0, module)
    kept = module.weight.detach().clone()
    with torch.no_grad():
        module.weight += 1
    assert not best.offer(0.4, 10, module)
    best.restore(module)
    torch.testing.assert_close(module.weight.detach(), kept)
    assert best.summary()["best_step"] == 0


def test_validation_selection_reads_no_label_and_no_test_image(tmp_path, modelpool, cpu_fabric, monkeypatch):
    for split in ("train", "val"):
        real = getattr(modelpool, f"load_{split}_dataset")
        monkeypatch.setattr(modelpool, f"load_{split}_dataset", lambda name, real=real: LabelTrap(real(name)))
    monkeypatch.setattr(modelpool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=6, lr_step_size=None, lr=5e-2, residual=True,
                               loss="soft", temperature=2.0, select_by="validation_agreement", select_every=2,
                               select_samples=16)
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    selection = report["selection"]
    assert set(selection["agreement_by_step"]) == {"0", "2", "4", "6"}
    best_step = selection["best_step"]
    assert selection["best_agreement"] == max(selection["agreement_by_step"].values())
    assert selection["agreement_by_step"][str(best_step)] == selection["best_agreement"]
    # the result is the kept state, not the last: its coefficients are those logged after step best_step
    history = {h["step"]: h for h in report["history"]}
    assert 0 < best_step < 6, "the tiny run no longer keeps an earlier state: this test would not tell"
    coefficients = torch.load(tmp_path / "artifacts" / "coefficients.pt")
    assert float(coefficients.mean()) == pytest.approx(history[best_step - 1]["coefficients/mean"], abs=1e-6)
    assert float(coefficients.mean()) != pytest.approx(history[5]["coefficients/mean"], abs=1e-6)


def test_feature_distillation_adds_the_experts_features_to_the_loss(tmp_path, modelpool, cpu_fabric):
    """With feature_weight the targets carry each expert's features and the loss grows by their misfit."""
    runs = {}
    for weight in (0.0, 1.0):
        algorithm = make_algorithm(tmp_path / str(weight), cpu_fabric, max_steps=2, lr_step_size=None,
                                   feature_weight=weight, residual=True)
        algorithm.run(modelpool)
        runs[weight] = json.loads((tmp_path / str(weight) / "artifacts" / "statsmerging_report.json").read_text())
    first = {w: r["history"][0]["train/loss"] for w, r in runs.items()}
    assert first[1.0] > first[0.0] + 1e-4  # same merge at step 0; the feature term is positive
    with pytest.raises(ValueError, match="feature_weight"):
        make_algorithm(tmp_path / "gt", cpu_fabric, feature_weight=1.0, protocol="train_ground_truth")
    with pytest.raises(ValueError, match="sam_space"):
        make_algorithm(tmp_path / "bad", cpu_fabric, sam_space="outputs")


@pytest.mark.parametrize("sam_space", ["parameters", "coefficients"])
def test_statsmerging_r_config_composes_and_trains_learner_and_residual(tmp_path, modelpool, cpu_fabric, monkeypatch,
                                                                        sam_space):
    """The recommended configuration as shipped (and with SAM in coefficient space): every trainable
    parameter (MLP and residual) gets a gradient."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from conftest import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "config"), version_base=None):
        cfg = compose(overrides=["+method=statsmerging_residual"]).method
    assert (cfg.residual, cfg.loss, cfg.optimizer, cfg.select_by) == (True, "soft", "sam", "validation_agreement")
    assert len(cfg.starts) == 2
    cfg.max_steps, cfg.select_every, cfg.batch_size, cfg.sam_space, cfg.start_probe_steps = 3, 2, 8, sam_space, 1
    cfg.artifact_dir = str(tmp_path / "artifacts")
    algorithm = instantiate(cfg)
    algorithm.fabric = cpu_fabric
    seen = {}
    original = Trainer.make_optimizer
    monkeypatch.setattr(Trainer, "make_optimizer", lambda trainer, params: original(
        trainer, seen.setdefault("p", []).append(list(params)) or seen["p"][-1]))
    score = Trainer.selection_score
    snapshots = []

    def spy(trainer, engine, module, data):  # the main run's last three calls: at step 0, after steps 2 and 3
        snapshots.append([p.detach().clone() for p in module.parameters()])
        return score(trainer, engine, module, data)

    monkeypatch.setattr(Trainer, "selection_score", spy)
    algorithm.run(modelpool)
    assert [len(p) for p in seen["p"]] == [5] * 3  # two MLP layers (weight, bias each) + the residual
    assert len(snapshots) == 2 * 2 + 3  # two probes of one step (scored at 0 and 1), then the run
    for i, (before, after) in enumerate(zip(snapshots[-3], snapshots[-1])):
        assert not torch.equal(before, after), f"parameter {i} never moved: it got no gradient"
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    assert set(report["selection"]["agreement_by_step"]) == {"0", "2", "3"}
    assert [set(r["agreement_by_step"]) for r in report["start_probe"]["results"]] == [{"0", "1"}] * 2




def test_fit_data_placement_auto_keeps_a_large_fit_set_in_host_memory(monkeypatch):
    """``fit_data_on_device: auto`` sends the fit set to the GPU only when it takes at most a quarter of the
    free memory (the recommended budget is GBs of CLIP pixels); true / false decide; the CPU keeps it."""
    from fusion_bench_statsmerging.utils import inputs
    from fusion_bench_statsmerging.utils.errors import UserError

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (16 * 2**30, 24 * 2**30))
    assert inputs.keep_fit_data_on_device("auto", 3 * 2**30, cuda)
    assert not inputs.keep_fit_data_on_device("auto", 19 * 2**30, cuda)
    assert inputs.keep_fit_data_on_device(True, 19 * 2**30, cuda)
    assert not inputs.keep_fit_data_on_device(False, 1, cuda)
    assert inputs.keep_fit_data_on_device("auto", 10**12, torch.device("cpu"))
    assert inputs.nbytes({"a": torch.zeros(4, 3), "b": {"c": torch.zeros(2, dtype=torch.float16)}}) == 52
    with pytest.raises(UserError, match="fit_data_on_device"):
        make_algorithm(Path("unused"), None, fit_data_on_device="sometimes")
