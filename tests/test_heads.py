"""Shared backbone + one head per task: tiny CNN (BatchNorm) and tiny BERT-style suites.

Merges run through the fusion_bench CLI (ours and the host's baselines), fitting never reads
a label nor the test split, only the coefficients are optimised, heads stay frozen, and the
BatchNorm options do what they say.
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fusion_bench_statsmerging.engine.batchnorm import (
    BatchNormMerger, batchnorm_layers, batchnorm_with_stats, mixed_batches, reestimate_batchnorm,
    running_stats,
)
from fusion_bench_statsmerging.models.heads import HeadsBackbone, PerTaskHeadsModel
from fusion_bench_statsmerging.modelpool.heads import HeadsSuiteError, PerTaskHeadsModelPool, load_head
from fusion_bench_statsmerging.taskpool.heads import PerTaskHeadsTaskPool
from fusion_bench_statsmerging.fixtures.heads import build_tiny_text_suite
from fusion_bench_statsmerging.method.samerging.heads_samerging import HeadsSAMergingAlgorithm
from fusion_bench_statsmerging.method.statsmerging.heads_statsmerging import HeadsStatsMergingAlgorithm
from fusion_bench_statsmerging.utils.errors import PoolError
from fusion_bench_statsmerging.engine.trainer import Trainer

from conftest import REPO_ROOT, run_fusion_bench


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only spin


@pytest.fixture(scope="module")
def text_suite(tmp_path_factory) -> Path:
    return build_tiny_text_suite(tmp_path_factory.mktemp("heads_text"))


@pytest.fixture
def fabric():
    return L.Fabric(accelerator="cpu", devices=1)


def make(tmp_path, fabric, cls=HeadsStatsMergingAlgorithm, **overrides):
    config = dict(max_steps=4, data_fraction=0.25, batch_size=8, artifact_dir=str(tmp_path / "artifacts"),
                  log_every=1)
    if cls is HeadsSAMergingAlgorithm:
        config.update(num_batches_per_task=3, epochs=None)
    config.update(overrides)
    algorithm = cls(**config)
    algorithm.fabric = fabric
    return algorithm


def accuracy(report):
    return {k: round(v["accuracy"], 3) for k, v in report.items() if isinstance(v, dict) and "accuracy" in v}


# --------------------------------------------------------------------------- CLI
def test_cli_merges_cnn_and_text_pools_ours_and_the_hosts(tmp_path, cnn_suite, text_suite):
    """One interpreter runs the fusion_bench console script's entry point once per command line."""
    common = ["taskpool=heads_suite", "fabric.accelerator=cpu"]
    ours = ["method.max_steps=4", "method.batch_size=8", "method.data_fraction=0.25"]
    runs = {
        "cnn_statsmerging": ["method=statsmerging_heads", "modelpool=heads_suite", *ours],
        "text_statsmerging": ["method=statsmerging_heads", "modelpool=heads_suite", *ours],
        "cnn_task_arithmetic": ["method=task_arithmetic", "modelpool=heads_suite"],
        "cnn_ties_merging": ["method=ties_merging", "modelpool=heads_suite"],
        "text_simple_average": ["method=simple_average", "modelpool=heads_suite"],
    }
    commands = []
    for key, args in runs.items():
        suite = cnn_suite if key.startswith("cnn") else text_suite
        commands.append([*args, *common, f"modelpool.suite_dir={suite}", f"path.log_dir={tmp_path / key}"])
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp_path / "hf_home"))
    proc = run_fusion_bench(commands, tmp_path, env)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    for key in runs:
        report_path = tmp_path / key / "program_report.json"
        assert report_path.is_file(), f"{key} wrote no report\n{log}"
        report = json.loads(report_path.read_text())
        tasks = json.loads(((cnn_suite if key.startswith("cnn") else text_suite) / "tasks.json").read_text())
        for task in tasks:
            assert 0.0 <= report[task]["accuracy"] <= 1.0
        mean = sum(report[t]["accuracy"] for t in tasks) / len(tasks)
        assert abs(report["average"]["accuracy"] - mean) < 1e-9
        print(key, accuracy(report))
    ours_report = json.loads((tmp_path / "cnn_statsmerging" / "statsmerging_report.json").read_text())
    assert ours_report["protocol"]["name"] == "train_unlabeled"
    assert ours_report["batchnorm"]["mode"] == "reestimate" and ours_report["batchnorm"]["split"] == "train"
    text_report = json.loads((tmp_path / "text_statsmerging" / "statsmerging_report.json").read_text())
    assert text_report["batchnorm"]["layers"] == 0  # BERT: LayerNorm only, nothing to do
    # task vectors over the backbone only: no head tensor among the merged ones
    csv = (tmp_path / "cnn_statsmerging" / "coefficients.csv").read_text()
    assert "model.features.0.weight" in csv and "head" not in csv


