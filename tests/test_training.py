"""StatsMerging trains only its learner, through the merged model, without labels by default."""

import json
import time

import pytest
import torch
from transformers import CLIPVisionModel

from conftest import make_algorithm
from fusion_bench_statsmerging.engine.distillation import PROTOCOLS
from fusion_bench_statsmerging.utils.errors import UserError
from fusion_bench_statsmerging.engine.learner import StatsMergeLearner
from fusion_bench_statsmerging.engine.merge import HostLayerWiseEngine
from fusion_bench_statsmerging.method.statsmerging.clip_statsmerging import LearnerCoefficients, pool_statistics
from fusion_bench_statsmerging.engine.stats import FeatureNormalizer
from fusion_bench_statsmerging.engine.trainer import Trainer


def _engine(suite_dir):
    pretrained = CLIPVisionModel.from_pretrained(suite_dir / "pretrained")
    tasks = sorted(p.name for p in (suite_dir / "experts").iterdir())
    experts = [CLIPVisionModel.from_pretrained(suite_dir / "experts" / t) for t in tasks]
    return HostLayerWiseEngine(pretrained, experts), tasks


def test_learner_starts_at_init_coefficient():
    torch.manual_seed(0)
    learner = StatsMergeLearner(6, init_coefficient=0.3)
    coef = learner(torch.randn(4, 10, 6))
    assert coef.shape == (4, 10)
    torch.testing.assert_close(coef, torch.full_like(coef, 0.3), atol=0.02, rtol=0)
    soft = StatsMergeLearner(6, output="softmax")(torch.randn(4, 10, 6))
    torch.testing.assert_close(soft.sum(0), torch.ones(10))


def test_every_learner_parameter_gets_a_gradient_through_the_merged_model(suite_dir):
    engine, _ = _engine(suite_dir)
    raw = pool_statistics(engine, "layer_wise", ["mean", "variance", "norm", "singular_values"], 3)
    learner = StatsMergeLearner(raw.shape[-1])
    module = LearnerCoefficients(learner, FeatureNormalizer.fit(raw)(raw), len(engine.param_names), "layer_wise")
    engine.set_coefficients(module())
    out = engine(pixel_values=torch.randn(4, 3, 16, 16))[1]
    out.square().sum().backward()
    for name, p in learner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_training_changes_only_the_learner(tmp_path, suite_dir, modelpool, cpu_fabric, monkeypatch):
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=4)
    seen = {}
    original = Trainer.make_optimizer

    def spy(trainer, params):
        seen["params"] = list(params)
        return original(trainer, seen["params"])

    monkeypatch.setattr(Trainer, "make_optimizer", spy)
    expert_before = {t: CLIPVisionModel.from_pretrained(suite_dir / "experts" / t).state_dict()
                     for t in modelpool.model_names}
    merged = algorithm.run(modelpool)
    heads_after = {t: w.clone() for t, w in algorithm.zeroshot_weights.items()}

    # the optimizer held exactly the learner's parameters
    coefficient_module_params = seen["params"]
    learner_file = torch.load(tmp_path / "artifacts" / "learner.pt")
    assert len(coefficient_module_params) == len(learner_file["learner_state_dict"])
    assert all(p.requires_grad for p in coefficient_module_params)
    # the experts on disk are untouched, the heads are frozen and unchanged by training
    for t, before in expert_before.items():
        now = CLIPVisionModel.from_pretrained(suite_dir / "experts" / t).state_dict()
        assert all(torch.equal(before[k], now[k]) for k in before)
    fresh = make_algorithm(tmp_path / "again", cpu_fabric)
    fresh.modelpool = modelpool
    fresh.setup_zero_shot_classification_head(task_names=modelpool.model_names)
    for t, w in heads_after.items():
        assert not w.requires_grad
        torch.testing.assert_close(w, fresh.zeroshot_weights[t])
    assert not any(p.requires_grad for p in algorithm.visual_projection.parameters())
    assert isinstance(merged, CLIPVisionModel)


