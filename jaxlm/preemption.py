"""Preemption: SIGTERM or SIGINT ends the run at a step boundary, with a checkpoint, on every
process at the same step.

One process: a handler notes the signal; the loop asks `reached(step)` after each step (a
Python attribute read, no device sync), then saves, waits for the commit and exits with
EXIT_PREEMPTED. Many processes receive signals independently, so they must agree on the step:
JAX's preemption sync manager (started by jax.distributed) catches SIGTERM on any process,
tells the others through the coordination service, and `reached_preemption_sync_point(step)`
turns true at the same step everywhere (one past the furthest step any process had reached).
SIGINT (Ctrl-C) is turned into SIGTERM so it takes the same path. A second signal exits at once
(128 + signal number) without waiting for the save: the previous checkpoint stays complete, as
orbax only renames a finished step directory into place.
"""
from __future__ import annotations

import os
import signal
import threading

from jaxlm.faults import EXIT_PREEMPTED, RunStopped, log


class Preemption:
    def __init__(self, multi_process: bool):
        self.multi_process = multi_process
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread (e.g. run() called from a thread)
        # JAX's own SIGTERM handler serves a multi-process run; leave it in place there
        signums = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
        for s in signums:
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame):
        # runs between two bytecodes of the main thread: only set state (no buffered I/O)
        if self.signum is not None:
            os.write(2, f"\nsecond signal ({signal.Signals(signum).name}): exiting now, without "
                        f"waiting for the checkpoint in progress; the previous one is intact\n"
                     .encode())
            os._exit(128 + signum)
        self.signum = signum
        if self.multi_process:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's handler: every process is told

    def start(self, step: int):
        """Register the step the loop starts from (JAX's sync point counts from it)."""
        self.reached(step)

    def reached(self, step: int) -> bool:
        """True when the run should save and stop after `step` (the same step on every
        process)."""
        if not self.multi_process:
            return self.signum is not None
        from jax.experimental import multihost_utils
        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError as e:  # the preemption service is off (jax_enable_preemption_service)
            if not getattr(self, "_warned", False):  # then SIGTERM ends the process unsaved
                log.warning("preemption: %s", e)
                self._warned = True
            return False

    def stop(self, step: int, ckpt):
        """After the preemption save of `step` was started: wait for it to commit, then stop."""
        if ckpt is None:
            raise RunStopped(f"preempted by {self._what()} after step {step}; checkpoints are "
                             f"off (checkpoint.enabled=false), nothing was saved", EXIT_PREEMPTED)
        ckpt.wait()
        raise RunStopped(f"preempted by {self._what()}: checkpoint of step {step} saved to "
                         f"{ckpt.step_dir(step)}; run the same command to resume", EXIT_PREEMPTED)

    def _what(self) -> str:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return "a preemption notice (SIGTERM to one of the processes)"