# --------------------------------------------------------------------------- honesty
class LabelTrap(torch.utils.data.Dataset):
    """Rows whose label raises when read."""

    def __init__(self, base, column):
        self.base, self.column = base, column

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        value = self.base[i][self.column]

        class Row(dict):
            def __getitem__(self, key):
                if key == "label":
                    raise AssertionError("a ground-truth label was read")
                return super().__getitem__(key)

        return Row({self.column: value})


@pytest.mark.parametrize("kind", ["cnn", "text"])
def test_fitting_reads_no_label_and_no_test_split(tmp_path, fabric, monkeypatch, kind, request):
    suite = request.getfixturevalue(f"{kind}_suite")
    pool = PerTaskHeadsModelPool(suite_dir=str(suite))
    real = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(real(name), pool.input_column))
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    monkeypatch.setattr(pool, "load_val_dataset", lambda name: pytest.fail("validation split was read"))
    make(tmp_path, fabric, max_steps=2).run(pool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    assert report["protocol"]["uses_ground_truth_labels"] is False
    with pytest.raises(AssertionError, match="ground-truth label was read"):  # the trap is real
        make(tmp_path / "gt", fabric, max_steps=1, protocol="train_ground_truth").run(pool)


@pytest.mark.parametrize("cls", [HeadsStatsMergingAlgorithm, HeadsSAMergingAlgorithm])
def test_only_coefficients_train_and_heads_stay_frozen(tmp_path, fabric, cnn_suite, monkeypatch, cls):
    pool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    algorithm = make(tmp_path, fabric, cls, max_steps=3)
    seen = {}
    original = Trainer.make_optimizer
    monkeypatch.setattr(Trainer, "make_optimizer", lambda trainer, params: original(trainer, seen.setdefault("p", list(params))))
    on_disk = {t: load_file(str(cnn_suite / "experts" / t / "model.safetensors")) for t in pool.model_names}
    merged = algorithm.run(pool)

    optimised = {id(p) for p in seen["p"]}
    assert not optimised & {id(p) for p in algorithm._heads.parameters()}, "a head was optimised"
    assert all(p.requires_grad for p in seen["p"])
    if cls is HeadsSAMergingAlgorithm:  # free coefficients: the (K, L) tensor is all there is
        assert len(seen["p"]) == 1 and seen["p"][0].shape[0] == len(pool.model_names)
    assert isinstance(merged, PerTaskHeadsModel)
    for task in pool.model_names:
        head = merged.heads[task]
        assert not any(p.requires_grad for p in head.parameters())
        fresh = load_head(cnn_suite / "experts" / task / "head.safetensors")
        torch.testing.assert_close(head.weight.cpu(), fresh.weight)
        torch.testing.assert_close(head.bias.cpu(), fresh.bias)
        now = load_file(str(cnn_suite / "experts" / task / "model.safetensors"))
        assert all(torch.equal(on_disk[task][k], now[k]) for k in now)
    assert not any(p.requires_grad for p in merged.backbone.parameters())
    # each method's own report gets the BatchNorm fields (SAMerging's used to lack them)
    report = json.loads((tmp_path / "artifacts" / algorithm.report_name).read_text())
    assert report["batchnorm"]["mode"] == "reestimate"


# --------------------------------------------------------------------------- BatchNorm
def test_reestimate_gives_the_data_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    data = torch.randn(64, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.0])
    model = HeadsBackbone(nn.Sequential(bn), "image").eval()
    seen = reestimate_batchnorm(model, [data[i:i + 16] for i in range(0, 64, 16)])
    assert seen == 64 and not bn.training
    torch.testing.assert_close(bn.running_mean, data.mean(0))
    per_batch_var = torch.stack([data[i:i + 16].var(0) for i in range(0, 64, 16)]).mean(0)
    torch.testing.assert_close(bn.running_var, per_batch_var)