class LabelTrap(torch.utils.data.Dataset):
    """Rows whose label raises when read: proves the label-free protocol never looks at one."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        image = self.base[i]["image"]

        class Row(dict):
            def __getitem__(self, key):
                if key == "label":
                    raise AssertionError("a ground-truth label was read")
                return super().__getitem__(key)

        return Row(image=image)


def test_default_protocol_reads_no_label(tmp_path, modelpool, cpu_fabric, monkeypatch):
    real = modelpool.load_train_dataset
    monkeypatch.setattr(modelpool, "load_train_dataset", lambda name: LabelTrap(real(name)))
    monkeypatch.setattr(modelpool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=2)
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    assert report["protocol"]["name"] == "train_unlabeled"
    assert report["protocol"]["uses_ground_truth_labels"] is False
    # and the trap is real: the ground-truth protocol does read labels and trips it
    gt = make_algorithm(tmp_path / "gt", cpu_fabric, max_steps=1, protocol="train_ground_truth")
    with pytest.raises(AssertionError, match="ground-truth label was read"):
        gt.run(modelpool)


def test_no_protocol_combines_labels_with_the_test_split():
    assert all(not (p.ground_truth and p.split == "test") for p in PROTOCOLS.values())
    assert PROTOCOLS["test_time_adaptation"].split == "test"


def _accuracy(model, algorithm, modelpool):
    correct = total = 0
    for task in modelpool.model_names:
        ds = modelpool.load_test_dataset(task)
        px = algorithm.clip_processor(images=list(ds["image"]), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pred = algorithm.compute_logits(model, px, task).argmax(-1)
        correct += int((pred == torch.tensor(ds["label"])).sum())
        total += len(ds)
    return correct / total


def test_statsmerging_beats_simple_averaging(tmp_path, modelpool, cpu_fabric):
    """Each expert carries a planted signal that averaging dilutes by 1/K; the learner recovers it."""
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=60, lr_step_size=None, lr=1e-2)
    merged = algorithm.run(modelpool)
    engine, _ = _engine(modelpool_dir := __import__("pathlib").Path(modelpool.suite_dir))
    average = engine.merge_and_unload(torch.full((engine.num_models, len(engine.param_names)), 1 / engine.num_models))
    ours, avg = _accuracy(merged, algorithm, modelpool), _accuracy(average, algorithm, modelpool)
    print(f"accuracy: StatsMerging {ours:.3f}, simple average {avg:.3f}")
    assert ours >= avg + 0.05, (ours, avg)


@pytest.mark.parametrize("optimizer", ["adam", "sam"])
def test_engines_and_per_task_backward_train_to_the_same_coefficients(tmp_path, modelpool, cpu_fabric, optimizer):
    """The fast engine is a drop-in for the reference, and one backward per task through a single
    merge gives the gradients of one pass over all tasks: same trajectory within float tolerance."""
    runs = {"host": dict(merge_engine="host"), "fused": dict(merge_engine="fused"),
            "per_task": dict(merge_engine="fused", per_task_backward=True)}
    results = {}
    for name, options in runs.items():
        algorithm = make_algorithm(tmp_path / name, cpu_fabric, max_steps=5, optimizer=optimizer, **options)
        algorithm.run(modelpool)
        results[name] = torch.load(tmp_path / name / "artifacts" / "coefficients.pt")
    torch.testing.assert_close(results["fused"], results["host"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(results["per_task"], results["fused"], atol=1e-4, rtol=1e-4)
    assert (results["host"] - 0.3).abs().max() > 1e-3  # training moved the coefficients


def test_per_task_backward_needs_the_fused_engine(tmp_path, cpu_fabric):
    with pytest.raises(ValueError, match="per_task_backward"):
        make_algorithm(tmp_path, cpu_fabric, merge_engine="host", per_task_backward=True)


def test_profile_steps_writes_a_profile_of_the_training_loop(tmp_path, modelpool, cpu_fabric):
    """method.profile_steps=N profiles N steps after the warm-up: the table on disk, a summary in the report."""
    from fusion_bench_statsmerging.engine.profiling import WARMUP_STEPS

    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=WARMUP_STEPS + 3, profile_steps=2)
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    profile = report["profile"]
    assert profile["profiled_steps"] == 2 and profile["ms_per_step_wall"] > 0
    table = (tmp_path / "artifacts" / "profile.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    # the loop's clock bills every step once: the first, the profiled ones, the steady rest
    loop = report["loop"]
    assert loop["steps"] == {"first step": 1, "steps": (WARMUP_STEPS + 3) - 1 - 2, "profiled steps": 2}
    assert loop["ms_per_step_steady"] > 0 and loop["seconds"]["logging"] > 0 and loop["seconds"]["profiler"] > 0
    with pytest.raises(UserError, match="profile_steps"):
        make_algorithm(tmp_path / "bad", cpu_fabric, profile_steps=-1)


def test_loop_clock_bills_time_and_steps_to_the_bucket_of_each_lap():
    """Steps between two laps go to the lap's bucket; a lap with no steps (logging) bills time only."""
    from fusion_bench_statsmerging.engine.profiling import LoopClock

    clock = LoopClock(torch.device("cpu"))
    for _ in range(3):
        clock.step_done()
    time.sleep(0.03)
    clock.lap("steps")
    time.sleep(0.01)
    clock.lap("logging")
    clock.step_done()
    clock.lap("first step")
    summary = clock.summary()
    assert summary["steps"] == {"steps": 3, "first step": 1}
    assert summary["seconds"]["steps"] >= 0.03 and summary["seconds"]["logging"] >= 0.01
    assert summary["ms_per_step_steady"] == pytest.approx(1e3 * summary["seconds"]["steps"] / 3, abs=0.2)  # seconds are rounded to ms
    assert LoopClock(torch.device("cpu")).summary()["ms_per_step_steady"] is None


