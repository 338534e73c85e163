"""Shared fixtures: one tiny offline CLIP suite per test session (seconds to build)."""

import json
import os
import subprocess
import sys
from pathlib import Path

# Before anything imports torchvision (lightning may): let it import beside a torch its compiled ops do not
# match, here and, through the .pth file, in the fusion_bench subprocesses (torchvision_compat's docstring).
from fusion_bench_statsmerging.utils import torchvision_compat

torchvision_compat.ensure_installed()

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    from fusion_bench_statsmerging.fixtures.clip import build_tiny_clip_suite

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bits whichever test builds it first (tests/test_pinned.py relies on it)
    try:
        return build_tiny_clip_suite(tmp_path_factory.mktemp("tiny_clip_suite"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cnn_suite(tmp_path_factory) -> Path:
    """A tiny per-task-head CNN suite (BatchNorm backbone, one head per task), built once per test module."""
    from fusion_bench_statsmerging.fixtures.heads import build_tiny_cnn_suite

    return build_tiny_cnn_suite(tmp_path_factory.mktemp("heads_cnn"))


@pytest.fixture
def modelpool(suite_dir):
    from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool

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


def missing_asset(reason: str) -> None:
    """Skip a test whose external asset (a Debian data package, a registry download) is absent, except
    under CI (``STATSMERGING_REQUIRE_ASSETS=1``, set by .ci/run), where a skip would hide a test that
    never ran: there it fails, saying what to install."""
    if os.environ.get("STATSMERGING_REQUIRE_ASSETS") == "1":
        pytest.fail(f"required asset missing (STATSMERGING_REQUIRE_ASSETS=1): {reason}")
    pytest.skip(reason)


@pytest.fixture
def single_thread():
    """Tiny models: intra-op threads only spin on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


FUSION_BENCH_DRIVER = (
    "import json, sys\n"
    "from hydra.core.global_hydra import GlobalHydra\n"
    "from fusion_bench.scripts.cli import _hydra_main  # what the `fusion_bench` script runs\n"
    "for args in json.loads(sys.argv[1]):\n"
    "    sys.argv = ['fusion_bench', *args]\n"
    "    try:\n"
    "        _hydra_main()\n"
    "    except SystemExit as e:\n"
    "        print('EXIT', e.code, args)\n"
    "    GlobalHydra.instance().clear()\n"
)


def run_fusion_bench(commands, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    """Run ``fusion_bench`` command lines (lists of overrides) one after another in one interpreter,
    so the imports are paid once, not once per command."""
    return subprocess.run([sys.executable, "-c", FUSION_BENCH_DRIVER, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_suite_cli_and_check_reports(runs, common, suite, tmp_path) -> None:
    """Run ``{key: overrides}`` through the real CLI on a suite (offline, a fresh HF cache), each into
    ``tmp_path/key``, and check every run wrote ``program_report.json`` with an accuracy for each of the
    suite's tasks and their average."""
    commands = [[*args, *common, f"path.log_dir={tmp_path / key}"] for key, args in runs.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HOME=str(tmp_path / "hf_home"), STATSMERGING_SUITE_DIR=str(suite))
    proc = run_fusion_bench(commands, tmp_path, env)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0 and "EXIT" not in proc.stdout, log
    tasks = json.loads((Path(suite) / "tasks.json").read_text())
    for key in runs:
        report_path = tmp_path / key / "program_report.json"
        assert report_path.is_file(), f"{key} wrote no report\n{log}"
        report = json.loads(report_path.read_text())
        for task in tasks:
            assert 0.0 <= report[task]["accuracy"] <= 1.0
        assert abs(report["average"]["accuracy"] - sum(report[t]["accuracy"] for t in tasks) / len(tasks)) < 1e-6
