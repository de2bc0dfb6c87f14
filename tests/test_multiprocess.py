"""The multi-process code path on one machine: launch/local.sh starts processes that join through
jax.distributed on 127.0.0.1, each with 4 simulated CPU devices. 2 x 4 trains like 1 x 8,
checkpoints move between the two layouts, a dead process stops the other within the heartbeat
timeout and a relaunch resumes, and a run that cannot assemble ends in one line, not a hang."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm.train import run
from helpers import TINY, tiny_config
from xla_flags import COMPILE

ROOT = Path(__file__).resolve().parents[1]
# the batch splits over both processes' devices; a constant schedule does not depend on
# train.steps, so every 2-process launch here compiles the same step (one shared XLA cache)
COMMON = ["mesh.data=4", "mesh.fsdp=2", "optim.schedule=constant"]
LAUNCH_TIMEOUT_S = 240


def metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl in order (a run still writing may leave a partial last line)."""
    rows = []
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def local_sh(num_processes, devices, *overrides, grace_s=60, output: Path | None = None):
    """Start launch/local.sh in its own process group (so a timeout can stop every process)."""
    env = {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": COMPILE,
           "JAXLM_LOCAL_GRACE_S": str(grace_s)}
    out = open(output, "w") if output else subprocess.PIPE
    return subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh"), str(num_processes),
                             str(devices), *overrides], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc, timeout=LAUNCH_TIMEOUT_S) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch/local.sh ran past {timeout} s:\n{(out or '')[-3000:]}")
    return out or ""


def launch(*overrides) -> str:
    proc = local_sh(2, 4, *overrides)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """Shared by the 2-process launches: later ones skip most compilation."""
    return f"runtime.compilation_cache={tmp_path_factory.mktemp('xla_cache')}"


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
    """The reference: one process, 8 devices, same mesh (in this pytest process)."""
    d = tmp_path_factory.mktemp("1x8")
    run(tiny_config(f"train.run_dir={d}", *COMMON))
    return d, losses(d)


def p0_said(out: str, text: str) -> bool:
    """Whether process 0 printed `text` on one line. Gloo writes its "[Gloo] Rank N is
    connected" lines in pieces on the same stream, so one of them can start the line that
    our (single, atomic) write finishes: look inside the line, not at its start."""
    return any(line.startswith("[p0] ") and text in line for line in out.splitlines())


@pytest.fixture(scope="module")
def two_by_four(tmp_path_factory, xla_cache):
    d = tmp_path_factory.mktemp("2x4")
    out = launch(*TINY, *COMMON, f"train.run_dir={d}", xla_cache)
    return d, losses(d), out


def test_two_processes_train_like_one(one_by_eight, two_by_four):
    _, ref = one_by_eight
    d, got, out = two_by_four
    assert p0_said(out, "devices: 8 x cpu (cpu), 2 process(es); mesh data=4 x fsdp=2"), out
    # one writer (process 0): each step once
    assert [r["step"] for r in metrics(d) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # cross-process all-reduces (gloo) add in another order than one process does: ~1 ulp
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)],
                               rtol=1e-6)
    assert ref[6] < ref[1] - 0.5  # the losses move, so agreeing means something
    # only process 0 prints progress; every process keeps its own log with the same steps
    assert re.search(r"^\[p0\] step 6 \| loss", out, flags=re.M)
    assert not re.search(r"^\[p1\] (step|config|devices)", out, flags=re.M)
    for i in (0, 1):
        text = (d / "logs" / f"process_{i}.log").read_text()
        assert f"process {i} of 2: pid" in text and f"p{i} INFO jaxlm: step 6 | loss" in text
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["3", "6"]


def test_checkpoint_of_two_processes_resumes_in_one(one_by_eight, two_by_four, tmp_path, capsys):
    _, ref = one_by_eight
    src, _, _ = two_by_four
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    run(tiny_config(f"train.run_dir={tmp_path}", *COMMON))
    assert "resumed from step 3" in capsys.readouterr().out
    got = losses(tmp_path)
    assert sorted(got) == [4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)],
                               rtol=1e-6)


def test_checkpoint_of_one_process_resumes_in_two(one_by_eight, xla_cache, tmp_path):
    src, ref = one_by_eight
    shutil.copytree(src / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    out = launch(*TINY, *COMMON, f"train.run_dir={tmp_path}", xla_cache,
                 "checkpoint.async_save=true")  # and the final save, asynchronous, by both
    assert p0_said(out, "resumed from step 3"), out[-4000:]
    got = losses(tmp_path)
    assert sorted(got) == [4, 5, 6]
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)],
                               rtol=1e-6)
    assert (tmp_path / "checkpoints" / "6").is_dir()


