"""The strongest host baselines as comparison rows: WUDI, Iso-C, Iso-CTS, TSV-M (data-free) and
RegMean++ (label-free train inputs), on a tiny CLIP suite and tiny per-task-head suites, and the
adapter that lets the data-free ones merge convolutions as matrices instead of averaging them."""

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.wudi.wudi import wudi_merging

from conftest import run_fusion_bench
from fusion_bench_statsmerging import compare
from fusion_bench_statsmerging.compare.runner import _config_dirs
from fusion_bench_statsmerging.fixtures.heads import TinyConvNet, build_tiny_cnn_suite, build_tiny_text_suite
from fusion_bench_statsmerging.method.conv_as_matrix import conv_weight_names, merge_conv_as_matrix

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: extra threads only spin

DATA_FREE = ["wudi", "iso_c", "iso_cts", "tsv_m"]


# --------------------------------------------------------------------------- the conv adapter
def _task_vectors(k: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"conv.weight": torch.randn(6, 4, 3, 3, generator=gen), "fc.weight": torch.randn(5, 7, generator=gen),
             "bn.bias": torch.randn(6, generator=gen)} for _ in range(k)]


@pytest.mark.parametrize("merger", [
    lambda tvs: iso_c(tvs, accelerator="cpu"),
    lambda tvs: iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
    lambda tvs: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
    lambda tvs: wudi_merging(tvs, accelerator="cpu", iter_num=3),
], ids=["iso_c", "iso_cts", "tsv_m", "wudi"])
def test_conv_weights_are_merged_by_the_host_function_as_matrices(merger):
    tvs = _task_vectors()
    merged = merge_conv_as_matrix(tvs, merger, {"conv.weight"})
    assert merged["conv.weight"].shape == (6, 4, 3, 3)
    average = torch.stack([tv["conv.weight"] for tv in tvs]).mean(0)
    assert not torch.allclose(merged["conv.weight"], average, atol=1e-3)  # what the host alone would give
    torch.manual_seed(0)  # (WUDI is deterministic; the seed only guards against future randomness)
    reference = merger([{"conv.weight": tv["conv.weight"].reshape(6, -1)} for tv in tvs])["conv.weight"]
    torch.testing.assert_close(merged["conv.weight"], reference.detach().reshape(6, 4, 3, 3))
    # the other tensors are the host function's own result
    host = merger(tvs)
    for key in ("fc.weight", "bn.bias"):
        torch.testing.assert_close(merged[key], host[key].detach())
    torch.testing.assert_close(merged["bn.bias"], torch.stack([tv["bn.bias"] for tv in tvs]).mean(0))


def test_conv_weight_names_cover_convolutions_only():
    names = conv_weight_names(TinyConvNet())
    assert names == {"features.0.weight", "features.4.weight"}  # not BatchNorm, not biases
    assert conv_weight_names(nn.Sequential(nn.Linear(2, 2), nn.ConvTranspose2d(2, 2, 3))) == set()


# --------------------------------------------------------------------------- rows
def test_new_rows_are_default_and_data_protocols_are_right():
    for family in ("clip", "heads"):
        registry, default = compare.family_registry(family)
        for key in DATA_FREE:
            assert key in default
            assert compare.row_protocol(registry[key], registry[key].overrides) == compare.NO_DATA
    clip, _ = compare.family_registry("clip")
    assert compare.row_protocol(clip["regmean_plusplus"], clip["regmean_plusplus"].overrides) == compare.TRAIN_UNLABELED
    heads, _ = compare.family_registry("heads")
    assert all(any(o.startswith("method=conv_as_matrix/") for o in heads[k].overrides) for k in DATA_FREE)
    dirs = _config_dirs([])
    for registry in (clip, heads):
        for key in [*DATA_FREE, "regmean_plusplus"]:
            if key in registry:
                assert compare.config_file(registry[key], dirs) is not None, key


def _context(tmp_path: Path, name: str, pool: str, *extra: str) -> compare.Context:
    return compare.Context(out=tmp_path / name, modelpool=pool, taskpool=pool,
                           extra_overrides=["fabric.accelerator=cpu", *extra], per_method={}, env={},
                           timeout=300.0, fast=True, fast_steps=3)


def test_new_rows_run_on_tiny_clip_and_heads_suites(tmp_path, suite_dir):
    """Every new row, with the comparison's own overrides (fast mode), through the fusion_bench CLI
    entry point (one interpreter for all runs), on a CLIP suite, a CNN and a text heads suite."""
    cnn, text = build_tiny_cnn_suite(tmp_path / "cnn"), build_tiny_text_suite(tmp_path / "text")
    clip_rows, _ = compare.family_registry("clip")
    heads_rows, _ = compare.family_registry("heads")
    runs = [(_context(tmp_path, "clip", "clip_suite", f"modelpool.suite_dir={suite_dir}"), clip_rows[key], suite_dir)
            for key in [*DATA_FREE, "regmean_plusplus"]]
    for name, suite in (("cnn", cnn), ("text", text)):
        ctx = _context(tmp_path, name, "heads_suite", f"modelpool.suite_dir={suite}")
        runs += [(ctx, heads_rows[key], suite) for key in DATA_FREE]
    commands = []
    for ctx, spec, _ in runs:
        ctx.run_dir(spec.key).mkdir(parents=True)
        commands.append(compare.build_overrides(spec, ctx))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp_path / "hf_home"),
               STATSMERGING_SUITE_DIR=str(suite_dir), STATSMERGING_HEADS_SUITE_DIR=str(cnn))
    proc = run_fusion_bench(commands, tmp_path, env)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0 and "EXIT" not in proc.stdout, log
    for ctx, spec, suite in runs:
        row = compare.collect_report(spec, ctx.run_dir(spec.key), 0, "")
        assert row["status"] == "ok", (ctx.out.name, spec.key, row, log)
        tasks = json.loads((suite / ("tasks.json" if suite != suite_dir else "manifest.json")).read_text())
        tasks = tasks.get("tasks", tasks)
        assert set(row["accuracies"]) == set(tasks)
        assert all(0.0 <= a <= 1.0 for a in row["accuracies"].values())
    assert "method.iter_num=3" in compare.build_overrides(clip_rows["wudi"], runs[0][0])  # fast WUDI


def test_regmean_plusplus_is_listed_as_not_applicable_on_heads_pools(tmp_path):
    """Not run on a per-task-head suite: its row says why, and --fail-on-error does not count it."""
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "suite.json").write_text(json.dumps({"format": "per_task_heads/1"}))
    _, default = compare.family_registry("heads")
    assert "regmean_plusplus" in default
    out = tmp_path / "out"
    code = compare.main(["--suite", str(tmp_path / "suite"), "--out", str(out), "--methods", "regmean_plusplus",
                         "--fail-on-error"])
    assert code == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert row["status"] == "not applicable" and "nn.Linear" in row["error"]
    assert row["protocol"] == compare.TRAIN_UNLABELED
    assert "not applicable" in (out / "results.md").read_text()
