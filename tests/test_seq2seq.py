"""StatsMerging on seq2seq LM pools (Flan-T5 on GLUE), on a tiny offline T5 pool.

The host's own classes are used unchanged: ``Seq2SeqLMPool`` (full and LoRA experts through
its ``load_lora_model``), its GLUE templates/preprocessors, and its
``FlanT5GLUETextGenerationTaskPool`` (through the ``fusion_bench`` CLI).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT
from fusion_bench.utils import instantiate
from fusion_bench_statsmerging.utils.errors import PoolError
from fusion_bench_statsmerging.method.seq2seq import (
    TaskData, default_verbalizer, load_tokenizer, split_module_aliases, trim_padding,
)
from fusion_bench_statsmerging.method.statsmerging.seq2seq_statsmerging import Seq2SeqStatsMergingAlgorithm
from fusion_bench_statsmerging.fixtures.t5 import TASKS, torch_threads
from fusion_bench_statsmerging.engine.trainer import Trainer

LABEL_COLUMNS = {"label", "labels"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):  # tiny models on shared cores: more threads only wait on each other
        yield


@pytest.fixture(scope="module")
def t5_root(tmp_path_factory) -> Path:
    from fusion_bench_statsmerging.fixtures.t5 import build_tiny_t5_pool

    return build_tiny_t5_pool(tmp_path_factory.mktemp("tiny_t5"))


def load_pool(root: Path, name: str = "t5_fixture", **changes):
    cfg = OmegaConf.load(root / "config" / "modelpool" / f"{name}.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return instantiate(cfg, _recursive_=False)


def make(tmp_path, **overrides):
    config = dict(max_steps=3, batch_size=8, data_fraction=0.5, artifact_dir=str(tmp_path / "out"), log_every=1)
    config.update(overrides)
    algorithm = Seq2SeqStatsMergingAlgorithm(**config)
    algorithm.fabric = L.Fabric(accelerator="cpu", devices=1)
    return algorithm


class LabelTrap:
    """A Hugging Face dataset whose label columns cannot be read: selecting them, reading a
    whole row (which holds the label) or mapping over it fails the test."""

    def __init__(self, dataset):
        self._dataset = dataset
        self.column_names = dataset.column_names

    def __len__(self):
        return len(self._dataset)

    def select_columns(self, columns):
        assert not LABEL_COLUMNS & set(columns), f"a label column was selected: {columns}"
        return self._dataset.select_columns(columns)

    def __getitem__(self, i):
        raise AssertionError("a ground-truth label was read")

    def map(self, *args, **kwargs):
        raise AssertionError("a ground-truth label was read")


class RowTrap(torch.utils.data.Dataset):
    """A plain (non-Hugging Face) dataset of dict rows whose label raises when read."""

    class Row(dict):
        def __getitem__(self, key):
            if key in LABEL_COLUMNS:
                raise AssertionError("a ground-truth label was read")
            return super().__getitem__(key)

    def __init__(self, dataset):
        self.rows = [dict(r) for r in dataset]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.Row(self.rows[i])


def spy_on_gradients(algorithm, monkeypatch):
    """Record the optimizer's parameters and their gradients at every step."""
    seen = {"grads": []}
    original = Trainer.make_optimizer

    def make_optimizer(trainer, params):
        params = list(params)
        optimizer = original(trainer, params)
        optimizer.register_step_pre_hook(lambda *_: seen["grads"].append(
            [None if p.grad is None else p.grad.detach().clone() for p in params]))
        seen["params"] = params
        return optimizer

    monkeypatch.setattr(Trainer, "make_optimizer", make_optimizer)
    return seen


# --------------------------------------------------------------------------- units
def test_verbalisers_are_the_hosts_glue_label_words():
    assert default_verbalizer("glue-cola") == ["unacceptable", "acceptable"]
    assert default_verbalizer("mnli") == ["entailment", "neutral", "contradiction"]
    assert default_verbalizer("glue-qnli") == ["yes", "no"]  # label order, not alphabetical
    assert default_verbalizer("glue-stsb") == ["0", "1", "2", "3", "4", "5"]
    assert default_verbalizer("my-task") is None


