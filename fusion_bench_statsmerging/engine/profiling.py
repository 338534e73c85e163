"""Where a training step's time goes: ``method.profile_steps=N`` profiles N steps of the loop.

A step of the real loop can take longer than the same merge-forward-backward-update timed alone
(``benchmarks/merge_speed.py``): the loop also draws batches, logs, selects and checkpoints, and any
of those that waits for the GPU (a host-device copy, a ``.item()``) stops the host from queueing the
next step while the current one runs. The profile counts those waits and lists the costliest
operators, so the overhead is measured, not guessed. It is written to ``<artefact dir>/profile.txt``
and summarised in the method's JSON report.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from ..utils.artifacts import save_text

# Host-side calls that block until the device has caught up (each is a pipeline stall).
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
               "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense")
WARMUP_STEPS = 5  # the first steps pay for allocation and kernel selection; profile after them


class LoopClock:
    """Wall seconds of the training loop by what they went to: steps, logging, selection, checkpoints.

    Work on a GPU is queued, so host time alone would bill a step's wait to whatever reads a result
    next (the logger's ``.item()``). Each :meth:`lap` therefore waits for the device first; laps
    are taken only where the loop waits anyway (every ``log_every`` steps, at selection and
    checkpoints), so the clock adds no stall of its own. ``steps`` excludes the first step (lazy
    allocation and kernel selection) and the profiled steps (the profiler slows them): it is the
    loop's steady step, the one to compare with ``benchmarks/merge_speed.py``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, int] = defaultdict(int)
        self._pending = 0
        self._last = time.perf_counter()

    def step_done(self) -> None:
        self._pending += 1

    def lap(self, bucket: str) -> None:
        """Bill the time since the last lap (and the steps done since) to ``bucket``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[bucket] += now - self._last
        self.counts[bucket] += self._pending
        self._pending, self._last = 0, now

    @contextlib.contextmanager
    def section(self, name: str, steps_bucket: str) -> Iterator[None]:
        """Bill the steps run so far to ``steps_bucket`` and the block's own time to ``name``."""
        self.lap(steps_bucket)
        yield
        self.lap(name)

    def summary(self) -> Dict[str, object]:
        steady = self.counts.get("steps", 0)
        return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "steps": {k: v for k, v in self.counts.items() if v},
                "ms_per_step_steady": round(1e3 * self.seconds["steps"] / steady, 3) if steady else None}


class StepProfiler:
    """Profiles steps ``[WARMUP_STEPS, WARMUP_STEPS + steps)`` of a loop; call :meth:`after_step` after each."""

    def __init__(self, steps: int, out_dir: str, device: torch.device):
        self.steps, self.out_dir, self.device = int(steps), Path(out_dir), device
        self._prof: Optional[profile] = None
        self._start = 0.0
        self.summary: Dict[str, object] = {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def active(self) -> bool:
        return self._prof is not None

    def at_boundary(self, step: int) -> bool:
        """Whether :meth:`after_step` with ``step`` opens or closes the profiled window."""
        return self.steps > 0 and step in (WARMUP_STEPS, WARMUP_STEPS + self.steps)

    def after_step(self, step: int) -> None:
        """``step``: the number of steps finished so far."""
        if self.steps <= 0:
            return
        if step == WARMUP_STEPS and self._prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._sync()
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._start = time.perf_counter()
        elif self._prof is not None and step == WARMUP_STEPS + self.steps:
            self._close(self.steps)

    def finish(self, step: int) -> None:
        """After the loop (``step`` steps run): a run that ended inside the window is profiled over the steps
        it had; one that ended before the warm-up says so in the summary instead of leaving it empty."""
        if self.steps <= 0:
            return
        if self._prof is not None:
            self._close(step - WARMUP_STEPS)
        elif not self.summary:
            self.summary = {"profiled_steps": 0,
                            "note": f"the run had {step} steps, not more than the {WARMUP_STEPS} warm-up steps"}

    def _close(self, count: int) -> None:
        self._sync()
        seconds = time.perf_counter() - self._start
        self._prof.__exit__(None, None, None)
        if count > 0:
            self._write(seconds, count)
        else:
            self.summary = {"profiled_steps": 0, "note": "the run ended as the profile's window opened"}
        self._prof = None

    def _write(self, seconds: float, count: int) -> None:
        averages = self._prof.key_averages()
        calls = {e.key: e.count for e in averages if e.key in SYNC_EVENTS}
        device_us = sum(e.self_device_time_total for e in averages) if self.device.type == "cuda" else None
        self.summary = {
            "profiled_steps": count,
            "ms_per_step_wall": round(1e3 * seconds / count, 3),
            "ms_per_step_device_busy": None if device_us is None else round(device_us / 1e3 / count, 3),
            "blocking_calls_per_step": {k: round(v / count, 2) for k, v in sorted(calls.items())},
            "table": "profile.txt",
        }
        sort_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=30)
        text = [f"{count} steps, {self.summary['ms_per_step_wall']} ms per step (wall)", "", sort_cpu]
        if self.device.type == "cuda":
            text += ["", averages.table(sort_by="self_cuda_time_total", row_limit=30)]
        save_text(str(self.out_dir / "profile.txt"), "\n".join(text))
