"""Statistics against an independent numpy reference, and the normaliser's behaviour."""

import numpy as np
import pytest
import torch

from fusion_bench_statsmerging.engine.stats import (
    FeatureNormalizer, layer_wise_statistics, num_features, task_wise_statistics, tensor_statistics,
    top_singular_values, validate_features,
)

FEATS = ["mean", "variance", "norm", "singular_values"]


def numpy_stats(t: np.ndarray, rank: int) -> np.ndarray:
    m = t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], -1)
    sv = np.linalg.svd(m.astype(np.float64), compute_uv=False)[:rank]
    sv = np.pad(sv, (0, rank - len(sv)))
    return np.concatenate([[t.mean(), t.var(), np.linalg.norm(t.ravel())], sv])


@pytest.mark.parametrize("shape", [(7,), (5, 3), (3, 9), (4, 2, 3, 3), (1, 6)])
def test_tensor_statistics_match_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    t = rng.normal(0.1, 2.0, size=shape).astype(np.float32)
    ours = tensor_statistics(torch.from_numpy(t), FEATS, rank=3).numpy()
    np.testing.assert_allclose(ours, numpy_stats(t, 3), rtol=1e-4, atol=1e-6)


def test_known_values_by_hand():
    t = torch.tensor([[3.0, 0.0], [0.0, -4.0]])  # singular values 4, 3; mean -0.25
    stats = tensor_statistics(t, FEATS, rank=3)
    expected = torch.tensor([-0.25, np.var([3, 0, 0, -4]), 5.0, 4.0, 3.0, 0.0])
    torch.testing.assert_close(stats, expected.float(), rtol=1e-5, atol=1e-6)
    # a vector is a 1 x n matrix: its only singular value is its norm, the rest is padding
    v = tensor_statistics(torch.tensor([3.0, 4.0]), ["singular_values"], rank=3)
    torch.testing.assert_close(v, torch.tensor([5.0, 0.0, 0.0]))


@pytest.mark.parametrize("shape", [(64, 64), (300, 20), (20, 300), (1, 50), (8, 768)])
def test_top_singular_values_match_svdvals(shape):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ref = torch.linalg.svdvals(m.double())[:3]
    ours = top_singular_values(m, 3)[: len(ref)]
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=0)


def test_feature_subsets_and_order():
    t = torch.randn(6, 4)
    full = tensor_statistics(t, FEATS, rank=2)
    assert num_features(FEATS, 2) == 5 == len(full)
    sub = tensor_statistics(t, ["norm", "mean"], rank=2)
    torch.testing.assert_close(sub, torch.stack([full[2], full[0]]))
    with pytest.raises(ValueError, match="subset of"):
        validate_features(["mean", "kurtosis"])
    with pytest.raises(ValueError):
        validate_features([])


def test_layer_and_task_wise_shapes():
    tvs = [{"a": torch.randn(4, 3), "b": torch.randn(4)} for _ in range(3)]
    lw = layer_wise_statistics(tvs, FEATS, 3)
    assert lw.shape == (3, 2, 6)
    tw = task_wise_statistics(tvs, FEATS, 3)
    assert tw.shape == (3, 6)
    flat = torch.cat([tvs[1]["a"].ravel(), tvs[1]["b"]])
    torch.testing.assert_close(tw[1, :3], torch.stack([flat.mean(), flat.var(unbiased=False), flat.norm()]))


def test_normalizer_tames_scales_and_round_trips():
    raw = torch.tensor([[1e-8, 1e2], [1e-6, 1e4], [-1e-7, 1e3]])
    norm = FeatureNormalizer.fit(raw)
    z = norm(raw)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    assert z[2, 0] < z[0, 0] < z[1, 0]  # signed: order (and the mean's sign) survive
    again = FeatureNormalizer.from_state_dict(norm.state_dict())
    torch.testing.assert_close(again(raw), z)
