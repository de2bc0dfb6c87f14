"""Run directories and configs: a run directory that cannot be written, or a resume whose config
changed in a way its checkpoints cannot follow, is one line and exit code 2, and a refused run
writes nothing (no directory, no log, never another run's config.yaml). Safe changes on resume
are reported and accepted. Cheap: these fail before JAX starts, except where noted."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from clirun import CLI, ROOT, one_error_line
from helpers import tiny_config
from jaxlm import rundir
from jaxlm.config import ConfigError, dump_yaml
from jaxlm.train import main


def cli(*args, prefix=()):
    p = subprocess.run([*prefix, sys.executable, "-m", "jaxlm.train", *CLI, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_run_dir_that_is_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a directory")
    code, out, err = cli(f"train.run_dir={f}")
    assert code == 2 and out == ""
    assert one_error_line(err) == f"error: train.run_dir={f}: it is a file, not a directory"
    assert f.read_text() == "not a directory"


def test_run_dir_under_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    code, _, err = cli(f"train.run_dir={f}/runs/a")
    assert code == 2
    assert one_error_line(err) == (f"error: train.run_dir={f}/runs/a: {f} is a file, not a "
                                   f"directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_read_only_run_dir(tmp_path):
    """A read-only mount (as root, in a private mount namespace) or a directory without write
    permission (otherwise): refused before anything is created."""
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("root without unshare: no way to make a directory read-only for root")
        prefix = ("unshare", "-m", "sh", "-c",
                  'mount -t tmpfs -o ro,size=64k tmpfs "$0" && exec "$@"', str(parent))
        reason = "Read-only file system"
    else:
        os.chmod(parent, 0o555)
        prefix, reason = (), "Permission denied"
    code, _, err = cli(f"train.run_dir={parent}/run", prefix=prefix)
    os.chmod(parent, 0o755)
    assert code == 2
    assert one_error_line(err) == (f"error: train.run_dir={parent}/run: cannot write in "
                                   f"{parent}: {reason}")
    assert list(parent.iterdir()) == []


def _saved_run(tmp_path, *overrides):
    """A run directory as a run leaves it: config.yaml and a checkpoint step directory (only its
    existence matters to the config check)."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "3").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(tiny_config(f"train.run_dir={run_dir}",
                                                               *overrides)))
    return run_dir


def test_resume_with_changed_model_or_data_is_refused_and_leaves_the_run_alone(tmp_path):
    run_dir = _saved_run(tmp_path)
    before = {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")}
    code, out, err = cli(f"train.run_dir={run_dir}", "model.d_model=64", "train.seed=3",
                         "train.steps=9")  # steps may change; the other two may not
    assert code == 2 and out == ""
    assert one_error_line(err) == (
        f"error: {run_dir}/config.yaml: resuming with a different config: model.d_model (32 -> "
        f"64), train.seed (0 -> 3); these cannot change on resume (use another train.run_dir, "
        f"or the saved values; to change them deliberately, edit config.yaml in the run "
        f"directory)")
    after = {p: p.read_bytes() if p.is_file() else None for p in run_dir.rglob("*")}
    assert after == before  # config.yaml not overwritten, no log line, nothing new


def test_safe_changes_on_resume_are_reported_and_accepted(tmp_path):
    run_dir = _saved_run(tmp_path)
    cfg = tiny_config(f"train.run_dir={run_dir}", "train.steps=9", "optim.lr=0.02",
                      "log.every_steps=5", "checkpoint.every_steps=2", "mesh.data=2",
                      "mesh.fsdp=4", "model.remat=full", "train.on_nonfinite=skip")
    assert rundir.check(cfg) == [
        "model.remat: 'none' -> 'full'", "mesh.data: -1 -> 2", "mesh.fsdp: 1 -> 4",
        "optim.lr: 0.01 -> 0.02", "train.steps: 6 -> 9", "train.on_nonfinite: 'stop' -> 'skip'",
        "checkpoint.every_steps: 3 -> 2", "log.every_steps: 1 -> 5"]


def test_keys_newer_than_the_saved_config_compare_with_their_defaults(tmp_path):
    """A run saved before a key existed (here train.microbatches, taken out of its config.yaml)
    resumes as if it had the key's default."""
    run_dir = _saved_run(tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["train"]["microbatches"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert rundir.check(tiny_config(f"train.run_dir={run_dir}")) == []
    with pytest.raises(ConfigError, match=r"model.vocab_size \(300 -> 512\)"):
        rundir.check(tiny_config(f"train.run_dir={run_dir}", "model.vocab_size=512"))


def test_no_checkpoint_no_resume_check(tmp_path):
    """Without a checkpoint nothing is resumed: a new config simply starts the run over."""
    run_dir = _saved_run(tmp_path)
    shutil.rmtree(run_dir / "checkpoints")
    assert rundir.check(tiny_config(f"train.run_dir={run_dir}", "model.d_model=64")) == []


def test_a_run_refused_after_jax_started_writes_nothing(tmp_path, capsys):
    """kv heads (2) that do not divide mesh.tensor=4 fail while building the model's shardings:
    still before the run directory, its config.yaml or its log exist."""
    run_dir = tmp_path / "run"
    assert main([*CLI, f"train.run_dir={run_dir}", "mesh.data=2", "mesh.tensor=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: parameter layers.attn.wk") and err.count("\n") == 1
    assert not run_dir.exists()
