"""Non-finite steps: found on device every step, acted on by the host without a new sync.

`guard` runs inside the jitted train step: it returns a small int flag (which of loss,
gradients, updated parameters is not finite) and, with `train.on_nonfinite=skip`, selects the
previous parameters and optimizer state on device (one `jnp.where` per leaf), so the step stays
one dispatch. The skip is decided by the loss and the gradient norm alone: both are known before
the optimizer runs, so XLA fuses the select into the update itself. Deciding it by the updated
parameters too made it a second pass over parameters and optimizer state after a reduction over
all of them (H200, 1B preset: 186.6 against 182.8 ms a step). Updated parameters that are not
finite although the loss and gradients are (the optimizer itself overflowed) are still flagged,
and stop the run under either policy, since that step was not undone. `Monitor` reads the flags
on the host only when they are already there (single process), or at points where the loop syncs
anyway (log steps, and before every checkpoint, so a non-finite state never reaches a
checkpoint). `inject` is the documented fault-injection hook that makes a real step non-finite
for tests and drills.
"""
from __future__ import annotations

import collections
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.faults import EXIT_NONFINITE, RunStopped

LOSS, GRADIENTS, UPDATE = 1, 2, 4  # bits of the flag
_NAMES = ((LOSS, "loss"), (GRADIENTS, "gradients"), (UPDATE, "updated parameters"))
INJECT_ENV = "JAXLM_FAULT_NONFINITE"


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def guard(old_state: dict, new_state: dict, loss, grad_norm, skip: bool):
    """(state, flag) for one train step. flag: 0 if the loss, every gradient and every updated
    parameter are finite, else LOSS | GRADIENTS | UPDATE bits. The gradients are judged by their
    global norm, which the step computes anyway (it is non-finite iff some gradient is, or their
    squares overflow). With `skip`, a step whose loss or gradients are not finite keeps
    old_state's params, opt_state and model_state (step and rng still advance, so the data moves
    on); an UPDATE flag alone is not undone (see the module docstring)."""
    loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    flag = (jnp.where(loss_ok, 0, LOSS) + jnp.where(grads_ok, 0, GRADIENTS)
            + jnp.where(_all_finite(new_state["params"]), 0, UPDATE)).astype(jnp.int32)
    if skip:
        bad = jnp.logical_not(loss_ok & grads_ok)
        keep = lambda old, new: jnp.where(bad, old, new)  # noqa: E731
        new_state = {k: v if k in ("step", "rng") else jax.tree.map(keep, old_state[k], v)
                     for k, v in new_state.items()}
    return new_state, flag


def describe(flag: int) -> str:
    """'loss', 'loss and gradients', 'loss, gradients and updated parameters'."""
    names = [name for bit, name in _NAMES if flag & bit]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


class Monitor:
    """Applies train.on_nonfinite to the flags of past steps, in step order.

    `record` keeps each step's flag; with `eager` (one process) it also reads those the device
    has already finished, which costs no sync. `check` reads all of them (or those up to a
    step), blocking: call it where the loop syncs anyway. A multi-process run reads only in
    `check`, at the same steps on every process, so all of them stop at the same step."""

    def __init__(self, policy: str, max_skipped: int, say, eager: bool):
        self.policy, self.max_skipped, self.say, self.eager = policy, max_skipped, say, eager
        self.skipped = 0        # in total
        self.in_a_row = 0
        self._flags = collections.deque()

    def record(self, step: int, flag):
        self._flags.append((step, flag))
        if self.eager:
            self._read(block=False)

    def check(self, upto: int | None = None):
        """Reads every recorded flag, or those of steps up to `upto`, blocking."""
        self._read(block=True, upto=upto)

    def _read(self, block: bool, upto: int | None = None):
        while self._flags and (upto is None or self._flags[0][0] <= upto) and (
                block or self._flags[0][1].is_ready()):
            step, flag = self._flags.popleft()
            value = int(np.asarray(flag))
            if not value:
                self.in_a_row = 0
                continue
            what = describe(value)
            if value == UPDATE:  # finite loss and gradients: the step was kept, not skipped
                raise RunStopped(
                    f"non-finite updated parameters at step {step} from a finite loss and "
                    f"finite gradients: the optimizer overflowed (is optim.lr sane?), which "
                    f"train.on_nonfinite cannot undo; the run stopped before saving anything "
                    f"later, so the latest checkpoint holds the last good state", EXIT_NONFINITE)
            if self.policy == "stop":
                raise RunStopped(
                    f"non-finite {what} at step {step} (train.on_nonfinite=stop); the run "
                    f"stopped before saving anything later, so the latest checkpoint holds the "
                    f"last good state", EXIT_NONFINITE)
            self.skipped += 1
            self.in_a_row += 1
            self.say(f"step {step}: non-finite {what}; step skipped, parameters and optimizer "
                     f"state unchanged ({self.in_a_row} in a row, {self.skipped} in total)")
            if self.in_a_row >= self.max_skipped:
                raise RunStopped(
                    f"{self.in_a_row} non-finite steps in a row, the last at step {step} "
                    f"({what}; train.max_skipped_steps={self.max_skipped}); the run stopped, and "
                    f"its checkpoints hold only finite states", EXIT_NONFINITE)


def inject(batch: dict, step: int) -> dict:
    """Fault injection for tests and drills: JAXLM_FAULT_NONFINITE="5,9:inf" makes step 5's loss
    NaN (its loss mask times NaN: gradients NaN too) and step 9's loss inf (one token's mask weight
    3e38: the weighted NLL overflows while the gradients stay finite), through the real step,
    gradients and optimizer. Unset, as in every real run: the batch unchanged."""
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return batch
    for item in spec.split(","):
        at, _, kind = item.strip().partition(":")
        if at.strip() != str(step):
            continue
        mask = np.array(batch["loss_mask"], np.float32)
        if kind.strip() == "inf":
            if jax.process_index() == 0:  # one token in the whole global batch
                mask[0, 0] = 3e38
        else:
            mask *= np.float32(np.nan)
        return {**batch, "loss_mask": mask}
    return batch
