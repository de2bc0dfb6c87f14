"""Checkpoints: resume continues bit-for-bit, restores onto another mesh, never exposes a
half-written step, and refuses a checkpoint that does not fit the model."""
import json
import shutil

import jax
import numpy as np
import pytest

from jaxlm.checkpoint import Checkpointer
from jaxlm.config import ConfigError
from jaxlm.train import run
from helpers import tiny_config


def losses(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    out = run(tiny_config(f"train.run_dir={d}", "mesh.data=4", "mesh.fsdp=2"))
    return d, losses(d), jax.device_get(out["state"]["params"])


def test_resume_equals_uninterrupted_run_exactly(uninterrupted, tmp_path, capsys):
    _, full, full_params = uninterrupted
    common = [f"train.run_dir={tmp_path}", "mesh.data=4", "mesh.fsdp=2"]
    run(tiny_config(*common, "train.steps=3"))            # "killed" after the step-3 save
    assert Checkpointer(tmp_path / "checkpoints", tiny_config().checkpoint).latest_step() == 3
    out = run(tiny_config(*common))                       # same command again, to step 6
    assert "resumed from step 3" in capsys.readouterr().out
    resumed = losses(tmp_path)
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # bitwise
    jax.tree.map(np.testing.assert_array_equal, full_params, jax.device_get(out["state"]["params"]))


def test_a_log_read_a_step_late_holds_its_own_step(uninterrupted, tmp_path):
    """jaxlm.train reads a log step's metrics once the next step is queued (the GPU never idles
    at a log), except where it evaluates. Evaluating at steps 2 and 4 reads those at once: the
    losses must be the uninterrupted run's, which read every step's a step late."""
    _, full, _ = uninterrupted
    run(tiny_config(f"train.run_dir={tmp_path}", "mesh.data=4", "mesh.fsdp=2",
                    "train.eval_every=2", "checkpoint.enabled=false"))
    assert losses(tmp_path) == full


def test_restore_onto_a_different_mesh(uninterrupted, tmp_path):
    _, full, _ = uninterrupted
    run(tiny_config(f"train.run_dir={tmp_path}", "mesh.data=4", "mesh.fsdp=2", "train.steps=3"))
    out = run(tiny_config(f"train.run_dir={tmp_path}", "mesh.data=1", "mesh.fsdp=4",
                          "mesh.tensor=2"))
    wq = out["state"]["params"]["layers"]["attn"]["wq"]
    assert wq.sharding.spec[1:3] == ("fsdp", "tensor")
    resumed = losses(tmp_path)
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [full[s] for s in (4, 5, 6)],
                               rtol=1e-5)


def test_unfinished_save_is_invisible_and_resume_uses_last_complete(uninterrupted, tmp_path):
    src, _, _ = uninterrupted
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    # a crash mid-save leaves only orbax's temporary directory behind
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir()
    ck = Checkpointer(tmp_path / "checkpoints", tiny_config().checkpoint)
    assert ck.latest_step() == 6


def test_checkpoint_of_another_model_is_refused_clearly(uninterrupted, tmp_path):
    src, _, _ = uninterrupted
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(ConfigError, match=r"checkpoint .*6.*embed.* has shape \(300, 32\), but "
                                          r"this config expects \(300, 64\)"):
        run(tiny_config(f"train.run_dir={tmp_path}", "model.d_model=64", "train.steps=8"))


def test_keeps_only_the_last_k(uninterrupted):
    src, _, _ = uninterrupted
    steps = sorted(int(p.name) for p in (src / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    cfg = tiny_config(f"train.run_dir={src}", "checkpoint.keep=1", "train.steps=9")
    run(cfg)
    steps = sorted(int(p.name) for p in (src / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [9]