def test_a_run_shorter_than_the_profile_window_still_reports(tmp_path):
    """A run that ends inside the window is profiled over the steps it had; one that ends before the
    warm-up says so, instead of leaving no profile and no word."""
    from fusion_bench_statsmerging.engine.profiling import WARMUP_STEPS, StepProfiler

    inside = StepProfiler(10, str(tmp_path / "inside"), torch.device("cpu"))
    for step in range(1, WARMUP_STEPS + 3):
        torch.ones(8).sum()
        inside.after_step(step)
    inside.finish(WARMUP_STEPS + 2)
    assert inside.summary["profiled_steps"] == 2 and (tmp_path / "inside" / "profile.txt").is_file()
    early = StepProfiler(10, str(tmp_path / "early"), torch.device("cpu"))
    for step in range(1, 3):
        early.after_step(step)
    early.finish(2)
    assert early.summary["profiled_steps"] == 0 and "warm-up" in early.summary["note"]
    assert not (tmp_path / "early").exists()


def test_threaded_preprocessing_gives_the_sequential_pixels(tmp_path):
    """Images are preprocessed in parallel chunks (PIL and numpy release the GIL): the pixels, their
    order and dtype do not depend on the number of threads."""
    import datasets
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from fusion_bench_statsmerging.engine.distillation import load_pixels

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8)) for i in range(37)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "label": [0] * 37}, features=features).save_to_disk(str(tmp_path))
    ds = datasets.load_from_disk(str(tmp_path))
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    indices = [3, 0, 36, 5, 17, 22, 9, 30, 11, 1]
    one = load_pixels(ds, indices, processor, batch_size=3, threads=1)
    four = load_pixels(ds, indices, processor, batch_size=3, threads=4)
    assert one.shape == (10, 3, 16, 16) and one.dtype == torch.float16
    assert torch.equal(one, four)
    single = processor(images=[images[3].convert("RGB")], return_tensors="pt")["pixel_values"].to(torch.float16)
    assert torch.equal(four[:1], single)  # the first index's image comes first


def test_auto_start_without_validation_images_scores_the_first_fit_images(tmp_path, modelpool, cpu_fabric):
    """With select_by: last no validation split is loaded: the start is scored on fit (train) images."""
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=1, init_coefficient="auto")
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    search = report["start_search"]
    assert "train split" in search["images"] and len(search["agreement"]) == 9
    assert search["chosen"] == pytest.approx(float(max(search["agreement"], key=search["agreement"].get)))
