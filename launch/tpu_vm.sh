#!/usr/bin/env bash
# jaxlm on a Cloud TPU VM slice (one host or a pod slice of many): the same command on every host
# through `gcloud compute tpus tpu-vm ssh --worker=all`; JAX finds the hosts, the coordinator and
# its process id from the TPU VM metadata (distributed.detect=jax).
#
#   launch/tpu_vm.sh TPU_NAME ZONE [python -m jaxlm.train args ...]
#   launch/tpu_vm.sh my-v5p-64 us-east5-a --config configs/llama3-8b.yaml \
#       train.run_dir=/mnt/shared/runs/llama3-8b
#
# jaxlm must be installed (or checked out at JAXLM_DIR) on every host first, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command \
#     'git clone https://.../jaxlm ~/jaxlm && pip install -e ~/jaxlm "jax[tpu]"'
# train.run_dir must be storage every host writes (checkpoints are written by all hosts together).
# Environment: JAXLM_DIR (on the VMs, default ~/jaxlm), PYTHON (default python3), PROJECT.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: launch/tpu_vm.sh TPU_NAME ZONE [python -m jaxlm.train args ...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
jaxlm_dir=${JAXLM_DIR:-'~/jaxlm'}  # expanded on the VMs
# the arguments are quoted once here and unquoted once by the remote shell
remote="cd $jaxlm_dir && PYTHONUNBUFFERED=1 ${PYTHON:-python3} -m jaxlm.train"
remote+=" $(printf '%q ' "$@")distributed.detect=jax"

exec gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "$remote"