def test_mixed_batches_cover_every_row_and_never_leave_one_alone():
    """Re-estimation batches mix the tasks, use each row once, and never end in a one-sample batch
    (training-mode BatchNorm cannot normalise it at 1x1 resolution)."""
    inputs = {"a": torch.arange(10.0)[:, None], "b": torch.arange(10.0, 17.0)[:, None]}  # 17 rows
    batches = mixed_batches(inputs, batch_size=8, seed=0)
    assert [len(b) for b in batches] == [8, 9]
    assert sorted(torch.cat(batches).flatten().tolist()) == list(range(17))
    assert [len(b) for b in mixed_batches(inputs, batch_size=5)] == [5, 5, 5, 2]
    assert [len(b) for b in mixed_batches({"a": torch.zeros(1, 1)}, batch_size=8)] == [1]


def test_merged_statistics_follow_the_layers_coefficients_differentiably():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).eval()
    pre = running_stats(net)
    experts = [{k: v + (i + 1) for k, v in pre.items()} for i in range(2)]
    names = [n for n, p in net.named_parameters()]  # 0.weight 0.bias 1.weight 1.bias
    merger = BatchNormMerger(pre, experts, names)
    coef = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], requires_grad=True)
    merged = merger.merged(coef)
    expected = pre["1.running_mean"] + 0.3 * 1 + 0.7 * 2  # column of "1.weight"
    torch.testing.assert_close(merged["1.running_mean"], expected.detach())
    with batchnorm_with_stats(net, merged):
        out = net(torch.randn(4, 2))
    out.sum().backward()
    assert coef.grad[:, 2].abs().sum() > 0  # gradient reaches the BatchNorm layer's column
    assert torch.equal(net[1].running_mean, pre["1.running_mean"])  # buffers untouched


def test_batchnorm_modes_on_the_cnn_pool(tmp_path, fabric, cnn_suite):
    """All three modes run; the result's statistics are what each mode promises. Accuracies printed."""
    pool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    taskpool = PerTaskHeadsTaskPool(suite_dir=str(cnn_suite))
    taskpool.fabric = fabric
    pretrained = running_stats(pool.load_pretrained_model())
    results = {}
    for mode in ["reestimate", "merge", "pretrained"]:
        algorithm = make(tmp_path / mode, fabric, batchnorm=mode, max_steps=20, data_fraction=0.5, lr=1e-2,
                         lr_step_size=None)
        merged = algorithm.run(pool)
        stats = running_stats(merged.backbone)
        if mode == "pretrained":
            assert all(torch.equal(stats[k], pretrained[k]) for k in stats)
        elif mode == "merge":
            coef = torch.load(tmp_path / mode / "artifacts" / "coefficients.pt")
            experts = [running_stats(pool.load_model(t)) for t in pool.model_names]
            names = [n for n, p in pool.load_pretrained_model().named_parameters()]
            expected = BatchNormMerger(pretrained, experts, names).merged(coef)
            for k in stats:
                torch.testing.assert_close(stats[k], expected[k])
        else:
            assert not torch.allclose(stats["model.features.1.running_mean"],
                                      pretrained["model.features.1.running_mean"])
        report = json.loads((tmp_path / mode / "artifacts" / "statsmerging_report.json").read_text())
        assert report["batchnorm"]["mode"] == mode
        results[mode] = taskpool.evaluate(merged)["average"]["accuracy"]
    print("average accuracy by batchnorm mode:", results)