@pytest.mark.parametrize("kind", ["hf", "rows"])
def test_prompts_are_the_hosts_preprocessing_and_read_no_label(t5_root, tmp_path, kind):
    import datasets

    algorithm = make(tmp_path)
    algorithm._tok = load_tokenizer(load_pool(t5_root)._tokenizer)
    algorithm._build_verbalizers([f"glue-{t}" for t in TASKS])
    idx = [3, 0, 7, 12]
    for task in TASKS:
        raw = datasets.load_from_disk(str(t5_root / "data" / task / "train"))
        trapped = LabelTrap(raw) if kind == "hf" else RowTrap(raw)
        ours = algorithm.fit_inputs(TaskData(trapped, f"glue-{task}"), idx)
        host = datasets.load_from_disk(str(t5_root / "cache" / "flan-t5" / f"_load_{task}_dataset_cached"))["train"]
        from_host_cache = algorithm.fit_inputs(TaskData(LabelTrap(host), f"glue-{task}"), idx)
        want = trim_padding({k: torch.tensor(host.select(idx)[k]) for k in ("input_ids", "attention_mask")})
        for inputs in (ours, from_host_cache):
            assert torch.equal(inputs["input_ids"], want["input_ids"]), task
            assert torch.equal(inputs["attention_mask"], want["attention_mask"]), task


@pytest.mark.parametrize("tied_lm_head", [False, True])
def test_fused_engine_merges_t5s_tied_embeddings(t5_root, tied_lm_head):
    from transformers import T5ForConditionalGeneration

    from fusion_bench_statsmerging.engine.fused import FusedLayerWiseEngine
    from fusion_bench_statsmerging.engine.merge import trainable_names

    def load(path):
        model = T5ForConditionalGeneration.from_pretrained(path)
        if tied_lm_head:  # original T5: lm_head shares the embedding too
            model.config.tie_word_embeddings = True
            model.tie_weights()
        return split_module_aliases(model)

    paths = [t5_root / "pretrained", *[t5_root / "experts" / t for t in TASKS[:2]]]
    pretrained, experts = load(paths[0]), [load(p) for p in paths[1:]]
    names = trainable_names(pretrained)
    coef = torch.rand(2, len(names), generator=torch.Generator().manual_seed(0))
    reference = load(paths[0])
    with torch.no_grad():
        for j, name in enumerate(names):
            delta = sum(coef[k, j] * (e.get_parameter(name) - pretrained.get_parameter(name)) for k, e in enumerate(experts))
            reference.get_parameter(name).add_(delta)
    batch = dict(input_ids=torch.tensor([[5, 9, 14, 1], [7, 3, 1, 0]]), attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                 decoder_input_ids=torch.zeros(2, 1, dtype=torch.long))
    want = reference(**batch).logits
    engine = FusedLayerWiseEngine(pretrained, experts, tie_weights=True)
    engine.set_coefficients(coef)
    torch.testing.assert_close(engine(**batch).logits, want, atol=1e-5, rtol=1e-4)  # embeddings merged everywhere
    merged = engine.merge_and_unload(coef)
    torch.testing.assert_close(merged(**batch).logits, want, atol=1e-5, rtol=1e-4)
    assert merged.encoder.embed_tokens.weight is merged.shared.weight is merged.decoder.embed_tokens.weight
    assert (merged.lm_head.weight is merged.shared.weight) == tied_lm_head


def test_unknown_task_and_host_engine_fail_early_with_what_to_change(t5_root, tmp_path):
    pool = load_pool(t5_root)
    renamed = load_pool(t5_root, **{"models": {"_pretrained_": OmegaConf.to_container(pool._models["_pretrained_"]),
                                               "my-task": OmegaConf.to_container(pool._models["glue-sst2"]),
                                               "glue-cola": OmegaConf.to_container(pool._models["glue-cola"])}})
    with pytest.raises(PoolError, match=r"method\.verbalizers\.my-task"):
        make(tmp_path).run(renamed)
    with pytest.raises(PoolError, match="merge_engine: fused"):
        make(tmp_path, merge_engine="host").run(pool)
    with pytest.raises(ValueError, match="Unknown label_scoring"):
        make(tmp_path, label_scoring="last_token")


