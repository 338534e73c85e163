"""Training checkpoints: saved atomically every N steps and on SIGINT/SIGTERM, resumed exactly.

A checkpoint holds everything the rest of a run depends on: the coefficient module (learner or free
coefficients), the optimizer and LR scheduler, the number of steps done, the RNG states, the
fit-data indices of each task (so a resume on other data is refused, not silently mixed), the
best-state selection so far and the loss history. The batch stream is not stored: it is a pure
function of the seed, so a resume replays it to the same position. A resumed run therefore ends
with the coefficients an uninterrupted run would have (``tests/test_checkpoint.py`` compares them).

A signal only sets a flag; the training loop saves at the next step boundary (a consistent
state, never half an optimizer step) and then stops with the signal's exit status (130 for SIGINT,
143 for SIGTERM) and, as the last line of a CLI run, where the checkpoint is and the override that
resumes it (:class:`Interrupted`). A second signal stops at once. A finished run removes its
checkpoint, so no stale file lies beside new results.
"""

from __future__ import annotations

import logging
import random
import shlex
import signal
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import numpy as np
import torch

from ..utils import artifacts
from ..utils.errors import ReportedExit, UserError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = 1
# Keys that may change between the interrupted run and its resume (where and how often things are
# written, not what is computed).
FREE_KEYS = {"resume", "checkpoint_every", "artifact_dir", "log_every", "save_merged_model", "fit_data_on_device"}


class ResumeError(UserError):
    """A checkpoint that cannot continue this run, with what to change."""


def rng_state() -> Dict[str, Any]:
    """Every random stream a step may draw from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fingerprint(config: Mapping[str, Any]) -> Dict[str, str]:
    """The settings that decide the result (as text, so OmegaConf and plain values compare equal)."""
    return {k: str(v) for k, v in sorted(config.items()) if k not in FREE_KEYS}


def resolve_resume(resume: Union[bool, str, None], out_dir: str) -> Optional[Path]:
    """``true``: the checkpoint in this run's artifact folder; a path: that file (or folder's checkpoint)."""
    if resume in (None, False, "false", "False", ""):
        return None
    path = Path(out_dir) / CHECKPOINT_NAME if resume in (True, "true", "True") else Path(str(resume))
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise ResumeError(
            f"method.resume={resume}, but there is no checkpoint at '{path}'. The default artifact folder is new "
            "for every run: pass the interrupted run's file (method.resume=/path/to/checkpoint.pt), or set "
            "method.artifact_dir to the interrupted run's folder.")
    return path


class Interrupted(ReportedExit):
    """The run stopped on a signal after saving its checkpoint: exit status 128 + signal, no traceback,
    and one last line with the file and the override that goes on from it."""

    def __init__(self, signum: int, checkpoint: Optional[Path]):
        super().__init__(128 + int(signum), resume_hint(signum, checkpoint), "interrupted")


def resume_hint(signum: int, checkpoint: Optional[Path]) -> str:
    """Where the interrupted run's state is and the exact override that continues it."""
    name = signal.Signals(signum).name
    if checkpoint is None:
        return f"{name}: stopped without a checkpoint (method.checkpoint_every saves none here)."
    override = shlex.quote(f"method.resume={Path(checkpoint).resolve()}")
    return (f"{name}: the checkpoint is '{Path(checkpoint).resolve()}'; to go on, rerun the same command with "
            f"{override}")


class StopFlag:
    """SIGINT/SIGTERM set a flag the training loop reads between steps (main thread only; elsewhere
    signals keep their handlers). A second signal restores the old handler and stops at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: no more waiting for the step to end
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def stop(self, checkpoint: Optional[Path] = None) -> None:
        """End the run with the signal's exit status, saying how to resume from ``checkpoint``."""
        raise Interrupted(self.signum, checkpoint)


