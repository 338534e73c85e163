"""Several processes (issue 16): two gloo ranks through the real CLI compute what one process computes.

The reference is one process on the same global batch: ``batch_size`` is the global batch per task,
each of the two ranks trains on half of it (rows ``rank::2``), and the gradients are averaged across
ranks before Adam or SAM reads them, so the mean of the ranks' equal-size shard losses is the
single process's full-batch loss. Coefficients may differ only by the order of floating-point sums.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fusion_bench_statsmerging.engine import distributed
from fusion_bench_statsmerging.engine.checkpoint import StopFlag
from fusion_bench_statsmerging.engine.distillation import sample_indices
from fusion_bench_statsmerging.utils.errors import UserError

FUSION_BENCH = str(Path(sys.executable).with_name("fusion_bench"))  # a script: Lightning re-launches it per rank
FIT_SAMPLES, BATCH = 16, 8  # one pass over the fit set = 2 steps
STEPS, LR = 4, 1e-3  # both methods' default lr
TOLERANCE = 1e-5


def _fusion_bench(args, cwd, suite_dir, log_dir, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cwd / "hf_home"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", STATSMERGING_SUITE_DIR=str(suite_dir))
    common = ["modelpool=clip_suite", "taskpool=clip_suite", f"method.max_steps={STEPS}", f"method.batch_size={BATCH}",
              "method.log_every=1", "fabric.accelerator=cpu", f"path.log_dir={log_dir}"]
    proc = subprocess.run([FUSION_BENCH, *args, *common], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# StatsMerging's learner under Adam; SAMerging's free coefficients under SAM, whose perturbation must come
# from the all-reduced gradient (a rank's own gradient would move each rank elsewhere)
@pytest.mark.parametrize("method,report", [
    (["method=statsmerging", f"method.min_samples_per_task={FIT_SAMPLES}",
      f"method.max_samples_per_task={FIT_SAMPLES}"], "statsmerging_report.json"),
    (["method=samerging", f"method.num_batches_per_task={FIT_SAMPLES // BATCH}"], "samerging_report.json"),
    # StatsMerging's two starts: every rank probes both and goes on with rank 0's choice
    (["method=statsmerging", f"method.min_samples_per_task={FIT_SAMPLES}", f"method.max_samples_per_task={FIT_SAMPLES}",
      "method.select_by=validation_agreement", "method.select_every=2", "method.start_probe_steps=2",
      "method.starts=[{output:unbounded,init_coefficient:0.0},{output:sigmoid,init_coefficient:0.3}]"],
     "statsmerging_report.json"),
], ids=["statsmerging_adam", "samerging_sam", "statsmerging_two_starts"])
def test_two_ranks_give_the_coefficients_of_one_process_on_the_same_global_batch(tmp_path, suite_dir, method,
                                                                                  report):
    one, two = tmp_path / "one", tmp_path / "two"
    _fusion_bench(method, tmp_path, suite_dir, one)
    proc = _fusion_bench([*method, "fabric.devices=2", "fabric.strategy=ddp"], tmp_path, suite_dir, two)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr

    a, b = torch.load(one / "coefficients.pt"), torch.load(two / "coefficients.pt")
    # A key bias shifts every attention logit of a query equally, so softmax ignores it: the true gradient of
    # SAMerging's free k_proj.bias coefficients is 0, and Adam turns their float-noise gradients (~1e-10)
    # into +-lr steps that differ from run to run. Those alone are held to lr * steps; the rest to TOLERANCE.
    layers = [row.split(",")[0] for row in (one / "coefficients.csv").read_text().splitlines()[1:]]
    free = torch.tensor([".k_proj.bias" in name and method[0] == "method=samerging" for name in layers])
    diff = (a - b).abs()  # StatsMerging's learner parameters each see every layer: no such directions there
    assert diff[:, ~free].max() <= TOLERANCE, diff[:, ~free].max()
    assert (diff[:, free] <= 2 * LR * STEPS).all()  # each run moves them by at most ~lr per step
    ref, ddp = json.loads((one / report).read_text()), json.loads((two / report).read_text())
    assert "distributed" not in ref  # one process: the report as before
    assert ref.get("start_probe", {}).get("chosen") == ddp.get("start_probe", {}).get("chosen")
    for h1, h2 in zip(ref["history"], ddp["history"]):  # the logged loss is the global batch's
        assert abs(h1["train/loss"] - h2["train/loss"]) <= TOLERANCE

    # each rank read its own half of every task's fit set in the first pass; together, all of it
    assert ddp["distributed"]["world_size"] == 2
    for t_idx, task in enumerate(ddp["models"]):
        rank0, rank1 = ddp["distributed"]["first_pass_rows_by_rank"][task]
        assert len(rank0) == len(rank1) == FIT_SAMPLES // 2
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == sample_indices(96, FIT_SAMPLES, t_idx)  # the tiny suite: 96 train images

    # the host's evaluation (its DistributedSampler shards the test set, torchmetrics syncs) matches
    r1, r2 = (json.loads((d / "program_report.json").read_text()) for d in (one, two))
    assert abs(r1["average"]["accuracy"] - r2["average"]["accuracy"]) <= 1e-6


def test_one_process_hooks_are_no_ops():
    closure = lambda: (torch.tensor(1.0), {})  # noqa: E731
    assert distributed.synced_closure(closure, [], None) is closure
    assert distributed.batch_rows(None) == slice(0, None, 1)
    assert distributed.is_rank_zero(None) and distributed.world_size(None) == 1
    assert distributed.gather({"x": 1}, None) == [{"x": 1}]
    stop = StopFlag()
    distributed.share_stop(stop, None)
    assert stop.signum is None


def test_the_batchnorm_family_refuses_ddp_before_loading_anything(tmp_path):
    from fusion_bench_statsmerging.method.statsmerging.heads_statsmerging import HeadsStatsMergingAlgorithm

    algorithm = HeadsStatsMergingAlgorithm(artifact_dir=str(tmp_path))
    algorithm.fabric = SimpleNamespace(world_size=2, global_rank=0, _loggers=[])  # _loggers: the mixin's __del__
    with pytest.raises(UserError, match="BatchNorm"):
        algorithm.run(modelpool=None)


def test_batch_size_must_split_evenly_over_the_ranks():
    distributed.check_batch_size(8, 2)
    with pytest.raises(UserError, match="multiple of 3"):
        distributed.check_batch_size(8, 3)
