#!/usr/bin/env bash
# Launch imgtrain on this node under torchrun with the fault-tolerance settings imgtrain ships.
# Run the same command on every node of the job.
#
#   scripts/launch_training.sh --nodes 1:4 --gpus 8 --endpoint HEAD:29400 --job r50 -- \
#       --config configs/imagenet_resnet50.yaml data.root=/data/imagenet checkpoint.dir=/shared/r50/ckpt
#
# Rendezvous backends (--backend):
#   c10d  (default) the store lives in the agent whose address matches --endpoint: simplest, but if that
#         node dies the job stops. Use --store-host to point every agent at a standalone store started
#         with `imgtrain rendezvous-store --port 29400` on a machine that is not a training node.
#   etcd-v2 an etcd cluster (run with --enable-v2=true) at --endpoint: survives the loss of any node.
# Every value below is also explained in docs/fault_tolerance.md.
set -euo pipefail

nodes="1"
gpus="auto"
endpoint="127.0.0.1:29400"
job="imgtrain"
backend="c10d"
store_external="false"
max_restarts=10
local_addr=""

usage() { sed -n '2,16p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) nodes="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --endpoint) endpoint="$2"; shift 2 ;;
    --job) job="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --store-host) endpoint="$2"; store_external="true"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --local-addr) local_addr="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "launch_training.sh: unknown option $1" >&2; usage ;;
  esac
done

if [ "$gpus" = "auto" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --list-gpus | wc -l)
  else
    gpus=1
  fi
fi

# A restarted node must not dial the dead group's master address through the agent's shared store
# (measured: with the shared store a rejoining node times out after 60 s and both agents die).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# torchrun SIGKILLs its workers this many seconds after passing on a SIGTERM (its default is 30 s):
# keep it above fault_tolerance.grace_period (default 30 s) so that the preemption checkpoint can finish.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-60}"

# keep_alive_interval x keep_alive_max_attempt = 3 s until a silent node is declared dead (default 15 s);
# last_call_timeout=1: do not wait 30 s for late joiners after a membership change;
# heartbeat_timeout=5 / read_timeout=15 / close_timeout=5: fail fast on a dead store connection.
rdzv_conf="last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,read_timeout=15,close_timeout=5,heartbeat_timeout=5"
if [ "$store_external" = "true" ]; then
  # No training node hosts the store: all agents are clients of the standalone store.
  rdzv_conf="$rdzv_conf,is_host=false"
fi

extra=()
[ -n "$local_addr" ] && extra+=(--local-addr="$local_addr")

echo "launch_training.sh: nodes=$nodes gpus/node=$gpus backend=$backend endpoint=$endpoint job=$job rdzv_conf=$rdzv_conf" >&2
# distributed.timeout (process-group timeout, default 600 s) and distributed.init_timeout come from the
# config; the trainer logs the effective values at start.
exec torchrun --nnodes="$nodes" --nproc-per-node="$gpus" --max-restarts="$max_restarts" \
  --rdzv-backend="$backend" --rdzv-endpoint="$endpoint" --rdzv-id="$job" --rdzv-conf="$rdzv_conf" \
  "${extra[@]}" -m imgtrain train "$@"
