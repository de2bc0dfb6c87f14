"""Preemption: SIGTERM or SIGINT ends the run at a step boundary, with a checkpoint, on every
process at the same step.

One process: a thread notes the signal (see `Preemption.__enter__`); the loop asks
`reached(step)` after each step (a Python attribute read, no device sync), then saves, waits for
the commit and exits with EXIT_PREEMPTED. Many processes receive signals independently, so they
must agree on the step: JAX's preemption sync manager (started by jax.distributed) catches
SIGTERM on any process, tells the others through the coordination service, and
`reached_preemption_sync_point(step)` turns true at the same step everywhere (one past the
furthest step any process had reached). SIGINT (Ctrl-C) is turned into SIGTERM so it takes the
same path. A second signal exits at once (128 + signal number), even while the main thread waits
inside a step or the save: the previous checkpoint stays complete, as orbax only renames a
finished step directory into place.
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
        self._previous_wakeup_fd = -1
        self._pipe: tuple[int, int] | None = None  # (read, write) ends of the wakeup pipe
        self._watcher: threading.Thread | None = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals reach only the main thread (e.g. run() called from a thread)
        # Python runs a handler only when the main thread is between two bytecodes, and runs it
        # once for any number of signals that arrived while it was inside one C call (a step, a
        # device_get, a checkpoint wait): a quick second Ctrl-C would be lost. So every delivery
        # is counted from the wakeup pipe (one byte per signal, written by the C-level handler)
        # by a thread that blocks on it with the GIL released.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        # JAX's own SIGTERM handler serves a multi-process run; leave it in place there
        signums = (signal.SIGINT,) if self.multi_process else (signal.SIGTERM, signal.SIGINT)
        for s in signums:
            self._previous[s] = signal.signal(s, _counted_by_the_watcher)
        self._watcher = threading.Thread(target=self._watch, name="jaxlm-preemption",
                                         daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        if self._pipe is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._pipe[1])  # the watcher reads what is left, then end of file
            self._watcher.join(timeout=5)
            os.close(self._pipe[0])
        self._previous.clear()
        self._pipe = self._watcher = None

    def _watch(self):
        read_fd = self._pipe[0]
        while chunk := os.read(read_fd, 64):
            for signum in chunk:
                if signum in self._previous:  # the pipe carries every Python-handled signal
                    self._on_signal(signum)

    def _on_signal(self, signum: int):
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\nsecond signal ({name}): exiting now, without waiting for the "
                        f"checkpoint in progress; the previous one is intact\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"\n{name}: stopping after the step in flight (and its checkpoint, if "
                    f"checkpoints are on); send it again to exit at once\n".encode())
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


def _counted_by_the_watcher(signum, frame):
    """A Python handler must be installed for the wakeup pipe to be written; the count and the
    reaction are the watcher thread's."""