# --------------------------------------------------------------------------- runs
def test_statsmerging_trains_only_the_learner_through_the_merged_t5_and_reads_no_label(t5_root, tmp_path, monkeypatch):
    from transformers import T5ForConditionalGeneration

    from fusion_bench_statsmerging.engine.merge import trainable_names

    pool = load_pool(t5_root)
    real = pool.load_train_dataset
    monkeypatch.setattr(pool, "load_train_dataset", lambda name: LabelTrap(real(name)))
    monkeypatch.setattr(pool, "load_val_dataset", lambda name: pytest.fail("validation split was read"))
    monkeypatch.setattr(pool, "load_test_dataset", lambda name: pytest.fail("test split was read"))
    algorithm = make(tmp_path, max_steps=4)
    seen = spy_on_gradients(algorithm, monkeypatch)
    merged = algorithm.run(pool)

    out = tmp_path / "out"
    report = json.loads((out / "statsmerging_report.json").read_text())
    assert report["protocol"]["name"] == "train_unlabeled" and report["protocol"]["uses_ground_truth_labels"] is False
    assert report["models"] == [f"glue-{t}" for t in TASKS] and len(report["history"]) == 4
    for name in ["coefficients.pt", "coefficients.csv", "coefficients_heatmap.png", "learner.pt"]:
        assert (out / name).stat().st_size > 0
    # the optimizer held exactly the learner's parameters, and every one of them got gradients
    learner = torch.load(out / "learner.pt")
    assert len(seen["params"]) == len(learner["learner_state_dict"])
    for i, p in enumerate(seen["params"]):
        assert any(g[i] is not None and g[i].abs().sum() > 0 for g in seen["grads"]), f"parameter {i} got no gradient"
    # the result is the host's model class, merged at the saved coefficients, embeddings included
    assert isinstance(merged, T5ForConditionalGeneration)
    coefficients = torch.load(out / "coefficients.pt")
    pretrained = split_module_aliases(T5ForConditionalGeneration.from_pretrained(t5_root / "pretrained"))
    experts = [T5ForConditionalGeneration.from_pretrained(t5_root / "experts" / t) for t in TASKS]
    names = trainable_names(pretrained)
    assert coefficients.shape == (len(TASKS), len(names)) and names[0] == "shared.weight"
    for name in ("shared.weight", "lm_head.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"):
        j = names.index(name)
        want = pretrained.get_parameter(name) + sum(
            coefficients[k, j] * (e.get_parameter(name) - pretrained.get_parameter(name)) for k, e in enumerate(experts))
        torch.testing.assert_close(merged.get_parameter(name), want.detach(), atol=1e-6, rtol=1e-5)
    assert merged.encoder.embed_tokens.weight is merged.shared.weight
    # and the trap is real: the ground-truth protocol does read labels and trips it
    with pytest.raises(AssertionError, match="ground-truth label was read"):
        make(tmp_path / "gt", max_steps=1, protocol="train_ground_truth").run(pool)


@pytest.mark.parametrize("merge_and_unload", [True, False])
def test_lora_experts_are_merged_and_only_adapted_tensors_carry_task_vectors(t5_root, tmp_path, merge_and_unload):
    pool = load_pool(t5_root, "t5_fixture_lora")
    for task in TASKS:
        pool._models[f"glue-{task}"]["merge_and_unload"] = merge_and_unload  # False: experts come as PeftModels
    make(tmp_path, label_scoring="sequence", max_steps=2, mode="task_wise" if merge_and_unload else "layer_wise").run(pool)
    learner = torch.load(tmp_path / "out" / "learner.pt")
    raw = learner["raw_statistics"]
    if learner["mode"] == "layer_wise":
        from transformers import T5ForConditionalGeneration

        from fusion_bench_statsmerging.engine.merge import trainable_names

        names = trainable_names(split_module_aliases(T5ForConditionalGeneration.from_pretrained(t5_root / "pretrained")))
        norm = raw[..., learner["features"].index("norm")]  # (K, L)
        adapted = torch.tensor([n.endswith((".q.weight", ".v.weight")) for n in names])
        assert (norm[:, adapted] > 0).all() and (norm[:, ~adapted] == 0).all()
    else:
        assert raw.shape[0] == len(TASKS) and torch.isfinite(raw).all()