def test_a_dead_process_stops_the_other_and_a_relaunch_resumes(xla_cache, tmp_path):
    heartbeat_s = 5
    args = [*TINY, *COMMON, f"train.run_dir={tmp_path}", xla_cache, "checkpoint.every_steps=5",
            f"distributed.heartbeat_timeout_s={heartbeat_s}",
            "distributed.shutdown_timeout_s=5"]
    console = tmp_path / "console.txt"
    # local.sh would stop the survivor itself after grace_s: make that too late to matter
    proc = local_sh(2, 4, *args, "train.steps=100000", grace_s=600, output=console)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not ((tmp_path / "checkpoints" / "5").is_dir() and 7 in losses(tmp_path)):
            assert proc.poll() is None, console.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint at step 5 in time"
            time.sleep(0.05)
        log1 = (tmp_path / "logs" / "process_1.log").read_text()
        pid = int(re.search(r"process 1 of 2: pid (\d+)", log1).group(1))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=heartbeat_s + 55)
        survived_s = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = console.read_text()
    assert "local.sh: process 1 exited with status 137" in out  # SIGKILL
    status0 = int(re.search(r"local.sh: process 0 exited with status (\d+)", out).group(1))
    assert status0 != 0 and "killing them" not in out  # it stopped by itself...
    assert survived_s < heartbeat_s + 25, survived_s   # ...within the heartbeat timeout
    assert proc.returncode != 0

    first = losses(tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 5, steps
    out = launch(*args, "train.steps=7")
    assert p0_said(out, "resumed from step 5"), out[-4000:]
    rows = metrics(tmp_path)
    start = max(i for i, r in enumerate(rows) if "compile_time_s" in r)  # the relaunch's rows
    again = {r["step"]: r["loss"] for r in rows[start:] if "loss" in r}
    assert sorted(again) == [6, 7]
    assert again == {6: first[6], 7: first[7]}  # same layout, same batches: bit for bit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_run_that_cannot_assemble_fails_in_one_line(tmp_path):
    """Process 1 alone (nothing at the coordinator), process 0 alone (no peers), a busy port, and
    JAX's own detection with no cluster around: each ends within the init timeout with exit code
    2 and one `error:` line, not a hang or a C++ abort."""
    busy = socket.create_server(("", 0))
    cases = {"no coordinator": (1, _free_port()), "no peers": (0, _free_port()),
             "busy port": (0, busy.getsockname()[1]), "no cluster": (None, None)}
    # no scheduler variables from wherever CI itself runs
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "OMPI_", "JAXLM_", "TPU_", "KUBERNETES_"))}
    started = time.monotonic()
    procs = {}
    for name, (process_id, port) in cases.items():
        env = {**clean, "XLA_FLAGS": COMPILE}
        extra = ["distributed.detect=jax"]
        if port is not None:
            env.update(JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES="2",
                       JAXLM_PROCESS_ID=str(process_id))
            extra = []
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "jaxlm.train", *TINY, f"train.run_dir={tmp_path / name}",
             "distributed.init_timeout_s=3", *extra], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    results = {}
    try:
        for name, p in procs.items():
            results[name] = (p.wait(timeout=60), p.stderr.read())
    finally:
        busy.close()
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert time.monotonic() - started < 45
    expected = {
        "no coordinator": r"error: distributed: process 1 of 2 did not join the run within 3 s "
                          r"\(distributed.init_timeout_s\): cannot reach the coordinator at "
                          r"127.0.0.1:\d+ \(from JAXLM_COORDINATOR: Connection refused\); is "
                          r"process 0 running, and is that its address\?",
        "no peers": r"error: distributed: process 0 of 2 did not join the run within 3 s "
                    r"\(distributed.init_timeout_s\): the coordinator at 127.0.0.1:\d+ is up, "
                    r"but not all 2 processes joined",
        "busy port": r"error: distributed: process 0 cannot serve the coordinator on port \d+ "
                     r"\(from JAXLM_COORDINATOR\): Address already in use",
        "no cluster": r"error: distributed: this process could not join the run at the "
                      r"coordinator JAX detects \(from JAX\): .*; JAX's detection found no "
                      r"cluster to fill the rest \(distributed.detect=jax\)$",
    }
    for name, (code, stderr) in results.items():
        assert code == 2, (name, stderr[-2000:])
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and re.match(expected[name], errors[0]), (name, stderr[-2000:])
        assert "Check failure stack trace" not in stderr, (name, stderr[-2000:])
        assert not (tmp_path / name).exists()  # refused before the run directory is made


