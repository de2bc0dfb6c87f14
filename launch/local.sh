#!/usr/bin/env bash
# N jaxlm processes on this machine, each with its own simulated CPU devices, joined through
# jax.distributed on 127.0.0.1: the multi-host code path (coordinator, cross-process collectives,
# per-process data, collective checkpoints) without a cluster; tests/test_multiprocess.py runs it.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [python -m jaxlm.train arguments ...]
#   launch/local.sh 2 4 --config configs/tiny.yaml train.run_dir=runs/local-2x4
#
# Output lines are prefixed with [p<i>]; each process also writes <run_dir>/logs/process_<i>.log.
# When a process fails, jax.distributed stops the others (distributed.heartbeat_timeout_s); any
# still running JAXLM_LOCAL_GRACE_S seconds later (default 300) are killed, and the script exits
# with the first failure's status. Ctrl-C (or SIGTERM) is passed on as SIGTERM: every process
# saves a checkpoint at the same step and exits 75; any still running JAXLM_LOCAL_STOP_S seconds
# later (default 120) are killed.
# Environment: PYTHON (default python3), JAXLM_PORT (default: a free port).
set -euo pipefail

if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS [jaxlm.train args ...]" >&2
  exit 2
fi
num_processes=$1 devices=$2
shift 2
python=${PYTHON:-python3}
grace=${JAXLM_LOCAL_GRACE_S:-300}
stop_wait=${JAXLM_LOCAL_STOP_S:-120}
free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
port=${JAXLM_PORT:-$("$python" -c "$free_port")}

root=$(cd "$(dirname "$0")/.." && pwd)  # jaxlm importable from anywhere; paths stay the caller's
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
# runtime.cpu_devices sets the device count; a forced count in XLA_FLAGS would fight it
export XLA_FLAGS=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")

pids=()
stop_all() {  # stop_all SECONDS: SIGTERM, then SIGKILL whatever still runs SECONDS later
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < $1 * 10; t++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "local.sh: interrupted; each process saves a checkpoint, then stops" >&2
      stop_all "$stop_wait"; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  JAXLM_COORDINATOR=127.0.0.1:$port JAXLM_NUM_PROCESSES=$num_processes JAXLM_PROCESS_ID=$i \
    "$python" -m jaxlm.train "$@" "runtime.cpu_devices=$devices" \
    > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
echo "local.sh: $num_processes processes x $devices CPU devices, coordinator 127.0.0.1:$port," \
  "pids ${pids[*]}" >&2

status=0 failed_at=0 running=$num_processes
declare -A finished=()
while ((running > 0)); do
  for ((i = 0; i < num_processes; i++)); do
    [[ -n ${finished[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[$i]=1
    running=$((running - 1))
    echo "local.sh: process $i exited with status $rc" >&2
    if ((rc != 0 && status == 0)); then status=$rc failed_at=$SECONDS; fi
  done
  if ((status != 0 && running > 0 && SECONDS - failed_at >= grace)); then
    echo "local.sh: $running process(es) still running ${grace} s after a failure; killing them" >&2
    stop_all 2
  fi
  sleep 0.2
done
exit "$status"
