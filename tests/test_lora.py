"""LoRA experts (issue 18): statistics from the factors, the LoRA pool's dense experts, and the CLI run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fusion_bench_statsmerging.engine.lora_stats import lora_delta, lora_factor_statistics
from fusion_bench_statsmerging.engine.stats import DEFAULT_FEATURES as FEATURES, tensor_statistics

from conftest import run_suite_cli_and_check_reports

# Factor entries are O(1); the dense side computes in float32, so near-zero means get an absolute floor.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def lora_suite(suite_dir, tmp_path_factory):
    """The tiny CLIP suite (linked, not copied) with a trained LoRA adapter per task under ``lora/``."""
    from fusion_bench_statsmerging.fixtures.lora import build_tiny_lora_experts

    root = tmp_path_factory.mktemp("tiny_lora_suite")
    for name in ("pretrained", "data", "tasks.json"):
        (root / name).symlink_to(suite_dir / name)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_tiny_lora_experts(root, steps=20)
    finally:
        torch.set_num_threads(before)
    return root


@pytest.fixture
def lora_pool(lora_suite):
    from fusion_bench_statsmerging.modelpool.lora import CLIPLoRAModelPool

    return CLIPLoRAModelPool(suite_dir=str(lora_suite))


@pytest.mark.parametrize("out_dim, in_dim, r", [(32, 64, 4), (6, 40, 8), (50, 3, 2), (1, 16, 1)])
@pytest.mark.parametrize("scaling, rank", [(2.0, 3), (0.25, 10), (-0.5, 2)])
def test_factor_statistics_equal_dense_statistics(out_dim, in_dim, r, scaling, rank):
    gen = torch.Generator().manual_seed(out_dim * 1000 + in_dim + r)
    lora_a = torch.randn(r, in_dim, generator=gen)
    lora_b = torch.randn(out_dim, r, generator=gen) + 0.3  # a non-zero mean
    dense = tensor_statistics(lora_delta(lora_a, lora_b, scaling), FEATURES, rank)
    cheap = lora_factor_statistics(lora_a, lora_b, scaling, FEATURES, rank)
    torch.testing.assert_close(cheap, dense, rtol=RTOL, atol=ATOL)
    assert (cheap[3 + min(r, out_dim, in_dim):] == 0).all()  # padded beyond the update's rank
    subset = lora_factor_statistics(lora_a, lora_b, scaling, ["norm", "mean"], rank)
    torch.testing.assert_close(subset, tensor_statistics(lora_delta(lora_a, lora_b, scaling), ["norm", "mean"], rank),
                               rtol=RTOL, atol=ATOL)


def test_factor_statistics_refuse_mismatched_factors():
    with pytest.raises(ValueError, match="same r"):
        lora_factor_statistics(torch.ones(3, 5), torch.ones(4, 2), 1.0, FEATURES, 3)


def _saved_updates(adapter_dir):
    """s * B @ A per base weight, read straight from the saved adapter (independent of peft's loader)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("rank_pattern") and not config.get("alpha_pattern")
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    updates = {}
    for key, lora_a in tensors.items():
        if ".lora_A." in key:
            lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            if name.startswith("text_model."):  # saved from a full CLIPModel: not part of the vision expert
                continue
            name = name if name.startswith("vision_model.") else "vision_model." + name  # saved from the transformer
            updates[name] = scaling * (lora_b.double() @ lora_a.double())
    return updates


def _assert_pretrained_plus_updates(weights, pretrained, updates):
    assert weights.keys() == pretrained.keys()  # dense: no LoRA tensors left
    assert updates and max(u.abs().max() for u in updates.values()) > 1e-3  # B is off zero
    for name, value in weights.items():
        if name in updates:
            torch.testing.assert_close(value.double(), pretrained[name].double() + updates[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, pretrained[name]), name


def test_pool_experts_are_pretrained_plus_scaled_lora_products(lora_pool, lora_suite):
    pretrained = lora_pool.load_pretrained_model().state_dict()
    for task in lora_pool.model_names:
        expert = lora_pool.load_model(task)
        assert type(expert).__name__ == "CLIPVisionModel"
        _assert_pretrained_plus_updates(expert.state_dict(), pretrained, _saved_updates(lora_suite / "lora" / task))


def _transformer_adapter(lora_suite, folder, saved_from="transformer"):
    """An adapter with random B saved from the bare ``CLIPVisionTransformer`` (where FusionBench's
    ``load_lora_vision_model_hf`` puts its CLIP LoRA adapters) or from a full ``CLIPModel`` (both towers)."""
    from peft import get_peft_model
    from transformers import CLIPModel, CLIPVisionModel

    from fusion_bench_statsmerging.fixtures.lora import tiny_lora_config

    torch.manual_seed(0)
    if saved_from == "transformer":
        base = CLIPVisionModel.from_pretrained(lora_suite / "pretrained").vision_model
    else:
        base = CLIPModel.from_pretrained(lora_suite / "pretrained")
    model = get_peft_model(base, tiny_lora_config(2, 4.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("saved_from", ["transformer", "clip_model"])
def test_adapters_saved_from_the_bare_transformer_or_the_full_clip_load_too(lora_suite, tmp_path, saved_from):
    from fusion_bench_statsmerging.modelpool.lora import CLIPLoRAModelPool

    folder = _transformer_adapter(lora_suite, tmp_path / "lora", saved_from)
    pool = CLIPLoRAModelPool(suite_dir=str(lora_suite), adapters={"tiny_colors": str(folder)})
    updates = _saved_updates(folder)
    if saved_from == "clip_model":
        assert any(".text_model." in key for key in load_file(str(folder / "adapter_model.safetensors")))
    assert updates and all(name.startswith("vision_model.encoder.") for name in updates)
    _assert_pretrained_plus_updates(pool.load_model("tiny_colors").state_dict(),
                                    pool.load_pretrained_model().state_dict(), updates)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # peft only warns; the pool refuses
def test_adapter_tensors_that_do_not_load_are_an_error(lora_suite, tmp_path):
    from safetensors.torch import save_file

    from fusion_bench_statsmerging.modelpool.lora import CLIPLoRAModelPool
    from fusion_bench_statsmerging.modelpool.clip_suite import SuiteError

    folder = _transformer_adapter(lora_suite, tmp_path / "renamed_lora")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k.replace("encoder.layers.", "encoder.layer."): v for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    pool = CLIPLoRAModelPool(suite_dir=str(lora_suite), adapters={"tiny_colors": str(folder)})
    with pytest.raises(SuiteError, match="was not loaded"):
        pool.load_model("tiny_colors")


def test_pool_factor_statistics_equal_dense_task_vector_statistics(lora_pool):
    task = lora_pool.model_names[0]
    pretrained = lora_pool.load_pretrained_model().state_dict()
    expert = lora_pool.load_model(task).state_dict()
    stats = lora_pool.factor_statistics(task, FEATURES, 3)
    assert stats
    for name, row in stats.items():
        torch.testing.assert_close(row, tensor_statistics(expert[name] - pretrained[name], FEATURES, 3),
                                   rtol=RTOL, atol=ATOL)


def test_missing_adapter_is_named(lora_suite):
    from fusion_bench_statsmerging.modelpool.lora import CLIPLoRAModelPool
    from fusion_bench_statsmerging.modelpool.clip_suite import SuiteError

    with pytest.raises(SuiteError, match="adapters_elsewhere/tiny_colors/adapter_config.json"):
        CLIPLoRAModelPool(suite_dir=str(lora_suite), lora_dir="adapters_elsewhere")


def test_adapters_point_a_task_at_another_folder(lora_pool, lora_suite):
    from fusion_bench_statsmerging.modelpool.lora import CLIPLoRAModelPool

    swapped = CLIPLoRAModelPool(suite_dir=str(lora_suite), adapters={"tiny_colors": str(lora_suite / "lora" / "tiny_stripes")})
    ours, theirs = swapped.load_model("tiny_colors").state_dict(), lora_pool.load_model("tiny_stripes").state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_host_data_free_method_merges_the_pool_into_a_dense_model(lora_pool, lora_suite):
    from fusion_bench.method import TaskArithmeticAlgorithm

    merged = TaskArithmeticAlgorithm(scaling_factor=0.5).run(lora_pool).state_dict()
    pretrained = lora_pool.load_pretrained_model().state_dict()
    assert merged.keys() == pretrained.keys()
    expected = {k: v.double().clone() for k, v in pretrained.items()}
    for task in lora_pool.model_names:
        for name, update in _saved_updates(lora_suite / "lora" / task).items():
            expected[name] += 0.5 * update
    for name, value in merged.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-5)


def test_cli_merges_the_lora_pool_and_evaluates(lora_suite, tmp_path):
    common = ["modelpool=clip_suite_lora", "taskpool=clip_suite", "method.max_steps=3", "method.batch_size=8",
              "fabric.accelerator=cpu"]
    runs = {"statsmerging": ["method=statsmerging", "method.data_fraction=0.25"],
            "samerging": ["method=samerging", "method.num_batches_per_task=2"]}
    run_suite_cli_and_check_reports(runs, common, lora_suite, tmp_path)
