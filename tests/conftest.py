"""Shared fixtures: one tiny offline CLIP suite per test session (seconds to build)."""

import os
from pathlib import Path

import lightning as L
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    from fusion_bench_statsmerging.fixtures import build_tiny_clip_suite

    return build_tiny_clip_suite(tmp_path_factory.mktemp("tiny_clip_suite"))


@pytest.fixture
def modelpool(suite_dir):
    from fusion_bench_statsmerging.suite import CLIPSuiteModelPool

    return CLIPSuiteModelPool(suite_dir=str(suite_dir))


@pytest.fixture
def cpu_fabric():
    return L.Fabric(accelerator="cpu", devices=1)


def make_algorithm(tmp_path, fabric, **overrides):
    """A StatsMerging instance configured for the tiny suite, writing into tmp_path."""
    from fusion_bench_statsmerging.method.statsmerging import CLIPStatsMergingAlgorithm

    config = dict(max_steps=5, data_fraction=0.5, batch_size=8, merge_engine="host",
                  artifact_dir=str(tmp_path / "artifacts"), log_every=1)
    config.update(overrides)
    algorithm = CLIPStatsMergingAlgorithm(**config)
    algorithm.fabric = fabric
    return algorithm
