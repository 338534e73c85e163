"""Errors a user can act on, and their message as the last line of a failed ``fusion_bench`` run.

The host CLI logs a failing run's traceback, Hydra prints it again and ends with its own
"Set the environment variable HYDRA_FULL_ERROR=1" line, all below a config dump of a few hundred
lines. A :class:`UserError` created inside a Hydra job therefore registers, once, an exit hook
that prints the latest such message as the last line of the output (``error: ...``), so the
reader finds what to fix without scrolling. The host's log record of it (a traceback, or a panel
of a hundred lines) stays off the console; the log file keeps it. Outside a Hydra job (tests,
library use) nothing is registered and the exception behaves like any ``ValueError``.
"""

from __future__ import annotations

import atexit
import logging
import sys
from typing import Optional

_last: Optional[str] = None
_registered = False


def _in_hydra_job() -> bool:
    """Only a CLI run has the noisy output worth repeating the message below."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.initialized()
    except Exception:  # hydra missing or half set up: behave as library code
        return False


def one_line(message: str) -> str:
    """The message on one line, for the very end of a long log."""
    return " ".join(str(message).split())


def _repeat_last() -> None:
    if _last is not None:
        sys.stdout.flush()
        print(_last, file=sys.stderr, flush=True)


def is_reported(exc: Optional[BaseException]) -> bool:
    """An exception whose message the exit hook prints: its traceback helps nobody on the console."""
    return isinstance(exc, (UserError, ReportedExit))


class _NotOnConsole(logging.Filter):
    """Keeps the host's ``log.error(e, exc_info=True)`` of a reported exception off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and is_reported(record.exc_info[1]))


def _quiet_console() -> None:
    """Add :class:`_NotOnConsole` to every handler of the root logger but files (the log keeps all)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.addFilter(_NotOnConsole())


def remember(message: str, prefix: str = "error") -> None:
    """Have ``prefix: message`` printed as the process's last line (inside a Hydra job only)."""
    global _last, _registered
    if not _in_hydra_job():
        return
    _last = f"{prefix}: {one_line(message)}"
    if not _registered:
        atexit.register(_repeat_last)
        _quiet_console()
        _registered = True


class UserError(ValueError):
    """Something in the user's input (config, pool, files) that they can fix; the message says how."""

    def __init__(self, message: str):
        super().__init__(message)
        remember(message)


class ReportedExit(SystemExit):
    """Ends the process with ``code`` and ``message`` as its last line (``prefix: message``), without
    a traceback: an expected end such as an interrupted run, not a failure to debug."""

    def __init__(self, code: int, message: str, prefix: str):
        super().__init__(code)
        self.message = message
        remember(message, prefix)


class PoolError(UserError):
    """A model pool this method cannot merge, with what to change."""
