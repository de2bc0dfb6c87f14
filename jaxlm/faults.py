"""How a run that hits a fault ends: documented exit codes and one line, not a traceback.

A fault the run can name (preemption, a non-finite step, a checkpoint or log that cannot be
written) raises `RunStopped` at a safe point; `python -m jaxlm.train` prints its one line and exits
with its code. Library noise that would bury that line (tracebacks orbax logs or tensorstore
prints from background threads after the failure we already report) goes to the process log only.
"""
from __future__ import annotations

import logging
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2      # config, files, run directory, mismatched checkpoint: nothing was written
EXIT_NONFINITE = 3      # train.on_nonfinite stopped the run; the last checkpoint stays the latest
EXIT_WRITE_FAILED = 4   # a checkpoint or log could not be written (disk full, permission, I/O)
EXIT_PREEMPTED = 75     # SIGTERM/SIGINT: checkpoint saved; run the same command to resume
# a second signal during the preemption save: 128 + signal number (130 SIGINT, 143 SIGTERM)

log = logging.getLogger("jaxlm")


class RunStopped(Exception):
    """The run stopped at a safe point; str(e) is the line to print, e.code the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def cause(exc: BaseException) -> str | None:
    """The OS reason behind an I/O error, however deep orbax/tensorstore wrapped it."""
    import os
    import re
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return f"{os.strerror(exc.errno)} (errno {exc.errno})"
        m = re.search(r"os_error_code='?(\d+)", str(exc))
        if m:
            return f"{os.strerror(int(m.group(1)))} (errno {m.group(1)})"
        exc = exc.__cause__ or exc.__context__
    return None


def first_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _is_library_noise(unraisable) -> bool:
    """Echoes of a checkpoint read or write that failed (reported by jaxlm in one line):
    tensorstore completing I/O after orbax closed the asyncio loop awaiting it ("Event loop is
    closed"), and orbax's abandoned I/O coroutines being collected."""
    exc, obj = unraisable.exc_value, unraisable.object
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
        return True
    code = getattr(obj, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


def quiet_library_noise():
    """Send those echoes to the process log instead of the console (idempotent)."""
    if getattr(sys.unraisablehook, "_jaxlm", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if _is_library_noise(unraisable):
            log.debug("after a failed checkpoint operation: %s", unraisable.exc_value)
            return
        previous(unraisable)

    hook._jaxlm = True
    sys.unraisablehook = hook


def console_filter(record: logging.LogRecord) -> bool:
    """For the console handler: orbax's own error reports (with their tracebacks), and asyncio's
    "Task/Future exception was never retrieved" for orbax write tasks, or their thread-pool file
    writes failing with an OSError, abandoned after a failed save (logged whenever the garbage
    collector gets to them), stay in the process log; jaxlm reports the failure itself in one
    line."""
    if record.name == "absl" and record.levelno >= logging.ERROR:
        return False
    if record.name != "asyncio":
        return True
    message = record.getMessage()
    exc = record.exc_info[1] if record.exc_info else None
    return not ("orbax" in message or ("never retrieved" in message
                                       and isinstance(exc, OSError)))
