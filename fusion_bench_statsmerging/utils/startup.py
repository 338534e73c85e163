"""Checks of a ``fusion_bench`` run made before Hydra starts its job, from the command line alone.

Once Hydra runs the job it has created the output folder (``path.log_dir``, with its config copies and
log file) and the host has printed a config tree of a few hundred lines; a check failing after that
leaves a folder behind and its message far below. What can be known from the composed config alone is
therefore checked here, when Hydra asks our search-path plugin for its paths (the first thing it does):
hub files missing while the hub cannot be reached, and an output folder that cannot be created. A
problem ends the process with one ``error:`` line and exit status 1, before anything is written.
Everything else (Hydra's own config errors included) is left to the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

# flags after which the CLI does not run a job (help, printing the config, ...) or runs several
_NOT_ONE_RUN = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion",
                "-m", "--multirun", "--version", "-p", "--package", "-cp", "--config-path", "-cn",
                "--config-name", "-cd", "--config-dir", "--experimental-rerun"}
_checked: set = set()


def run_overrides(argv: Sequence[str]) -> Optional[List[str]]:
    """The overrides of a plain ``fusion_bench`` run, or None for any other command line."""
    if not argv or Path(argv[0]).name != "fusion_bench":
        return None
    args = list(argv[1:])
    if any(a.split("=", 1)[0] in _NOT_ONE_RUN for a in args):
        return None
    return args


def choice(overrides: Sequence[str], group: str) -> Optional[str]:
    """The config chosen for ``group`` on the command line (``modelpool=X``), or None."""
    return next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{group}=")), None)


def log_dir_problem(cfg) -> Optional[str]:
    """Why the run's output folder (``path.log_dir``) could not be created, or None."""
    from omegaconf import OmegaConf

    from .preflight import creatable_problem

    try:
        log_dir = OmegaConf.select(cfg, "path.log_dir", throw_on_missing=True)
    except Exception:  # resolves only inside the job (a timestamp): the default under ./outputs
        return None
    problem = creatable_problem(log_dir) if isinstance(log_dir, str) else None
    return (f"Cannot create the output folder path.log_dir='{log_dir}': {problem}. Choose another "
            "`path.log_dir=...`.") if problem else None


def hub_problem(cfg, overrides: Sequence[str]) -> Optional[str]:
    """Hub files the run reads that are not cached while the hub cannot be reached, or None."""
    from .prefetch import command_for, needs_of_config, offline_problem

    needs = needs_of_config(cfg)
    if not needs:
        return None
    return offline_problem(needs, command_for(choice(overrides, "modelpool"), choice(overrides, "taskpool")))


def problem_before_run(overrides: Sequence[str]) -> Optional[str]:
    """The first problem of the run these overrides compose, or None (also when they do not compose:
    Hydra then reports that itself)."""
    from .prefetch import compose

    try:
        cfg = compose(overrides)
    except Exception:
        return None
    return log_dir_problem(cfg) or hub_problem(cfg, overrides)


def check_before_run(argv: Optional[Sequence[str]] = None) -> None:
    """Exit with one ``error:`` line when the run ``argv`` describes cannot work; once per command line
    (Hydra builds its search path more than once, and composing here builds it again)."""
    argv = list(sys.argv if argv is None else argv)
    overrides = run_overrides(argv)
    if overrides is None or tuple(argv) in _checked:
        return
    _checked.add(tuple(argv))
    problem = problem_before_run(overrides)
    if problem:
        sys.stdout.flush()
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(1)
