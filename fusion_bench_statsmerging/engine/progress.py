"""How long a run will take: its optimisation steps over every phase, said before the first one, and an
estimate of the time left once the first steps are timed.

A run is more than its training schedule (StatsMerging-R probes two starts for 300 steps each before its
3000 training steps, and the paper's 500 epochs are as many steps as the largest fit set needs batches,
times 500), so neither a fixed step count nor one phase's progress bar tells the user what to expect.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Mapping, Optional

ESTIMATE_AFTER = 20  # steps timed (after the first, which allocates and picks kernels) before the estimate


def duration(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``42s``: short enough for a progress bar."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class RunProgress:
    """The steps of every phase of a run (e.g. ``{"start probes": 600, "training": 3000}``), counted as
    they finish; from the steady pace of the first :data:`ESTIMATE_AFTER` steps, the time left."""

    def __init__(self, label: str, phases: Mapping[str, int], estimate_after: int = ESTIMATE_AFTER,
                 clock: Callable[[], float] = time.perf_counter):
        self.label = label
        self.phases = {name: int(n) for name, n in phases.items() if int(n) > 0}
        self.total = sum(self.phases.values())
        self.done = 0
        self.estimate_after = int(estimate_after)
        self._clock = clock
        self._first: Optional[float] = None  # when the first step ended
        self._pace: Optional[float] = None  # seconds a step, once measured

    def plan(self) -> str:
        """The line said before the first step."""
        parts = ", ".join(f"{name} {n}" for name, n in self.phases.items())
        return f"{self.label}: {self.total} optimisation steps in all ({parts or 'no training'})"

    def step(self) -> Optional[str]:
        """Count a finished step; once, after the first steps are timed, the estimate line."""
        now = self._clock()
        self.done += 1
        if self._first is None:
            self._first = now
            return None
        timed = self.done - 1
        if self._pace is not None or timed < self.estimate_after:
            return None
        self._pace = (now - self._first) / timed
        return (f"{self.label}: {1000 * self._pace:.1f} ms a step over steps 2-{self.done}; the remaining "
                f"{self.total - self.done} of {self.total} steps: about {duration(self.seconds_left())} "
                "(steps only: selection and teacher passes add to it)")

    def seconds_left(self) -> Optional[float]:
        return None if self._pace is None else self._pace * max(self.total - self.done, 0)

    def postfix(self) -> Dict[str, str]:
        """What the progress bar adds: the whole run's time left, once estimated."""
        left = self.seconds_left()
        return {} if left is None else {"run_left": duration(left)}
