"""The ``individual`` row's pseudo-method: every expert evaluated on its own task.

Built lazily (:func:`_experts_algorithm_class`): importing the host costs seconds and torch, which
the comparison's parent process must not pay. Hydra finds it as
``fusion_bench_statsmerging.compare.ExpertsOnOwnTasks`` through the package's PEP 562 hook.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple


def _experts_algorithm_class() -> type:
    """Build the experts pseudo-method lazily: importing the host costs seconds and torch,
    which the parent process (which only launches children) must not pay."""
    from fusion_bench.method import BaseAlgorithm

    class ExpertsOnOwnTasks(BaseAlgorithm):
        """Return every expert (not merged) so the program evaluates each one.

        With ``diagonal_only`` and a task pool exposing ``test_dataloaders`` (the host's CLIP
        task pool and its subclasses), expert ``t`` is evaluated on task ``t`` only; otherwise
        on all tasks, and the comparison reads the diagonal.
        """

        def __init__(self, diagonal_only: bool = True, **kwargs):
            super().__init__(**kwargs)
            self.diagonal_only = diagonal_only

        def run(self, modelpool):
            taskpool = getattr(getattr(self, "_program", None), "taskpool", None)
            return _LazyExperts(modelpool, taskpool if self.diagonal_only else None)

    return ExpertsOnOwnTasks


class _LazyExperts(dict):
    """A dict of expert name -> model that loads one expert at a time while the host's
    program iterates ``items()``, so memory holds one expert instead of all of them."""

    def __init__(self, modelpool, taskpool=None):
        super().__init__({name: None for name in modelpool.model_names})
        self._modelpool = modelpool
        self._taskpool = taskpool

    def items(self) -> Iterator[Tuple[str, Any]]:  # type: ignore[override]
        for name in list(self.keys()):
            with _only_task(self._taskpool, name):
                yield name, self._modelpool.load_model(name)


class _only_task:
    """Restrict a task pool to one task for the duration of a block: a set-up CLIP-style pool
    through its ``test_dataloaders``, a per-task-head pool through its ``tasks`` list."""

    def __init__(self, taskpool, task: str):
        self.taskpool, self.task, self.saved = taskpool, task, None
        self.attribute: Optional[str] = None

    def __enter__(self):
        tp = self.taskpool
        if tp is None:
            return self
        if isinstance(getattr(tp, "tasks", None), list) and self.task in tp.tasks:
            self.attribute, self.saved = "tasks", tp.tasks
            tp.tasks = [self.task]
            return self
        if not getattr(tp, "_is_setup", True) and hasattr(tp, "setup"):
            tp.setup()
        loaders = getattr(tp, "test_dataloaders", None)
        if isinstance(loaders, dict) and self.task in loaders:
            self.attribute, self.saved = "test_dataloaders", loaders
            tp.test_dataloaders = {self.task: loaders[self.task]}
        return self

    def __exit__(self, *exc):
        if self.attribute is not None:
            setattr(self.taskpool, self.attribute, self.saved)
        return False