class Checkpointer:
    """Saves and restores one training run's state under ``path``."""

    def __init__(self, path: Union[str, Path, None], every: int = 0, config: Optional[Mapping[str, Any]] = None,
                 fit_indices: Optional[Mapping[str, List[int]]] = None, resume_from: Optional[Path] = None):
        """``path=None``: checkpoints off (a bare ``train()`` call, outside ``run()``)."""
        self.path = Path(path) if path is not None else None
        self.every = int(every or 0) if path is not None else 0
        self.resume_from = resume_from
        self.fingerprint = fingerprint(config or {})
        self.fit_indices = {t: [int(i) for i in idx] for t, idx in (fit_indices or {}).items()}

    # ------------------------------------------------------------------ save
    def due(self, steps_done: int) -> bool:
        return self.every > 0 and steps_done % self.every == 0

    def save(self, steps_done: int, coefficient_module, optimizer, scheduler, best, history) -> Path:
        state = {
            "format": FORMAT, "steps_done": int(steps_done), "config": self.fingerprint,
            "fit_indices": self.fit_indices, "rng": rng_state(),
            "coefficient_module": coefficient_module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "best": dict(vars(best)) if best is not None else None, "history": list(history),
        }
        artifacts.save_torch(self.path, state)
        log.info("checkpoint after %d steps: %s", steps_done, self.path)
        return self.path

    def saves_after(self, steps_done: int, total: int, stop: Optional[StopFlag]) -> bool:
        """Whether :meth:`after_step` with these arguments writes a checkpoint (when due, or asked to stop)."""
        stopping = stop is not None and stop.signum is not None
        return self.path is not None and (stopping or (self.due(steps_done) and steps_done < total))

    def after_step(self, steps_done: int, total: int, stop: Optional[StopFlag], *state) -> None:
        """The training loop's hook: save when due or asked to stop, then stop if asked.
        ``state``: coefficient module, optimizer, scheduler, best state, history (as for :meth:`save`)."""
        if self.saves_after(steps_done, total, stop):
            self.save(steps_done, *state)
        if stop is not None and stop.signum is not None:
            stop.stop(self.path)

    # ------------------------------------------------------------------ resume
    def resume(self, *state) -> int:
        """Steps already done: 0 for a fresh run, else what the checkpoint restored into ``state``."""
        return self.load(self.resume_from, *state) if self.resume_from is not None else 0

    def load(self, source: Path, coefficient_module, optimizer, scheduler, best, history: list) -> int:
        """Restore everything from ``source``; returns the number of steps already done."""
        state = torch.load(source, map_location="cpu", weights_only=False)
        if state.get("format") != FORMAT:
            raise ResumeError(f"'{source}' is not a checkpoint of this version (format {state.get('format')}).")
        changed = sorted(k for k in set(state["config"]) | set(self.fingerprint)
                         if state["config"].get(k) != self.fingerprint.get(k))
        if changed:
            k = changed[0]
            raise ResumeError(
                f"cannot resume from '{source}': setting '{k}' was {state['config'].get(k)!r} there and is "
                f"{self.fingerprint.get(k)!r} now" + (f" ({len(changed) - 1} more differ)" if len(changed) > 1 else "")
                + ". Resume with the interrupted run's settings, or start afresh without method.resume.")
        if state["fit_indices"] != self.fit_indices:
            raise ResumeError(f"cannot resume from '{source}': the fitting samples differ (the data sets changed "
                              "since the checkpoint). Start afresh without method.resume.")
        coefficient_module.load_state_dict(state["coefficient_module"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state["scheduler"] is not None:
            scheduler.load_state_dict(state["scheduler"])
        if best is not None and state["best"] is not None:
            vars(best).update(state["best"])
        history[:] = state["history"]
        set_rng_state(state["rng"])
        log.info("resumed from %s after %d steps", source, state["steps_done"])
        return int(state["steps_done"])

    def remove(self) -> None:
        """A finished run keeps no checkpoint (its own, nor the one it resumed from): nothing stale
        beside its results."""
        for path in (self.path, self.resume_from):
            if path is not None:
                path.unlink(missing_ok=True)