def test_glue_fallback_without_declared_data_and_the_ground_truth_protocol(t5_root, tmp_path):
    """A pool without datasets (like the host's flan-t5-base_glue) fits on the host's GLUE cache;
    the ground-truth protocol maps the label tokens back to classes."""
    import datasets

    pool = load_pool(t5_root, train_datasets=None, val_datasets=None)
    algorithm = make(tmp_path, max_steps=1, protocol="train_ground_truth", glue_cache_dir=str(t5_root / "cache"))
    algorithm.run(pool)
    report = json.loads((tmp_path / "out" / "statsmerging_report.json").read_text())
    assert report["protocol"]["uses_ground_truth_labels"] is True
    host = datasets.load_from_disk(str(t5_root / "cache" / "flan-t5" / "_load_cola_dataset_cached"))["train"]
    labelled = algorithm._with_class_labels("glue-cola", host)
    raw = datasets.load_from_disk(str(t5_root / "data" / "cola" / "train"))
    assert labelled["label"] == raw["label"]


def test_glue_protocols_read_the_split_the_taskpool_scores_and_say_so(t5_root, tmp_path, monkeypatch):
    """The flan-t5 GLUE task pool scores GLUE's validation split: `validation_unlabeled` would fit on it
    under a label-free name (refused), and test-time adaptation reads it (not GLUE's unscored test split)."""
    import fusion_bench.tasks.flan_t5_text_generation.glue_load_dataset as glue

    pool = load_pool(t5_root, train_datasets=None, val_datasets=None, test_datasets=None)
    with pytest.raises(PoolError, match="validation split is the one the flan-t5 GLUE task pool scores"):
        make(tmp_path, protocol="validation_unlabeled", glue_cache_dir=str(t5_root / "cache")).run(pool)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    splits = []

    def record(name, tokenizer, cache_dir=None, split="train"):
        splits.append(split)
        raise InterruptedError("stop after the first split read")

    monkeypatch.setattr(glue, "load_glue_dataset", record)
    with pytest.raises(InterruptedError):
        make(tmp_path, protocol="test_time_adaptation", glue_cache_dir=str(t5_root / "cache")).run(pool)
    assert splits == ["validation"]


# --------------------------------------------------------------------------- CLI
def test_users_command_composes_with_the_hosts_pool_and_taskpool():
    from hydra import compose, initialize_config_dir

    from fusion_bench.utils.hydra_utils import get_default_config_path

    with initialize_config_dir(config_dir=os.path.abspath(get_default_config_path()), version_base=None):
        cfg = compose("fabric_model_fusion", overrides=[
            "method=statsmerging_flan_t5", "modelpool=Seq2SeqLMPool/flan-t5-base_glue_lora16",
            "taskpool=flan-t5_glue_text_generation"])
        taskwise = compose("fabric_model_fusion", overrides=["method=statsmerging_flan_t5_taskwise",
                                                             "modelpool=Seq2SeqLMPool/flan-t5-base_glue"])
    assert cfg.method._target_.endswith("seq2seq_statsmerging.Seq2SeqStatsMergingAlgorithm")
    assert cfg.method.label_scoring == "auto" and cfg.method.protocol == "train_unlabeled"
    assert cfg.modelpool._target_ == "fusion_bench.modelpool.Seq2SeqLMPool"
    assert cfg.taskpool.type == "FlanT5GLUETextGenerationTaskPool"
    assert taskwise.method.mode == "task_wise" and "glue-cola" in taskwise.modelpool.models


def test_cli_merges_the_fixture_and_the_hosts_taskpool_evaluates_it(t5_root, tmp_path):
    log_dir = tmp_path / "logs"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cli = str(Path(sys.executable).with_name("fusion_bench"))
    proc = subprocess.run([cli, "-cd", str(t5_root / "config"), "method=statsmerging_flan_t5",
                           "modelpool=t5_fixture", "taskpool=t5_fixture", "method.max_steps=2",
                           "method.batch_size=8", "fabric.accelerator=cpu", f"path.log_dir={log_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((log_dir / "program_report.json").read_text())
    for task in TASKS:
        assert 0.0 <= report[task]["accuracy"] <= 1.0
    ours = json.loads((log_dir / "statsmerging_report.json").read_text())
    assert ours["protocol"]["name"] == "train_unlabeled" and ours["models"] == [f"glue-{t}" for t in TASKS]
    assert (log_dir / "learner.pt").stat().st_size > 0
