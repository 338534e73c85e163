"""The builders' linear-probe reference (benchmarks/real_suites/probe.py)."""

import sys

import pytest
import torch

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "real_suites"))
from probe import linear_probe  # noqa: E402


def _task(n: int, generator: torch.Generator):
    """Linearly separable labels on features with a large offset and scale, which the probe must standardise."""
    x = torch.randn(n, 8, generator=generator) * 5 + 10
    return x, ((x - 10) @ torch.eye(8)[:, :3]).argmax(-1)  # 3 classes, linear in the features


@pytest.mark.parametrize("penalty", ["weight_decay", "l2"])
def test_probe_fits_raw_features_and_reports_its_selection(penalty):
    g = torch.Generator().manual_seed(0)
    train, validation, test = _task(400, g), _task(200, g), _task(200, g)
    head, info = linear_probe(train, validation, 3, seed=0, penalty=penalty, strengths=(0.0, 1e-2))
    assert set(info) == {"validation_accuracy", penalty, "step"} and info[penalty] in (0.0, 1e-2)
    # the returned head takes raw features: the standardisation is folded in
    assert float((head(test[0]).argmax(-1) == test[1]).float().mean()) > 0.9
    assert info["validation_accuracy"] > 0.9 and info["step"] % 25 == 0


def test_probe_rejects_an_unknown_penalty():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="penalty must be one of"):
        linear_probe(_task(10, g), _task(10, g), 3, seed=0, penalty="l1")
