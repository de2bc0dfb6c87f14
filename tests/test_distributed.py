"""Who is the coordinator, how many processes, which one is this: the mapping from each
scheduler's environment (SLURM, Kubernetes Indexed Job, Cloud TPU, JAXLM_*) as a pure function,
and the launch files checked by parsing them and by running them against stub schedulers."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxlm.config import ConfigError, DistributedConfig, load_config
from jaxlm.distributed import Launch, first_slurm_host, initialize, resolve

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def cfg(**kw):
    return DistributedConfig(**kw)


def slurm_env(procid, tasks_per_node, nodes=2, nodelist="gpu[003-004]", job_id="123456",
              gpus="0,1,2,3,4,5,6,7"):
    """What `srun` exports to task `procid` of a step with `tasks_per_node` tasks on each node."""
    return {"SLURM_JOB_ID": job_id, "SLURM_STEP_NODELIST": nodelist,
            "SLURM_JOB_NODELIST": nodelist, "SLURM_NTASKS": str(nodes * tasks_per_node),
            "SLURM_STEP_NUM_TASKS": str(nodes * tasks_per_node),
            "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
            "SLURM_PROCID": str(procid), "SLURM_NODEID": str(procid // tasks_per_node),
            "SLURM_LOCALID": str(procid % tasks_per_node), "CUDA_VISIBLE_DEVICES": gpus}


# ---------------------------------------------------------------- single process

def test_no_settings_and_no_scheduler_is_one_process():
    assert resolve(cfg(), {}) is None
    assert resolve(cfg(), {"HOSTNAME": "laptop", "PATH": "/usr/bin"}) is None
    assert initialize(cfg(), env={}) is None  # touches nothing: no JAX call at all


def test_one_process_in_total_needs_no_initialisation():
    assert resolve(cfg(), {"JAXLM_COORDINATOR": "h:1", "JAXLM_NUM_PROCESSES": "1",
                           "JAXLM_PROCESS_ID": "0"}) is None
    assert resolve(cfg(), slurm_env(0, 1, nodes=1)) is None


# ---------------------------------------------------------------- explicit settings

def test_explicit_environment_variables():
    got = resolve(cfg(), {"JAXLM_COORDINATOR": "10.0.0.7:8476", "JAXLM_NUM_PROCESSES": "4",
                          "JAXLM_PROCESS_ID": "2"})
    assert got == Launch("10.0.0.7:8476", 4, 2, None, "explicit settings", "JAXLM_COORDINATOR")


def test_config_keys_win_over_environment_variables():
    env = {"JAXLM_COORDINATOR": "envhost:1", "JAXLM_NUM_PROCESSES": "8", "JAXLM_PROCESS_ID": "7"}
    got = resolve(cfg(coordinator="cfghost:2", process_id=1), env)
    assert (got.coordinator, got.num_processes, got.process_id) == ("cfghost:2", 8, 1)
    assert got.coordinator_from == "distributed.coordinator"


@pytest.mark.parametrize("settings, env, message", [
    ({}, {"JAXLM_PROCESS_ID": "1"},
     r"needs distributed.coordinator \(or JAXLM_COORDINATOR\) and distributed.num_processes "
     r"\(or JAXLM_NUM_PROCESSES\); only got process_id from JAXLM_PROCESS_ID"),
    ({"process_id": 2, "num_processes": 2, "coordinator": "h:1"}, {},
     r"distributed.process_id: process id 2 is not in \[0, 2\) \(2 processes, from "
     r"distributed.num_processes\)"),
    ({}, {"JAXLM_COORDINATOR": "node001", "JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "0"},
     r"JAXLM_COORDINATOR: 'node001' is not host:port"),
    ({}, {"JAXLM_COORDINATOR": "h:99999", "JAXLM_NUM_PROCESSES": "2", "JAXLM_PROCESS_ID": "0"},
     r"JAXLM_COORDINATOR: 'h:99999' is not host:port"),
    ({}, {"JAXLM_NUM_PROCESSES": "two"},
     r"environment variable JAXLM_NUM_PROCESSES='two': expected an integer"),
    ({"detect": "off", "coordinator": "h:1"}, {},
     r"distributed.detect=off, but distributed.coordinator is set"),
])
def test_incomplete_or_inconsistent_settings_name_the_key(settings, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve(cfg(**settings), env)


def test_bad_values_in_config_files_are_caught_by_the_loader():
    with pytest.raises(ConfigError, match=r"distributed.detect: 'sometimes' is not one of: "
                                          r"auto, jax, off"):
        load_config(None, ["distributed.detect=sometimes"])
    with pytest.raises(ConfigError, match=r"distributed.process_id: -2 is below the minimum -1"):
        load_config(None, ["distributed.process_id=-2"])


def test_detect_off_ignores_the_scheduler():
    assert resolve(cfg(detect="off"), slurm_env(3, 8)) is None


# ---------------------------------------------------------------- SLURM

@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("node001,gpu7", "node001"), ("node[001-004],gpu7", "node001"),
    ("gpu[12,14-16]", "gpu12"), ("rack[2-3]-n[07-09]", "rack2-n07"), ("a-b.c,d", "a-b.c"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_unreadable_slurm_nodelist_is_refused():
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST: cannot read a host name"):
        first_slurm_host("node[001-004")


def test_slurm_one_process_per_gpu():
    port = 123456 % 4096 + 61440  # per job, as jax.distributed derives it
    for procid in (0, 5, 11, 15):
        got = resolve(cfg(), slurm_env(procid, 8))
        assert got == Launch(f"gpu003:{port}", 16, procid, (procid % 8,), "SLURM",
                             "SLURM_STEP_NODELIST")


def test_slurm_one_process_per_node_uses_every_gpu():
    got = resolve(cfg(), slurm_env(1, 1, nodes=4, nodelist="a[1-4]"))
    assert (got.coordinator.split(":")[0], got.num_processes, got.process_id) == ("a1", 4, 1)
    assert got.local_device_ids is None


def test_slurm_tasks_already_bound_to_one_gpu_each():
    # --gpus-per-task=1: SLURM sets CUDA_VISIBLE_DEVICES per task; the one visible GPU is it
    assert resolve(cfg(), slurm_env(9, 8, gpus="1")).local_device_ids is None


def test_slurm_coordinator_port_and_address_overrides():
    assert resolve(cfg(coordinator_port=7000), slurm_env(3, 8)).coordinator == "gpu003:7000"
    got = resolve(cfg(), {**slurm_env(3, 8), "JAXLM_COORDINATOR": "10.1.2.3:5555"})
    assert (got.coordinator, got.coordinator_from, got.process_id) == ("10.1.2.3:5555",
                                                                      "JAXLM_COORDINATOR", 3)


def test_slurm_batch_script_itself_is_not_a_multi_process_step():
    env = slurm_env(0, 8)
    for key in ("SLURM_STEP_NODELIST", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE"):
        del env[key]  # only `srun` sets these; `python` run directly in the batch script is 1
    assert resolve(cfg(), env) is None


# ---------------------------------------------------------------- Kubernetes, TPU, JAX's own

def test_kubernetes_indexed_job():
    env = {"JOB_COMPLETION_INDEX": "3", "JAXLM_COORDINATOR": "jaxlm-0.jaxlm:1234",
           "JAXLM_NUM_PROCESSES": "4", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert resolve(cfg(), env) == Launch("jaxlm-0.jaxlm:1234", 4, 3, None,
                                         "Kubernetes Indexed Job", "JAXLM_COORDINATOR")
    with pytest.raises(ConfigError, match=r"JOB_COMPLETION_INDEX=3\), but num_processes is "
                                          r"unknown: set JAXLM_NUM_PROCESSES"):
        resolve(cfg(), {k: v for k, v in env.items() if k != "JAXLM_NUM_PROCESSES"})
    with pytest.raises(ConfigError, match=r"set JAXLM_COORDINATOR in the pod spec "
                                          r"\(<job-name>-0.<headless-service>:<port>\)"):
        resolve(cfg(), {k: v for k, v in env.items() if k != "JAXLM_COORDINATOR"})


def test_gke_tpu_slice_is_left_to_jax_detection():
    got = resolve(cfg(), {"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"})
    assert got.jax_detects and (got.coordinator, got.num_processes, got.process_id) == \
        (None, None, None)
    assert resolve(cfg(), {"TPU_WORKER_HOSTNAMES": "t-0", "TPU_WORKER_ID": "0"}) is None


def test_detect_jax_keeps_explicit_values_and_lets_jax_fill_the_rest():
    got = resolve(cfg(detect="jax", coordinator="h:1"), {})
    assert got.jax_detects and (got.coordinator, got.num_processes, got.process_id) == \
        ("h:1", None, None)


# ---------------------------------------------------------------- launch files

def _stub(directory: Path, name: str, body: str):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


PROBE = ("import json, os, sys; from jaxlm.config import load_config; "
         "from jaxlm.distributed import resolve; "
         "args = sys.argv[sys.argv.index('jaxlm.train') + 1:]; "
         "c = load_config(None, args); l = resolve(c.distributed, os.environ); "
         "print(json.dumps([l.coordinator, l.num_processes, l.process_id, l.local_device_ids, "
         "c.train.steps]))")


def test_slurm_sbatch_directives():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    assert {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "time"} <= set(directives)
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]  # one process per GPU
    assert directives["signal"] == "TERM@120"  # time to save a checkpoint before the limit
    assert re.search(r"^srun .*-m jaxlm\.train \"\$@\"$", text, flags=re.M)
    assert "NCCL_DEBUG" in text
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], check=True)


def test_slurm_sbatch_under_stub_scheduler_gives_every_task_its_rank(tmp_path):
    """Run the batch script with stub `scontrol`/`srun` that start 2 nodes x 8 tasks the way
    SLURM does; each task runs jaxlm's resolver instead of training and prints what it got."""
    _stub(tmp_path, "scontrol", 'echo gpu003; echo gpu004\n')
    _stub(tmp_path, "srun", """while [[ $1 == --* ]]; do shift; done
for node in 0 1; do for local in 0 1 2 3 4 5 6 7; do
  SLURM_PROCID=$((node * 8 + local)) SLURM_LOCALID=$local SLURM_NODEID=$node \\
  SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_TASKS=16 \\
  SLURM_STEP_TASKS_PER_NODE='8(x2)' CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 "$@"
done; done
""")
    _stub(tmp_path, "python-probe", f'exec {shlex.quote(sys.executable)} -c "$PROBE" "$@"\n')
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": str(tmp_path / "python-probe"),
           "PROBE": PROBE, "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[003-004]",
           "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(ROOT)}
    out = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "train.steps=7"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    port = 123456 % 4096 + 61440
    assert sorted(r[2] for r in rows) == list(range(16))
    for coordinator, n, rank, local_ids, steps in rows:
        assert (coordinator, n, local_ids, steps) == (f"gpu003:{port}", 16, [rank % 8], 7)
    # the script's coordinator is the one jaxlm derives by itself from SLURM's variables
    assert resolve(cfg(), slurm_env(0, 8)).coordinator == rows[0][0]