CRASH_ON_PROCESS_1 = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxlm.config import DistributedConfig
from jaxlm.distributed import initialize, log_to_file
jax.config.update("jax_num_cpu_devices", 2)
initialize(DistributedConfig(heartbeat_timeout_s=5, shutdown_timeout_s=120))
log_to_file(sys.argv[1])
mesh = Mesh(np.array(jax.devices()), ("d",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.ones(2, np.float32))
total = jax.jit(jnp.sum)
for i in range(100000):
    total(x).block_until_ready()
    if i == 20 and jax.process_index() == 1:
        raise RuntimeError("injected failure on process 1")
"""


def test_an_exception_on_one_process_stops_all_without_waiting_for_shutdown(tmp_path):
    """A Python error on one process exits it at once (its traceback in its log) instead of
    waiting out the shutdown barrier (120 s here); the other stops within the heartbeat."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-c", CRASH_ON_PROCESS_1, str(tmp_path)], cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": COMPILE, "JAXLM_COORDINATOR": f"127.0.0.1:{port}",
             "JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": str(i)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for i in (0, 1)]
    started = time.monotonic()
    try:
        codes = [p.wait(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert time.monotonic() - started < 60
    assert codes[1] == 1 and codes[0] != 0, codes
    log1 = (tmp_path / "logs" / "process_1.log").read_text()
    assert "ERROR jaxlm: uncaught exception" in log1
    assert "RuntimeError: injected failure on process 1" in log1


def test_sigterm_to_one_process_checkpoints_the_same_step_on_every_process(xla_cache, tmp_path):
    """A scheduler signals processes independently: SIGTERM to process 1 alone makes both save one
    checkpoint at the same step (JAX's preemption sync point) and exit 75; it restores in one
    process."""
    args = [*TINY, *COMMON, f"train.run_dir={tmp_path}", xla_cache, "train.steps=100000",
            "checkpoint.every_steps=100000"]
    console = tmp_path / "console.txt"
    proc = local_sh(2, 4, *args, grace_s=600, output=console)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while 3 not in losses(tmp_path):
            assert proc.poll() is None, console.read_text()[-4000:]
            assert time.monotonic() < deadline, "no step 3 in time"
            time.sleep(0.05)
        log1 = (tmp_path / "logs" / "process_1.log").read_text()
        os.kill(int(re.search(r"process 1 of 2: pid (\d+)", log1).group(1)), signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = console.read_text()
    assert proc.returncode == 75, out[-4000:]
    for i in (0, 1):
        assert f"local.sh: process {i} exited with status 75" in out
    saved = {int(s) for s in re.findall(r"^\[p[01]\] preempted by a preemption notice \(SIGTERM "
                                        r"to one of the processes\): checkpoint of step (\d+) "
                                        r"saved to ", out, flags=re.M)}
    assert len(saved) == 1, out[-4000:]
    (step,) = saved
    assert step > 3 and max(losses(tmp_path)) == step
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(step)]
    from helpers import mesh_for
    from jaxlm.checkpoint import Checkpointer
    from jaxlm.step import build_step_fns
    cfg = tiny_config(*COMMON)
    restored = Checkpointer(tmp_path / "checkpoints", cfg.checkpoint).restore_latest(
        build_step_fns(cfg, mesh_for(cfg)).abstract_state, print)
    assert restored[0] == step and int(restored[1]["step"]) == step


def test_two_processes_load_hf_weights_each_reading_its_own_rows(xla_cache, tmp_path):
    """model.init_from across 2 processes: each process copies only its devices' rows of every
    tensor, and the assembled model is the HF one exactly (a step at lr 0 later, exported by
    one process, bit for bit)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    from jaxlm.convert import export_run
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    hf.save_pretrained(str(tmp_path / "hf"))
    run_dir = tmp_path / "run"
    out = launch(*[o for o in TINY if not o.startswith("model.")], *COMMON, xla_cache,
                 f"model.init_from={tmp_path / 'hf'}", f"train.run_dir={run_dir}",
                 "train.steps=1", "optim.lr=0")
    assert p0_said(out, f"initialised from {tmp_path / 'hf'}"), out[-3000:]
    export_run(str(run_dir), str(tmp_path / "out"))
    a = load_file(str(tmp_path / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
