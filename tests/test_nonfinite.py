"""Non-finite steps, made real by the documented fault-injection hook (JAXLM_FAULT_NONFINITE
poisons one batch's loss mask, so the loss, gradients and optimizer see it): the step flags them
on device; `skip` keeps the parameters and optimizer state bit for bit and stops after
train.max_skipped_steps in a row; `stop` ends the run in one line, exit code 3, before any
non-finite state reaches a checkpoint."""
import jax
import numpy as np

from clirun import losses, one_error_line, records, steps_on_disk, train
from helpers import mesh_for, packed_batches, tiny_config
from jaxlm import nonfinite
from jaxlm.step import build_step_fns


def test_skip_keeps_params_and_optimizer_state_and_flags_what_was_not_finite(monkeypatch):
    cfg = tiny_config("train.on_nonfinite=skip")
    fns = build_step_fns(cfg, mesh_for(cfg))
    monkeypatch.setenv(nonfinite.INJECT_ENV, "2,3:inf")
    batches = [nonfinite.inject(b, i + 1) for i, b in enumerate(packed_batches(cfg, 4))]
    put = lambda b: jax.device_put(b, fns.batch_sharding)  # noqa: E731
    state = fns.init(0)
    history, flags = [], []
    for b in batches:
        history.append(jax.device_get(state))  # the state is donated to the step
        state, m = fns.train_step(state, put(b))
        flags.append(int(m["nonfinite"]))
    history.append(jax.device_get(state))
    assert flags == [0, nonfinite.LOSS | nonfinite.GRADIENTS | nonfinite.UPDATE,
                     nonfinite.LOSS, 0]  # NaN mask: all three; one inf-weighted token: the loss
    same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
    for skipped in (2, 3):  # steps 2 and 3 changed nothing but the step counter and rng
        before, after = history[skipped - 1], history[skipped]
        same(before["params"], after["params"])
        same(before["opt_state"], after["opt_state"])
        assert after["step"] == before["step"] + 1
    assert not np.array_equal(history[4]["params"]["embed"], history[3]["params"]["embed"])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(history[4]["params"]))


def test_stop_ends_the_run_and_keeps_the_last_good_checkpoint(tmp_path, xla_cache_dir):
    code, out, err = train(tmp_path, xla_cache_dir, "train.steps=9",
                           env={nonfinite.INJECT_ENV: "5"})
    assert code == 3
    assert one_error_line(err) == (
        "error: non-finite loss, gradients and updated parameters at step 5 "
        "(train.on_nonfinite=stop); the run stopped before saving anything later, so the latest "
        "checkpoint holds the last good state")
    assert steps_on_disk(tmp_path) == [3]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]  # the bad step is not logged as a result


def test_skip_goes_on_counts_and_stops_after_max_skipped_in_a_row(tmp_path, xla_cache_dir):
    code, out, err = train(tmp_path, xla_cache_dir, "train.steps=12", "train.on_nonfinite=skip",
                           "train.max_skipped_steps=2", env={nonfinite.INJECT_ENV: "5:inf,7,8"})
    assert code == 3
    said = [line for line in out.splitlines() if "step skipped" in line]
    assert said == [
        "step 5: non-finite loss; step skipped, parameters and optimizer state unchanged (1 in a "
        "row, 1 in total)",
        "step 7: non-finite loss, gradients and updated parameters; step skipped, parameters and "
        "optimizer state unchanged (1 in a row, 2 in total)",
        "step 8: non-finite loss, gradients and updated parameters; step skipped, parameters and "
        "optimizer state unchanged (2 in a row, 3 in total)"]
    assert one_error_line(err) == (
        "error: 2 non-finite steps in a row, the last at step 8 (loss, gradients and updated "
        "parameters; train.max_skipped_steps=2); the run stopped, and its checkpoints hold only "
        "finite states")
    assert steps_on_disk(tmp_path) == [3, 6]  # step 6 went on from the state before step 5
    skipped = {r["step"]: r["skipped_steps"] for r in records(tmp_path) if "skipped_steps" in r}
    assert skipped == {5: 1, 6: 1, 7: 2}
    assert np.isfinite(losses(tmp_path)[6])


def test_update_alone_is_flagged_not_skipped_and_stops_a_skipping_run():
    """The skip is decided by the loss and gradients (known before the optimizer, so the select
    fuses into the update); parameters the optimizer itself made non-finite are flagged, kept,
    and end the run under either policy."""
    import jax.numpy as jnp
    import pytest
    from jaxlm.faults import RunStopped
    old = {"params": {"w": jnp.ones(3)}, "opt_state": {"m": jnp.zeros(3)}, "step": 1, "rng": 0}
    new = {"params": {"w": jnp.array([1.0, jnp.inf, 2.0])}, "opt_state": {"m": jnp.ones(3)},
           "step": 2, "rng": 0}
    finite = jnp.float32(0.5)
    state, flag = nonfinite.guard(old, new, finite, finite, skip=True)
    assert int(flag) == nonfinite.UPDATE
    np.testing.assert_array_equal(state["params"]["w"], new["params"]["w"])  # not undone
    state, flag = nonfinite.guard(old, new, finite, jnp.float32(np.nan), skip=True)
    assert int(flag) == nonfinite.GRADIENTS | nonfinite.UPDATE
    np.testing.assert_array_equal(state["params"]["w"], old["params"]["w"])  # undone
    np.testing.assert_array_equal(state["opt_state"]["m"], old["opt_state"]["m"])

    said = []
    monitor = nonfinite.Monitor("skip", 10, said.append, eager=False)
    monitor.record(4, jnp.int32(nonfinite.LOSS))
    monitor.record(7, jnp.int32(nonfinite.UPDATE))
    with pytest.raises(RunStopped, match="non-finite updated parameters at step 7 from a finite "
                                         "loss and finite gradients: the optimizer overflowed"):
        monitor.check()
    assert said == ["step 4: non-finite loss; step skipped, parameters and optimizer state "
                    "unchanged (1 in a row, 1 in total)"]