def test_engines_agree_with_merged_batchnorm(tmp_path, fabric, cnn_suite):
    pool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    coefficients = {}
    for engine in ["host", "fused"]:
        make(tmp_path / engine, fabric, merge_engine=engine, batchnorm="merge", max_steps=3).run(pool)
        coefficients[engine] = torch.load(tmp_path / engine / "artifacts" / "coefficients.pt")
    torch.testing.assert_close(coefficients["fused"], coefficients["host"], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- pools
def test_taskpool_attaches_heads_and_reestimates_on_a_copy(tmp_path, fabric, cnn_suite):
    pool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    taskpool = PerTaskHeadsTaskPool(suite_dir=str(cnn_suite))
    taskpool.fabric = fabric
    task = pool.model_names[0]
    expert = pool.load_model(task)
    bare = taskpool.evaluate(expert)  # heads from the suite
    assert bare[task]["accuracy"] == 1.0  # the expert with its own head
    swapped = PerTaskHeadsModel(expert, {t: pool.load_head(pool.model_names[1]) if t == task else pool.load_head(t)
                                         for t in pool.model_names})
    assert taskpool.evaluate(swapped)[task]["accuracy"] < 1.0  # the model's own heads are used
    before = running_stats(expert)
    reest = PerTaskHeadsTaskPool(suite_dir=str(cnn_suite), batchnorm_reestimate=True, reestimate_samples=32)
    reest.fabric = fabric
    report = reest.evaluate(expert)
    assert report["batchnorm"]["samples"] == 32 * len(pool.model_names)
    assert all(torch.equal(before[k], v) for k, v in running_stats(expert).items())  # the model is not modified


def test_save_model_round_trips_in_the_suite_layout(tmp_path, cnn_suite, text_suite):
    for suite in [cnn_suite, text_suite]:
        pool = PerTaskHeadsModelPool(suite_dir=str(suite))
        backbone = pool.load_model(pool.model_names[0])
        model = PerTaskHeadsModel(backbone, pool.load_heads())
        pool.save_model(model, str(tmp_path / suite.name))
        again = pool.suite.load_backbone(tmp_path / suite.name)
        for (k, v), (k2, v2) in zip(backbone.state_dict().items(), again.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
        assert (tmp_path / suite.name / "heads" / f"{pool.model_names[0]}.safetensors").is_file()


def test_batch_counters_are_float_so_host_merges_accept_them(cnn_suite):
    backbone = PerTaskHeadsModelPool(suite_dir=str(cnn_suite)).load_pretrained_model()
    counters = [m.num_batches_tracked for m in batchnorm_layers(backbone).values()]
    assert counters and all(c.dtype == torch.float32 for c in counters)


def test_errors_say_what_to_change(tmp_path, fabric, cnn_suite):
    from fusion_bench import BaseModelPool

    plain = BaseModelPool({"_pretrained_": nn.Linear(2, 2), "a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    with pytest.raises(PoolError, match="not a per-task-head pool"):
        make(tmp_path, fabric).run(plain)
    with pytest.raises(ValueError, match="Unknown batchnorm 'average'"):
        make(tmp_path, fabric, batchnorm="average")
    with pytest.raises(HeadsSuiteError, match="suite.json and tasks.json"):
        PerTaskHeadsModelPool(suite_dir=str(tmp_path / "nowhere"))
    with pytest.raises(HeadsSuiteError, match="not in the suite"):
        PerTaskHeadsModelPool(suite_dir=str(cnn_suite), tasks=["tiny_colors", "nope"])


def test_mobilenet_v2_features_has_torchvisions_layout():
    """The pure-PyTorch MobileNetV2 takes torchvision's state dict (classifier dropped) key for key."""
    from fusion_bench_statsmerging.models.backbones import MobileNetV2Features

    net = MobileNetV2Features()
    state = net.state_dict()
    assert len(state) == 314 - 2  # torchvision's mobilenet_v2 state dict without classifier.1.{weight,bias}
    assert sum(p.numel() for p in net.parameters()) == 3_504_872 - 1_281_000
    for key in ["features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                "features.2.conv.0.1.running_var", "features.17.conv.3.num_batches_tracked", "features.18.1.bias"]:
        assert key in state
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1280)


def test_real_vision_builder_splits_offline(tmp_path):
    """The MobileNetV2 suite builder's local sources (no download): sizes, labels, image modes."""
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
    import build_vision

    scale = build_vision.SCALES["tiny"]
    for task, mode in [("digits", "L"), ("scenes", "RGB")]:
        splits = build_vision.make_splits(task, scale, 0, tmp_path, build_vision.FASHION_DIR)
        assert {s: len(d) for s, d in splits.items()} == {"train": scale["train"], "validation": scale["validation"],
                                                           "test": scale["test"]}
        labels = splits["train"]["label"]
        assert set(labels) == set(range(len(build_vision.TASKS[task][0])))
        assert splits["test"][0]["image"].mode == mode


def test_auto_start_scores_task_arithmetic_on_unlabeled_images_only(tmp_path, fabric, cnn_suite, monkeypatch):
    """init_coefficient: auto tries task arithmetic at nine scales on unlabeled validation images (their
    labels and the test split never read), starts the learner at the best, and reports the search."""
    pool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    train, val = pool.load_train_dataset, pool.load_val_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(train(name), pool.input_column))
    monkeypatch.setattr(pool, "load_val_dataset", lambda name: LabelTrap(val(name), pool.input_column))
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    algorithm = make(tmp_path, fabric, max_steps=2, init_coefficient="auto", select_by="validation_agreement",
                     select_every=1)
    algorithm.run(pool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    search = report["start_search"]
    assert [float(k) for k in search["agreement"]] == pytest.approx([0.1 * i for i in range(1, 10)])
    best = max(search["agreement"], key=search["agreement"].get)
    assert float(best) == pytest.approx(search["chosen"]) and "validation" in search["images"]
    assert len(set(search["agreement"].values())) > 1  # the scales were really scored
    assert report["config"]["init_coefficient"] == "auto"
    assert report["start"]["chosen"]["init_coefficient"] == search["chosen"]
    assert report["history"][0]["coefficients/mean"] == pytest.approx(search["chosen"], abs=0.02)  # started there
    learner = torch.load(tmp_path / "artifacts" / "learner.pt", weights_only=False)
    assert learner["options"]["init_coefficient"] == pytest.approx(search["chosen"])  # reuse gets a number


TWO_STARTS = [{"output": "sigmoid", "init_coefficient": 0.3}, {"output": "unbounded", "init_coefficient": 0.0}]
# On the tiny CNN suite the 0.3 start wins its probe by far (agreement 0.76 vs 0.48): listed second and
# configured against (output/init_coefficient of the loser), a run that ignored the probes would differ.
LOSER_FIRST = dict(output="unbounded", init_coefficient=0.0, starts=TWO_STARTS[::-1])


# the committed StatsMerging-R recipe (config/method/statsmerging_residual.yaml) on the tiny suite's scale
RECIPE = dict(residual=True, loss="soft", temperature=2.0, optimizer="sam", sam_rho=0.07, weight_decay=5e-4)


@pytest.mark.parametrize("recipe", [dict(residual=True), RECIPE], ids=["adam_hard_residual", "committed_recipe"])
def test_starts_probe_each_start_unlabeled_and_go_on_as_the_winner_alone(tmp_path, fabric, cnn_suite, monkeypatch,
                                                                          recipe):
    """``starts``: each start trains for start_probe_steps on unlabeled images (no label, no test split),
    the one the experts agree with most on unlabeled validation images wins, and the run then ends with
    exactly the coefficients of a run configured with that start alone, whose first steps are the probe's."""
    pool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    train, val = pool.load_train_dataset, pool.load_val_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(train(name), pool.input_column))
    monkeypatch.setattr(pool, "load_val_dataset", lambda name: LabelTrap(val(name), pool.input_column))
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    settings = dict(max_steps=3, select_by="validation_agreement", select_every=1, lr=5e-2, **recipe)
    algorithm = make(tmp_path / "probed", fabric, start_probe_steps=2, **LOSER_FIRST, **settings)
    algorithm.run(pool)
    out = tmp_path / "probed" / "artifacts"
    report = json.loads((out / "statsmerging_report.json").read_text())
    probe = report["start_probe"]
    assert probe == json.loads((out / "start_probe.json").read_text())
    agreements = [r["best_agreement"] for r in probe["results"]]
    assert [sorted(r["agreement_by_step"]) for r in probe["results"]] == [["0", "1", "2"]] * 2  # both trained
    assert probe["chosen"] == 1 and agreements[1] == max(agreements) > agreements[0]
    chosen = LOSER_FIRST["starts"][1]
    assert report["start"] == {"configured": {k: LOSER_FIRST[k] for k in chosen}, "chosen": chosen}
    assert (report["config"]["output"], report["config"]["init_coefficient"]) == (LOSER_FIRST["output"], 0.0)
    assert sorted(report["selection"]["agreement_by_step"], key=int) == ["0", "1", "2", "3"]  # the full run

    alone = make(tmp_path / "alone", fabric, **chosen, **settings)
    alone.run(PerTaskHeadsModelPool(suite_dir=str(cnn_suite)))
    assert torch.equal(torch.load(out / "coefficients.pt"),
                       torch.load(tmp_path / "alone" / "artifacts" / "coefficients.pt"))
    # the winner's probe is the single-start run's first steps: same start, batches, schedule and scores
    logged = json.loads((tmp_path / "alone" / "artifacts" / "statsmerging_report.json").read_text())
    by_step = logged["selection"]["agreement_by_step"]
    assert probe["results"][1]["agreement_by_step"] == {s: by_step[s] for s in ("0", "1", "2")}


def test_starts_probes_are_never_longer_than_the_run(tmp_path, fabric, cnn_suite):
    algorithm = make(tmp_path, fabric, max_steps=2, starts=TWO_STARTS, start_probe_steps=300,
                     select_by="validation_agreement", select_every=1)
    algorithm.run(PerTaskHeadsModelPool(suite_dir=str(cnn_suite)))
    probe = json.loads((tmp_path / "artifacts" / "start_probe.json").read_text())
    assert probe["steps"] == 2 and [sorted(r["agreement_by_step"]) for r in probe["results"]] == [["0", "1", "2"]] * 2


def test_a_resumed_run_goes_on_with_the_start_its_checkpoint_began_from(tmp_path):
    """The checkpoint names its start; the probes' scores are reused only when they chose that start."""
    from fusion_bench_statsmerging.engine.checkpoint import ResumeError
    from fusion_bench_statsmerging.method.statsmerging.coefficients import PROBE_FILE, read_probe

    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"config": {"output": "unbounded", "init_coefficient": "0.0", "lr": "0.001"}}, checkpoint)
    assert read_probe(None, TWO_STARTS, 300) is None  # a fresh run probes
    assert read_probe(checkpoint, TWO_STARTS, 300)["chosen"] == 1  # no scores saved: the checkpoint's start
    (tmp_path / PROBE_FILE).write_text(json.dumps({"steps": 300, "starts": TWO_STARTS, "chosen": 1, "results": [1]}))
    assert read_probe(checkpoint, TWO_STARTS, 300)["results"] == [1]
    assert read_probe(checkpoint, TWO_STARTS, 200)["results"] == []  # other probes: not their scores
    (tmp_path / PROBE_FILE).write_text(json.dumps({"steps": 300, "starts": TWO_STARTS, "chosen": 0, "results": [0]}))
    assert read_probe(checkpoint, TWO_STARTS, 300) == {**read_probe(checkpoint, TWO_STARTS, 200), "steps": 300}
    with pytest.raises(ResumeError, match="not one of the starts"):
        read_probe(checkpoint, [TWO_STARTS[0], {"output": "unbounded", "init_coefficient": 0.1}], 300)


@pytest.mark.parametrize("overrides, message", [
    (dict(starts=TWO_STARTS), "select_by: validation_agreement"),
    (dict(starts=TWO_STARTS[:1], select_by="validation_agreement"), "two or more"),
    (dict(starts=[{"init_coefficient": 0.3, "lr": 1.0}, {}], select_by="validation_agreement"), "may set only"),
    (dict(starts=[{"init_coefficient": "auto"}, {}], select_by="validation_agreement"), "must be a number"),
    (dict(starts=[{"output": "cosine"}, {}], select_by="validation_agreement"), "cosine"),
    (dict(starts=TWO_STARTS, select_by="validation_agreement", start_probe_steps=0), "start_probe_steps"),
    (dict(starts=TWO_STARTS, select_by="validation_agreement", start_probe_steps=None), "start_probe_steps"),
    (dict(starts=TWO_STARTS, select_by="validation_agreement", init_coefficient="auto"), "choose one"),
])
def test_starts_settings_are_checked_before_any_work(tmp_path, fabric, overrides, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path, fabric, **overrides)


def test_auto_start_refuses_what_it_cannot_search(tmp_path, fabric):
    with pytest.raises(ValueError, match="softmax"):
        make(tmp_path, fabric, init_coefficient="auto", output="softmax")
    with pytest.raises(ValueError, match="number or 'auto'"):
        make(tmp_path, fabric, init_coefficient="high")


def test_a_suite_naming_the_backbones_old_module_still_loads_and_is_told_the_new_one():
    """Suites built before the layout name ``fusion_bench_statsmerging.backbones:<Class>`` in suite.json."""
    from fusion_bench_statsmerging.modelpool.heads import _import
    from fusion_bench_statsmerging.models.backbones import MobileNetV2Features

    with pytest.warns(DeprecationWarning, match="fusion_bench_statsmerging.models.backbones"):
        assert _import("fusion_bench_statsmerging.backbones:MobileNetV2Features") is MobileNetV2Features
