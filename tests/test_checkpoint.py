"""Issue 15: an interrupted run is resumable and resumes to the uninterrupted result."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO_ROOT, make_algorithm
from fusion_bench_statsmerging.engine.checkpoint import ResumeError
from fusion_bench_statsmerging.engine.trainer import Trainer
from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool

SETTINGS = dict(max_steps=8, lr_step_size=3, lr_gamma=0.5, lr=5e-2, checkpoint_every=2)

# The interrupted run: a real SIGTERM, sent to itself during its step `signal_at` (0-based, counting every
# optimisation step of the process), so the test does not depend on timing; the handler lets that step
# finish, checkpoints, exits 143.
INTERRUPTED = textwrap.dedent("""
    import json, os, signal, sys
    import lightning as L, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import make_algorithm
    from fusion_bench_statsmerging.modelpool.clip_suite import CLIPSuiteModelPool
    algorithm = make_algorithm(__import__("pathlib").Path({tmp!r}), L.Fabric(accelerator="cpu", devices=1),
                               **json.loads({settings!r}))
    from fusion_bench_statsmerging.engine.trainer import Trainer
    step, real = [0], Trainer.step
    def step_and_signal(*args):
        if step[0] == {signal_at}:
            os.kill(os.getpid(), signal.SIGTERM)
        step[0] += 1
        return real(*args)
    Trainer.step = step_and_signal
    algorithm.run(CLIPSuiteModelPool(suite_dir={suite!r}))
""")


def _coefficients(tmp_path):
    return torch.load(tmp_path / "artifacts" / "coefficients.pt")


def test_sigterm_checkpoints_and_resume_equals_the_uninterrupted_run(tmp_path, suite_dir, cpu_fabric,
                                                                      single_thread):
    whole = tmp_path / "whole"
    make_algorithm(whole, cpu_fabric, **SETTINGS).run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))
    assert not (whole / "artifacts" / "checkpoint.pt").exists()  # a finished run keeps none

    parts = tmp_path / "parts"
    script = INTERRUPTED.format(tests=str(REPO_ROOT / "tests"), tmp=str(parts), settings=json.dumps(SETTINGS),
                                suite=str(suite_dir), signal_at=4)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    checkpoint = parts / "artifacts" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["steps_done"] == 5
    assert not (parts / "artifacts" / "coefficients.pt").exists()  # no result pretends to be final
    assert oct(checkpoint.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the host's file mode

    resumed = make_algorithm(parts, cpu_fabric, resume=True, **SETTINGS)
    resumed.run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))
    assert torch.equal(_coefficients(parts), _coefficients(whole))
    report = json.loads((parts / "artifacts" / "statsmerging_report.json").read_text())
    assert [h["step"] for h in report["history"]] == list(range(8))  # history carried over
    assert not checkpoint.exists()


def test_resume_with_starts_reuses_the_probes_and_equals_the_uninterrupted_run(tmp_path, suite_dir, cpu_fabric,
                                                                              single_thread, monkeypatch):
    """StatsMerging's ``starts``: the probes run before the checkpointed training; a resumed run takes their
    outcome from start_probe.json (it does not probe again) and ends as the uninterrupted run did."""
    # the losing start listed first and configured (the tiny suite's probes pick the 0.3 start by far), so a
    # resume that ignored the probes' outcome would train the other start
    settings = dict(SETTINGS, select_by="validation_agreement", select_every=2, start_probe_steps=2,
                    output="unbounded", init_coefficient=0.0,
                    starts=[{"output": "unbounded", "init_coefficient": 0.0},
                            {"output": "sigmoid", "init_coefficient": 0.3}])
    whole = tmp_path / "whole"
    make_algorithm(whole, cpu_fabric, **settings).run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))
    parts = tmp_path / "parts"
    script = INTERRUPTED.format(tests=str(REPO_ROOT / "tests"), tmp=str(parts), settings=json.dumps(settings),
                                suite=str(suite_dir), signal_at=2 * 2 + 4)  # after two probes of 2 steps
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert torch.load(parts / "artifacts" / "checkpoint.pt", weights_only=False)["steps_done"] == 5
    probed = json.loads((parts / "artifacts" / "start_probe.json").read_text())

    resumed = make_algorithm(parts, cpu_fabric, resume=True, **settings)
    monkeypatch.setattr(resumed, "probe_starts", lambda *a: pytest.fail("the probes ran again"))
    resumed.run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))
    assert torch.equal(_coefficients(parts), _coefficients(whole))
    report = json.loads((parts / "artifacts" / "statsmerging_report.json").read_text())
    assert probed["chosen"] == report["start_probe"]["chosen"] == 1 and "reused_from" in report["start_probe"]
    assert report["start_probe"]["results"] == probed["results"]  # the probes' own scores, from their file
    assert report["start"]["chosen"] == {"output": "sigmoid", "init_coefficient": 0.3}
    assert report["start"]["configured"] == {"output": "unbounded", "init_coefficient": 0.0}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_resume_refuses_a_missing_checkpoint_before_any_model_loads(tmp_path, suite_dir, cpu_fabric):
    pool = CLIPSuiteModelPool(suite_dir=str(suite_dir))
    pool.load_pretrained_model = lambda *a, **k: pytest.fail("no model may load before the check")
    with pytest.raises(ResumeError, match=r"method.resume=True, but there is no checkpoint at '.*checkpoint.pt'"):
        make_algorithm(tmp_path, cpu_fabric, resume=True).run(pool)


def test_resume_refuses_other_settings(tmp_path, suite_dir, cpu_fabric, single_thread, monkeypatch):
    algorithm = make_algorithm(tmp_path, cpu_fabric, **SETTINGS)
    real = Trainer.step
    calls = []

    def fail_at_step_three(*args):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(Trainer, "step", fail_at_step_three)
    with pytest.raises(RuntimeError, match="simulated crash"):
        algorithm.run(CLIPSuiteModelPool(suite_dir=str(suite_dir)))
    checkpoint = tmp_path / "artifacts" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["steps_done"] == 2  # the periodic one survived the crash
    with pytest.raises(ResumeError, match=r"setting 'lr' was '0.05' there and is '0.1' now"):
        make_algorithm(tmp_path, cpu_fabric, resume=str(checkpoint), **{**SETTINGS, "lr": 0.1}).run(
            CLIPSuiteModelPool(suite_dir=str(suite_dir)))


def test_sigint_waits_for_the_step_then_stops_with_its_exit_status_and_the_resume_override(tmp_path):
    from fusion_bench_statsmerging.engine.checkpoint import Interrupted, StopFlag

    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt here: the step may finish
        assert stop.signum == signal.SIGINT
        with pytest.raises(Interrupted) as stopped:
            stop.stop(tmp_path / "checkpoint.pt")
    assert signal.getsignal(signal.SIGINT) is before
    assert stopped.value.code == 130
    assert stopped.value.message.startswith("SIGINT: the checkpoint is")
    assert stopped.value.message.endswith(f"method.resume={tmp_path / 'checkpoint.pt'}")
