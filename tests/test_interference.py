"""Interference statistics (issue 31): against independent numpy computations, their edge cases, the
fused engine against the per-tensor path, and a tiny StatsMerging run that uses them."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from transformers import CLIPVisionModel

from conftest import make_algorithm
from fusion_bench_statsmerging.engine.fused import FusedLayerWiseEngine
from fusion_bench_statsmerging.engine.interference import INTERFERENCE_FEATURES, interference_statistics
from fusion_bench_statsmerging.engine.lora_stats import lora_factor_statistics
from fusion_bench_statsmerging.engine.merge import HostLayerWiseEngine
from fusion_bench_statsmerging.engine.reuse import load_learner
from fusion_bench_statsmerging.engine.stats import (
    DEFAULT_FEATURES, FEATURES, layer_wise_statistics, num_features, task_wise_statistics, tensor_statistics,
)
from fusion_bench_statsmerging.method.statsmerging.coefficients import pool_statistics
from fusion_bench_statsmerging.utils.errors import UserError

ALL = ["mean", "variance", "norm", "singular_values", "cosine", "subspace_overlap", "relative_norm"]
SHAPES = [(4, 2, 3, 3), (5, 3), (3, 9), (7,)]


# --------------------------------------------------------------------------- numpy reference
def np_cosine(tvs: np.ndarray) -> np.ndarray:
    flat = tvs.reshape(len(tvs), -1).astype(np.float64)
    out = []
    for k, a in enumerate(flat):
        others = flat.sum(0) - a
        den = np.linalg.norm(a) * np.linalg.norm(others)
        out.append(0.0 if den == 0 else a @ others / den)
    return np.array(out)


def np_left_basis(t: np.ndarray, rank: int) -> np.ndarray:
    m = t.reshape(t.shape[0], -1).astype(np.float64)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    r = min(rank, *m.shape)
    keep = s[:r] > 1e-6 * s[0] if s[0] > 0 else np.zeros(r, bool)
    return u[:, :r] * keep


def np_overlap(tvs: np.ndarray, rank: int) -> np.ndarray:
    k = len(tvs)
    if k < 2:
        return np.zeros(k)
    if tvs.ndim == 2:  # 1-D tensors: mean cos^2 to each other expert
        flat = tvs.astype(np.float64)
        norms = np.linalg.norm(flat, axis=1)
        pair = lambda a, b: 0.0 if norms[a] * norms[b] == 0 else (flat[a] @ flat[b] / (norms[a] * norms[b])) ** 2
    else:
        bases = [np_left_basis(t, rank) for t in tvs]
        r = bases[0].shape[1]
        pair = lambda a, b: np.sum((bases[a].T @ bases[b]) ** 2) / r
    return np.array([np.mean([pair(a, b) for b in range(k) if b != a]) for a in range(k)])


def np_relative_norm(tvs: np.ndarray, pretrained: np.ndarray) -> np.ndarray:
    base = np.linalg.norm(pretrained.astype(np.float64).ravel())
    return np.array([0.0 if base == 0 else np.linalg.norm(t.astype(np.float64).ravel()) / base for t in tvs])


def np_interference(tvs: np.ndarray, pretrained: np.ndarray, rank: int) -> np.ndarray:
    return np.stack([np_cosine(tvs), np_overlap(tvs, rank), np_relative_norm(tvs, pretrained)], axis=1)


def random_tensors(shape, k: int, seed: int):
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=shape)  # a common direction, so cosines and overlaps are not all ~0
    tvs = np.stack([0.5 * shared + rng.normal(size=shape) for _ in range(k)]).astype(np.float32)
    return tvs, rng.normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------- against numpy
@pytest.mark.parametrize("shape", SHAPES, ids=["conv", "tall", "wide", "vector"])
@pytest.mark.parametrize("k", [2, 4])
def test_interference_matches_numpy(shape, k):
    tvs, pre = random_tensors(shape, k, seed=sum(shape) + k)
    ours = interference_statistics(torch.from_numpy(tvs), list(INTERFERENCE_FEATURES), 3, torch.from_numpy(pre))
    np.testing.assert_allclose(ours.numpy(), np_interference(tvs, pre, 3), rtol=1e-4, atol=1e-6)
    assert ours.dtype == torch.float32 and ours.shape == (k, 3)
    assert torch.all((ours[:, 1] >= 0) & (ours[:, 1] <= 1 + 1e-6))


def test_feature_order_and_subsets_follow_the_list():
    tvs, pre = random_tensors((5, 3), 3, seed=1)
    t = [torch.from_numpy(x) for x in tvs]
    full = interference_statistics(t, list(INTERFERENCE_FEATURES), 3, torch.from_numpy(pre))
    some = interference_statistics(t, ["relative_norm", "mean", "cosine"], 3, torch.from_numpy(pre))
    torch.testing.assert_close(some, full[:, [2, 0]])
    per_tensor = layer_wise_statistics([{"w": x} for x in t], ["cosine", "mean", "relative_norm"], 3,
                                       {"w": torch.from_numpy(pre)})
    torch.testing.assert_close(per_tensor[:, 0, [0, 2]], full[:, [0, 2]])
    torch.testing.assert_close(per_tensor[:, 0, 1], torch.from_numpy(tvs.reshape(3, -1).mean(1)))


# --------------------------------------------------------------------------- edge cases
def test_one_expert_has_nothing_to_interfere_with():
    tvs, pre = random_tensors((4, 2, 3, 3), 1, seed=3)
    out = interference_statistics(torch.from_numpy(tvs), list(INTERFERENCE_FEATURES), 3, torch.from_numpy(pre))
    torch.testing.assert_close(out[:, :2], torch.zeros(1, 2))
    torch.testing.assert_close(out[0, 2], torch.tensor(float(np.linalg.norm(tvs) / np.linalg.norm(pre))))


@pytest.mark.parametrize("shape", SHAPES, ids=["conv", "tall", "wide", "vector"])
def test_zero_task_vectors_and_cancelling_experts(shape):
    tvs, pre = random_tensors(shape, 3, seed=5)
    tvs[0] = 0  # an expert that did not change this tensor
    ours = interference_statistics(torch.from_numpy(tvs), list(INTERFERENCE_FEATURES), 3, torch.from_numpy(pre))
    np.testing.assert_allclose(ours.numpy(), np_interference(tvs, pre, 3), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[0], torch.zeros(3))
    tvs[0], tvs[2] = 1.0, -tvs[1]  # the others of expert 0 cancel out: no direction to compare with
    ours = interference_statistics(torch.from_numpy(tvs), ["cosine"], 3)[:, 0]
    assert ours[0] == 0
    np.testing.assert_allclose(ours[1:].numpy(), np_cosine(tvs)[1:], rtol=1e-4, atol=1e-6)
    all_zero = interference_statistics(torch.zeros(3, *shape), list(INTERFERENCE_FEATURES), 3, torch.zeros(shape))
    torch.testing.assert_close(all_zero, torch.zeros(3, 3))  # W_0 = 0 too: relative_norm is 0, not inf


def test_relative_norm_needs_the_pretrained_weights():
    tvs = [{"w": torch.randn(4, 3)} for _ in range(2)]
    with pytest.raises(ValueError, match="pretrained"):
        layer_wise_statistics(tvs, ["norm", "relative_norm"], 3)
    with pytest.raises(ValueError, match="pretrained"):
        task_wise_statistics(tvs, ["relative_norm"], 3)
    # cosine and subspace_overlap do not need them
    assert layer_wise_statistics(tvs, ["cosine", "subspace_overlap"], 3).shape == (2, 1, 2)

    class NoPretrained:
        num_models, param_names = 2, ["w"]

        def task_vector(self, k):
            return tvs[k]

    with pytest.raises(UserError, match="does not keep them"):
        pool_statistics(NoPretrained(), "layer_wise", ["relative_norm"], 3)
    assert pool_statistics(NoPretrained(), "layer_wise", ["cosine"], 3).shape == (2, 1, 1)


def test_single_expert_paths_refuse_comparative_features():
    with pytest.raises(ValueError, match="one task vector alone"):
        tensor_statistics(torch.randn(4, 3), ["mean", "cosine"], 3)
    with pytest.raises(ValueError, match="one adapter"):
        lora_factor_statistics(torch.randn(2, 5), torch.randn(4, 2), 1.0, ["norm", "subspace_overlap"], 3)


def test_defaults_and_widths_are_unchanged():
    assert DEFAULT_FEATURES == ("mean", "variance", "norm", "singular_values")
    assert set(FEATURES) == set(ALL)
    assert num_features(DEFAULT_FEATURES, 3) == 6 and num_features(ALL, 3) == 9


def test_task_wise_is_the_whole_flattened_task_vector():
    rng = np.random.default_rng(7)
    shapes = {"conv": (4, 2, 3, 3), "w": (5, 3), "b": (7,)}
    tvs = [{n: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for n, s in shapes.items()} for _ in range(3)]
    pre = {n: torch.from_numpy(rng.normal(size=s).astype(np.float32)) for n, s in shapes.items()}
    ours = task_wise_statistics(tvs, ["norm", *INTERFERENCE_FEATURES], 3, pre)
    flat = np.stack([np.concatenate([tv[n].numpy().ravel() for n in shapes]) for tv in tvs])
    flat_pre = np.concatenate([pre[n].numpy().ravel() for n in shapes])
    np.testing.assert_allclose(ours[:, 1:].numpy(), np_interference(flat, flat_pre, 3), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours[:, 0].numpy(), np.linalg.norm(flat, axis=1), rtol=1e-5)


# --------------------------------------------------------------------------- fused == per-tensor
class Small(nn.Module):
    """A conv, two linears whose weights share the conv kernel's 108 elements (one fused group of three
    shapes) and 1-D tensors (conv bias and LayerNorm share a group of 4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(12, 9)
        self.fc2 = nn.Linear(9, 12)
        self.norm = nn.LayerNorm(4)


def small_pool(k: int):
    torch.manual_seed(0)
    pre = Small()
    shared = {n: torch.randn_like(p) for n, p in pre.named_parameters()}
    experts = []
    for _ in range(k):
        e = Small()
        e.load_state_dict({n: p.detach() + 0.1 * (shared[n] + torch.randn_like(p)) for n, p in pre.named_parameters()})
        experts.append(e)
    return pre, experts


@pytest.mark.parametrize("k", [1, 3])
def test_fused_statistics_equal_the_per_tensor_path(k):
    pre, experts = small_pool(k)
    pretrained = {n: p.detach().clone() for n, p in pre.named_parameters()}
    tvs = [{n: p.detach() - pretrained[n] for n, p in e.named_parameters()} for e in experts]
    fused = FusedLayerWiseEngine(pre, experts)  # consumes the experts
    for features in (ALL, ["relative_norm", "singular_values", "cosine"], ["subspace_overlap"]):
        reference = layer_wise_statistics(tvs, features, 3, pretrained)
        torch.testing.assert_close(fused.layer_wise_statistics(features, 3), reference, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(pool_statistics(fused, "layer_wise", features, 3), reference, rtol=1e-4, atol=1e-6)
    # and the defaults are exactly what they were (no interference column sneaks in)
    torch.testing.assert_close(fused.layer_wise_statistics(list(DEFAULT_FEATURES), 3),
                               layer_wise_statistics(tvs, DEFAULT_FEATURES, 3), rtol=1e-4, atol=1e-7)


def _clip_engines(suite_dir):
    def load():
        experts = [CLIPVisionModel.from_pretrained(d) for d in sorted((suite_dir / "experts").iterdir())]
        return CLIPVisionModel.from_pretrained(suite_dir / "pretrained"), experts

    return HostLayerWiseEngine(*load()), FusedLayerWiseEngine(*load())


@pytest.mark.parametrize("mode", ["layer_wise", "task_wise"])
def test_host_and_fused_engines_agree_on_the_clip_suite(suite_dir, mode):
    host, fused = _clip_engines(suite_dir)
    ours = pool_statistics(fused, mode, ALL, 3)
    torch.testing.assert_close(ours, pool_statistics(host, mode, ALL, 3), rtol=1e-4, atol=1e-6)
    assert torch.isfinite(ours).all()


# --------------------------------------------------------------------------- end to end
def test_statsmerging_trains_with_the_interference_features(tmp_path, cpu_fabric, modelpool):
    algorithm = make_algorithm(tmp_path, cpu_fabric, max_steps=2, features=ALL, merge_engine="fused")
    algorithm.run(modelpool)
    report = json.loads((tmp_path / "artifacts" / "statsmerging_report.json").read_text())
    assert report
    saved = load_learner(tmp_path / "artifacts" / "learner.pt")
    assert saved.options["features"] == ALL and saved.in_features == 9
    assert saved.raw_statistics.shape[-1] == 9 and torch.isfinite(saved.raw_statistics).all()
    # the saved learner's option checks accept its own features and refuse the defaults
    reuse = make_algorithm(tmp_path / "reuse", cpu_fabric, max_steps=0, learner_path=str(saved.path), features=ALL)
    assert list(reuse.features) == ALL
    with pytest.raises(UserError, match="features"):
        make_algorithm(tmp_path / "bad", cpu_fabric, max_steps=0, learner_path=str(saved.path),
                       features=list(DEFAULT_FEATURES))
