"""The host's AdaMerging on per-task-head pools: the three hooks filled here, the rest the host's.

Adaptation reads the input column of the split its protocol names (train by default; the test
split only under the named ``test_time_adaptation``), never a label; only the merge weights
move; heads stay frozen; the CLI runs both variants on a CNN and a text pool.
"""

import json
import os

import lightning as L
from lightning.fabric.loggers import TensorBoardLogger
import pytest
import torch

from fusion_bench_statsmerging.modelpool.heads import PerTaskHeadsModelPool, load_head
from fusion_bench_statsmerging.fixtures.heads import build_tiny_text_suite
from fusion_bench_statsmerging.method.adamerging_heads import (
    HeadsTaskWiseAdaMerging, heads_adamerging,
)
from fusion_bench_statsmerging.utils.errors import PoolError

from conftest import run_fusion_bench
from test_heads import LabelTrap

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only spin


@pytest.fixture(scope="module")
def text_suite(tmp_path_factory):
    return build_tiny_text_suite(tmp_path_factory.mktemp("ada_text"))


def algorithm(name: str, tmp_path, **overrides):
    config = dict(protocol="train_unlabeled", weights=None, optimizer="adam", lr=1e-2, init_values=0.3,
                  clamp_weights=False, tie_weights=True, strict=False, devices=1, batch_size=4, num_workers=0,
                  max_steps=3, fast_dev_run=False, save_merging_weights=False)
    config.update(overrides)
    algo = heads_adamerging(name, **config)
    # the host's layer-wise class logs its hyper-parameters: its fabric needs a logger
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=TensorBoardLogger(str(tmp_path), name="tb"))
    if isinstance(algo, HeadsTaskWiseAdaMerging):
        algo._fabric = fabric
    else:
        algo.fabric = fabric
    return algo


def trapped_pool(suite, monkeypatch, allow_test: bool = False) -> PerTaskHeadsModelPool:
    """A pool whose train rows raise on a label read and whose other splits fail the test when read."""
    pool = PerTaskHeadsModelPool(suite_dir=str(suite))
    real_train, real_test = pool.load_train_dataset, pool.load_test_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(real_train(name), pool.input_column))
    monkeypatch.setattr(pool, "load_val_dataset", lambda name: pytest.fail("validation split was read"))
    if allow_test:
        monkeypatch.setattr(pool, "load_test_dataset", lambda name: LabelTrap(real_test(name), pool.input_column))
    else:
        monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    return pool


@pytest.mark.parametrize("name", ["layer_wise", "task_wise"])
def test_adapts_on_unlabeled_train_inputs_and_moves_only_the_merge_weights(tmp_path, cnn_suite, monkeypatch, name):
    pool = trapped_pool(cnn_suite, monkeypatch)
    algo = algorithm(name, tmp_path)
    seen = {}
    original = algo.test_time_adaptation

    def spy(module):
        seen["start"] = module.merge_weight.detach().clone()
        out = original(module)
        seen["end"] = out.merge_weight.detach().clone()
        seen["trainable"] = [n.split(".")[-1] for n, p in out.named_parameters() if p.requires_grad]
        return out

    monkeypatch.setattr(algo, "test_time_adaptation", spy)
    merged = algo.run(pool)
    assert seen["trainable"] == ["merge_weight"]
    assert not torch.allclose(seen["start"], seen["end"]), "the entropy loss did not reach the merge weights"
    expected = (len(pool.model_names),) if name == "task_wise" else (len(pool.model_names), seen["end"].shape[1])
    assert tuple(seen["end"].shape) == expected
    for task, head in algo._heads.items():  # heads: frozen and as saved
        assert not any(p.requires_grad for p in head.parameters())
        torch.testing.assert_close(head.weight, load_head(cnn_suite / "experts" / task / "head.safetensors").weight)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in pool.load_pretrained_model().parameters())


def test_test_split_only_under_its_named_protocol(tmp_path, text_suite, monkeypatch):
    pool = trapped_pool(text_suite, monkeypatch, allow_test=True)
    read = []
    real = pool.load_test_dataset
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: read.append(name) or real(name))
    algorithm("layer_wise", tmp_path, protocol="test_time_adaptation", max_steps=1).run(pool)
    assert sorted(read) == sorted(pool.model_names)
    with pytest.raises(ValueError, match="protocol must be one of"):
        algorithm("layer_wise", tmp_path, protocol="test")
    with pytest.raises(ValueError, match="name must be one of"):
        heads_adamerging("clip_layer_wise_adamerging")


def test_refuses_a_pool_without_heads(tmp_path, suite_dir):
    from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool

    algo = algorithm("layer_wise", tmp_path)
    with pytest.raises(PoolError, match="not a per-task-head pool"):
        algo.run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))


def test_cli_runs_both_variants_on_cnn_and_text_pools(tmp_path, cnn_suite, text_suite):
    runs = {"cnn_layer": (cnn_suite, "layer_wise"), "text_task": (text_suite, "task_wise")}
    commands = [["method=adamerging_heads", f"method.name={name}", "method.max_steps=3", "method.batch_size=4",
                 "modelpool=heads_suite", "taskpool=heads_suite", f"modelpool.suite_dir={suite}",
                 "fabric.accelerator=cpu", f"path.log_dir={tmp_path / key}"] for key, (suite, name) in runs.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf_home"))
    proc = run_fusion_bench(commands, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "EXIT" not in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    for key, (suite, _) in runs.items():
        report = json.loads((tmp_path / key / "program_report.json").read_text())
        tasks = json.loads((suite / "tasks.json").read_text())
        assert set(tasks) <= set(report) and 0.0 <= report["average"]["accuracy"] <= 1.0
    assert (tmp_path / "cnn_layer" / "merging_weights.pt").is_file()


def test_every_adaptation_batch_is_full(tmp_path, cnn_suite):
    """Training-mode BatchNorm cannot normalise a one-sample batch at 1x1 resolution, so the loader
    drops each epoch's incomplete last batch (96 train rows = 5 x 19 + 1)."""
    algo = algorithm("layer_wise", tmp_path, batch_size=19)
    algo.modelpool = PerTaskHeadsModelPool(suite_dir=str(cnn_suite))
    algo.on_test_time_adaptation_start()
    task = algo.modelpool.model_names[0]
    batches = algo.get_shuffled_test_loader_iter(task)
    assert [len(next(batches)[0]) for _ in range(12)] == [19] * 12