def test_kubernetes_manifest_maps_every_pod_to_its_process():
    docs = list(yaml.safe_load_all((LAUNCH / "k8s-indexed-job.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    svc_name, job_name = service["metadata"]["name"], job["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert service["spec"]["selector"] == {"job-name": job_name}
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and pod["subdomain"] == svc_name
    assert pod["restartPolicy"] == "Never"
    assert pod["terminationGracePeriodSeconds"] >= 60  # SIGTERM, then time to save a checkpoint
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    n = int(env["JAXLM_NUM_PROCESSES"])
    assert spec["completions"] == spec["parallelism"] == n
    port = service["spec"]["ports"][0]["port"]
    assert container["ports"][0]["containerPort"] == port
    assert env["JAXLM_COORDINATOR"] == f"{job_name}-0.{svc_name}:{port}"  # pod 0's DNS name
    for index in range(n):
        got = resolve(cfg(), {**env, "JOB_COMPLETION_INDEX": str(index)})
        assert (got.coordinator, got.num_processes, got.process_id) == \
            (env["JAXLM_COORDINATOR"], n, index)
    # the command line is a valid jaxlm run
    assert container["command"][-2:] == ["-m", "jaxlm.train"]
    args = container["args"]
    load_config([str(ROOT / args[args.index("--config") + 1])],
                [a for a in args if "=" in a and not a.startswith("--")])


def test_tpu_vm_script_runs_the_same_command_on_every_worker(tmp_path):
    record = tmp_path / "argv.json"
    _stub(tmp_path, "gcloud", f'{shlex.quote(sys.executable)} -c "import json, sys; '
                              f'json.dump(sys.argv[1:], open(\'{record}\', \'w\'))" "$@"\n')
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "my-v5p-64", "us-east5-a", "--config",
                    "configs/tiny.yaml", "train.run_dir=/mnt/runs/a b"], env=env, check=True,
                   timeout=60)
    argv = json.loads(record.read_text())
    assert argv[:9] == ["compute", "tpus", "tpu-vm", "ssh", "my-v5p-64", "--zone", "us-east5-a",
                        "--worker=all", "--command"]
    cd, command = argv[9].split(" && ")
    assert cd == "cd ~/jaxlm"
    assert shlex.split(command) == ["PYTHONUNBUFFERED=1", "python3", "-m", "jaxlm.train",
                                    "--config", "configs/tiny.yaml", "train.run_dir=/mnt/runs/a b",
                                    "distributed.detect=jax"]
    bad = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("usage: launch/tpu_vm.sh TPU_NAME ZONE")


def test_local_launcher_refuses_bad_arguments():
    for argv in ([], ["2"], ["two", "4"], ["2", "0"]):
        bad = subprocess.run(["bash", str(LAUNCH / "local.sh"), *argv], capture_output=True,
                             text=True, timeout=30)
        assert bad.returncode == 2, argv
        assert bad.stderr.startswith("usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS")
