#!/usr/bin/env bash
# Launch imgtrain: on this machine, on this node of a multi-node job, on several hosts over SSH, on Slurm,
# or on Kubernetes; then say where its logs, metrics and checkpoints are. Everything after `--` goes to
# `imgtrain train` (--config, --output-dir, section.key=value overrides).
#
#   scripts/launch_training.sh --mode local --gpus 8 -- --config configs/imagenet_resnet50.yaml data.root=/data/imagenet
#   scripts/launch_training.sh --mode ssh --hosts gpu1,gpu2 --gpus 8 -- --config ... --output-dir /shared/runs/r50
#   scripts/launch_training.sh --mode slurm --nodes 4 -- --config ... --output-dir /shared/runs/r50
#   scripts/launch_training.sh --mode k8s --overlay deploy/kubernetes/overlays/aws [--terraform deploy/terraform/aws]
#   scripts/launch_training.sh --nodes 1:4 --gpus 8 --endpoint HEAD:29400 --job r50 -- ...   (on every node)
#
# Modes (--mode):
#   node   (default) one elastic agent (torchrun's) on this node; run the same command on every node of the job.
#   local  one node, rendezvous on 127.0.0.1.
#   ssh    one node-mode agent per host of --hosts (first host: rendezvous store), started through
#          --ssh-cmd; each host's output goes to <output-dir>/logs/<host>.log; waits for all of them.
#   slurm  sbatch deploy/slurm/imgtrain.sbatch on --nodes nodes (one agent per node, requeue on preemption).
#   k8s    kubectl apply -k --overlay (its settings.yaml sets image, nodes, GPUs, data, checkpoints).
#
# Options:
#   --nodes N|MIN:MAX   nodes of the job (node/slurm; ssh: number of hosts)        [1]
#   --gpus N|auto       workers per node (auto: nvidia-smi's GPU count, else 1)    [auto]
#   --endpoint H:P      rendezvous endpoint (node mode; ssh: first host:--port)    [127.0.0.1:29400]
#   --port P            rendezvous port in local/ssh mode                          [29400]
#   --job ID            rendezvous id / job name                                   [imgtrain]
#   --backend B         c10d, or etcd-v2 with --endpoint at an etcd cluster        [c10d]
#   --store-host H:P    a standalone store (`imgtrain rendezvous-store`): no training node hosts it
#   --max-restarts N    torchrun worker-group restarts                             [10]
#   --launcher L        imgtrain: `imgtrain launch`, torchrun's agent whose workers are forks of a process
#                       that has already imported torch (restarts ~4.6 s faster); torchrun: plain torchrun
#                                                                                  [imgtrain]
#   --local-addr A      this node's address as the others reach it (also picks GLOO/NCCL_SOCKET_IFNAME)
#   --is-host B         true/false: whether this agent hosts the c10d store (default: torchrun guesses)
#   --hosts LIST        ssh: comma-separated hosts; NAME=ADDR when the ssh name differs from the address
#   --ssh-cmd TEMPLATE  ssh: how to run a command on a host; {host} and {cmd} are put into its words
#                       (never evaluated by the shell)                  [ssh -o BatchMode=yes {host} {cmd}]
#   --remote-dir DIR    ssh: this repository's path on the hosts                   [this checkout]
#   --overlay DIR       k8s: the kustomize overlay to apply
#   --terraform DIR     k8s: print the cluster's kubeconfig command from `terraform output` first
#   --dry-run           print what would run, run nothing
#
# Rendezvous: with c10d the store lives in the agent at --endpoint; if that node dies the job stops. Use
# --store-host (a store outside the training nodes) or etcd-v2 to survive any node's loss. Every value
# is explained in docs/fault_tolerance.md; deployment guides: docs/deployment.md.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
mode="node"
nodes="1"
gpus="auto"
endpoint=""
port=29400
job="imgtrain"
backend="c10d"
store_external="false"
max_restarts=10
local_addr=""
is_host=""
hosts=""
ssh_cmd="ssh -o BatchMode=yes {host} {cmd}"
remote_dir="$repo"
overlay=""
tf_dir=""
dry_run="false"
launcher="imgtrain"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
die() { echo "launch_training.sh: $*" >&2; exit 2; }
# pid and host of this launcher: scripts/cleanup.sh signals the pid only on this host and only while it is
# still this launcher (the pid may since belong to another process).
record_launcher() { printf '%s\n%s\n' "$$" "$(hostname)" >"$1"; }
need_value() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --mode|--nodes|--gpus|--endpoint|--port|--job|--backend|--store-host|--max-restarts|--local-addr|--is-host|\
    --hosts|--ssh-cmd|--remote-dir|--overlay|--terraform|--launcher) need_value "$@" ;;
  esac
  case "$1" in
    --mode) mode="$2"; shift 2 ;;
    --nodes) nodes="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --endpoint) endpoint="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --job) job="$2"; shift 2 ;;
    --backend) backend="$2"; shift 2 ;;
    --store-host) endpoint="$2"; store_external="true"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --local-addr) local_addr="$2"; shift 2 ;;
    --is-host) is_host="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --ssh-cmd) ssh_cmd="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --overlay) overlay="$2"; shift 2 ;;
    --terraform) tf_dir="$2"; shift 2 ;;
    --launcher) launcher="$2"; shift 2 ;;
    --dry-run) dry_run="true"; shift ;;
    --) shift; break ;;
    -h|--help) usage 0 ;;
    *) echo "launch_training.sh: unknown option $1" >&2; usage ;;
  esac
done
train_args=("$@")

# Where the run writes, resolved by imgtrain's own config loader (defaults < recipe < overrides).
run_paths() {
  python - "${train_args[@]}" <<'EOF'
import json, sys
from imgtrain.config import DEFAULT_RECIPE, load_config
args, config, overrides = sys.argv[1:], None, []
i = 0
while i < len(args):
    if args[i] == "--config":
        config = args[i + 1]; i += 2; continue
    if args[i] == "--output-dir":
        overrides.append(f"output_dir={json.dumps(args[i + 1])}"); i += 2; continue
    if "=" in args[i] and not args[i].startswith("-"):
        overrides.append(args[i])
    i += 1
cfg = load_config(config or DEFAULT_RECIPE, overrides)
print(cfg.output_dir)
print(cfg.checkpoint.dir or f"{cfg.output_dir}/checkpoints")
EOF
}

print_paths() {  # $1: where the logs are
  local paths
  if paths=$(run_paths 2>/dev/null); then
    local out ckpt
    out=$(sed -n 1p <<<"$paths"); ckpt=$(sed -n 2p <<<"$paths")
    echo "launch_training.sh: logs:        $1" >&2
    echo "launch_training.sh: metrics:     $out/metrics.jsonl (scripts/monitor.sh $out); Prometheus on port 9450 + local rank if enabled" >&2
    echo "launch_training.sh: checkpoints: $ckpt" >&2
  else
    echo "launch_training.sh: logs: $1 (run paths unknown: the config does not load, see imgtrain's error)" >&2
  fi
}

run() {
  if [ "$dry_run" = "true" ]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

case "$launcher" in
  imgtrain|torchrun) ;;
  *) die "unknown --launcher $launcher (imgtrain, torchrun)" ;;
esac

case "$mode" in
  node|local) ;;
  ssh)
    [ -n "$hosts" ] || die "--mode ssh needs --hosts"
    IFS=, read -r -a host_list <<<"$hosts"
    first="${host_list[0]}"
    first_addr="${first#*=}"
    [ -n "$endpoint" ] || endpoint="$first_addr:$port"
    # All hosts must join before training starts, unless --nodes MIN:MAX allows fewer (elastic).
    if [[ "$nodes" == *:* ]]; then ssh_nodes="$nodes"; else ssh_nodes="${#host_list[@]}"; fi
    out=$(run_paths | sed -n 1p) || die "the training arguments do not form a valid config"
    log_dir="$out/logs"
    if [ "$dry_run" = "false" ]; then
      mkdir -p "$log_dir"
      record_launcher "$log_dir/launcher.pid"   # scripts/cleanup.sh --run-dir stops the job through it
    fi
    [[ "$ssh_cmd" == *"{cmd}"* ]] || ssh_cmd="$ssh_cmd {cmd}"
    # The template is the user's own command line: split it into words once, with the shell's quoting
    # rules. Host names and the command are then put into those words, never through eval, so a host
    # name cannot run anything; it also names a log file, so it must be a plain name.
    declare -a ssh_words
    eval "ssh_words=($ssh_cmd)"
    for entry in "${host_list[@]}"; do
      [[ "${entry%%=*}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.@-]*$ ]] ||
        die "--hosts: '${entry%%=*}' is not a host name (letters, digits, . _ - @ only)"
      [[ "${entry#*=}" =~ ^[A-Za-z0-9_.:%@-]+$ ]] || die "--hosts: '${entry#*=}' is not an address"
    done
    pids=()
    for i in "${!host_list[@]}"; do
      entry="${host_list[$i]}"
      name="${entry%%=*}"
      addr="${entry#*=}"
      host_is_host=$([ "$i" = 0 ] && [ "$store_external" = "false" ] && echo true || echo false)
      node_cmd=(scripts/launch_training.sh --mode node --nodes "$ssh_nodes" --gpus "$gpus"
                --endpoint "$endpoint" --job "$job" --backend "$backend" --max-restarts "$max_restarts"
                --local-addr "$addr" --is-host "$host_is_host" --launcher "$launcher")
      if [ "$store_external" = "true" ]; then node_cmd+=(--store-host "$endpoint"); fi
      remote="cd $(printf '%q' "$remote_dir") && exec $(printf '%q ' "${node_cmd[@]}")--"
      if [ ${#train_args[@]} -gt 0 ]; then remote="$remote $(printf '%q ' "${train_args[@]}")"; fi
      words=()
      for w in "${ssh_words[@]}"; do
        # Quoted replacements: bash 5.2 would otherwise read '&' in them as "the matched text".
        w="${w//\{host\}/"$name"}"
        words+=("${w//\{cmd\}/"$remote"}")
      done
      if [ "$dry_run" = "true" ]; then
        printf '%q ' "${words[@]}"
        echo
        continue
      fi
      echo "launch_training.sh: starting node $i on $name ($addr): log $log_dir/$name.log" >&2
      # The background job is the ssh (or namespace) process itself, so signals reach it.
      "${words[@]}" >"$log_dir/$name.log" 2>&1 &
      pids+=($!)
      if [ "$i" = 0 ]; then sleep 1; fi   # the store host listens before the others dial in
    done
    if [ "$dry_run" = "true" ]; then exit 0; fi
    print_paths "$log_dir/<host>.log"
    # Ctrl-C / SIGTERM: pass it on, so that every node saves its preemption checkpoint.
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
    rc=0
    for pid in "${pids[@]}"; do
      wait "$pid" || rc=$?
    done
    echo "launch_training.sh: all nodes exited (status $rc)" >&2
    exit "$rc"
    ;;
  slurm)
    command -v sbatch >/dev/null 2>&1 || [ "$dry_run" = "true" ] || die "sbatch not found (is this a Slurm login node?)"
    out=$(run_paths | sed -n 1p) || die "the training arguments do not form a valid config"
    sb=(sbatch --parsable --job-name="$job" --nodes="${nodes##*:}" --output="$out/logs/slurm-%j.log")
    if [ "$gpus" != "auto" ]; then sb+=(--gpus-per-node="$gpus"); fi
    [ "$dry_run" = "true" ] || mkdir -p "$out/logs"
    if [ "$dry_run" = "true" ]; then
      run "${sb[@]}" "$repo/deploy/slurm/imgtrain.sbatch" "${train_args[@]}"
      jobid="<jobid>"
    else
      jobid=$("${sb[@]}" "$repo/deploy/slurm/imgtrain.sbatch" "${train_args[@]}")
      echo "launch_training.sh: submitted Slurm job $jobid" >&2
    fi
    print_paths "$out/logs/slurm-$jobid.log"
    exit 0
    ;;
  k8s)
    [ -n "$overlay" ] || die "--mode k8s needs --overlay (deploy/kubernetes/overlays/...)"
    [ -f "$overlay/kustomization.yaml" ] || die "$overlay has no kustomization.yaml"
    if [ -n "$tf_dir" ]; then
      kcmd=$(terraform -chdir="$tf_dir" output -raw kubeconfig_command) || die "no terraform outputs in $tf_dir (run terraform apply first)"
      echo "launch_training.sh: pointing kubectl at the cluster: $kcmd" >&2
      if [ "$dry_run" = "false" ]; then eval "$kcmd"; fi
    fi
    setting() { sed -n "s/^ *$1: *\"\{0,1\}\([^ #\"]*\).*/\1/p" "$overlay/settings.yaml"; }
    ckpt=$(setting CHECKPOINT_DIR)
    if [ -n "$tf_dir" ]; then
      # The settings must point at what Terraform created (a stale bucket or registry is a common slip).
      tf_ckpt=$(terraform -chdir="$tf_dir" output -raw checkpoint_url)
      tf_image=$(terraform -chdir="$tf_dir" output -raw image_repository_url)
      [[ "$ckpt" == "$tf_ckpt"/* ]] || echo "launch_training.sh: warning: CHECKPOINT_DIR=$ckpt is not under $tf_ckpt" >&2
      [[ "$(setting IMAGE)" == "$tf_image":* ]] || echo "launch_training.sh: warning: IMAGE=$(setting IMAGE) is not from $tf_image" >&2
    fi
    run kubectl apply -k "$overlay"
    echo "launch_training.sh: logs:        kubectl logs -f -l app.kubernetes.io/name=imgtrain --max-log-requests=64" >&2
    echo "launch_training.sh: metrics:     PodMonitor imgtrain (Prometheus/Grafana), or kubectl port-forward <pod> 9450" >&2
    echo "launch_training.sh: checkpoints: $ckpt" >&2
    exit 0
    ;;
  *) die "unknown --mode $mode (node, local, ssh, slurm, k8s)" ;;
esac

# ---- node / local: one elastic agent on this machine

if [ "$mode" = "local" ]; then
  nodes=1
  endpoint="127.0.0.1:$port"
fi
[ -n "$endpoint" ] || endpoint="127.0.0.1:$port"

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
elif [ -n "$is_host" ]; then
  rdzv_conf="$rdzv_conf,is_host=$is_host"
fi

extra=()
if [ -n "$local_addr" ]; then
  extra+=(--local-addr="$local_addr")
  # With several interfaces the hostname may resolve to an address the other nodes cannot reach: let Gloo
  # and NCCL use the interface that holds --local-addr unless told otherwise.
  if [ -z "${GLOO_SOCKET_IFNAME:-}" ] && command -v ip >/dev/null 2>&1; then
    ifname=$(ip -o -4 addr show | awk -v a="$local_addr" '{split($4, p, "/"); if (p[1] == a) {print $2; exit}}')
    if [ -n "$ifname" ]; then
      export GLOO_SOCKET_IFNAME="$ifname" NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$ifname}"
    fi
  fi
fi

echo "launch_training.sh: mode=$mode nodes=$nodes gpus/node=$gpus backend=$backend endpoint=$endpoint job=$job rdzv_conf=$rdzv_conf" >&2
print_paths "this terminal (stdout/stderr of the agent and its workers)"
# distributed.timeout (process-group timeout, default 600 s) and distributed.init_timeout come from the
# config; the trainer logs the effective values at start. exec: signals (SIGTERM on preemption) go
# straight to the agent, which forwards them to its workers.
# `imgtrain launch` takes torchrun's arguments and runs torchrun's agent, but its workers are forks of a
# server that imports torch while the agent joins the rendezvous: a (re)started worker skips the ~4.6 s
# of imports that every torchrun restart pays (docs/fault_tolerance.md). --launcher torchrun: plain torchrun.
if [ "$launcher" = "imgtrain" ]; then agent=(python -m imgtrain launch); else agent=(torchrun); fi
cmd=("${agent[@]}" --nnodes="$nodes" --nproc-per-node="$gpus" --max-restarts="$max_restarts"
     --rdzv-backend="$backend" --rdzv-endpoint="$endpoint" --rdzv-id="$job" --rdzv-conf="$rdzv_conf"
     "${extra[@]}" -m imgtrain train "${train_args[@]}")
if [ "$dry_run" = "true" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
if [ "$mode" = "local" ] && out=$(run_paths 2>/dev/null | sed -n 1p) && [ -n "$out" ]; then
  mkdir -p "$out/logs" && record_launcher "$out/logs/launcher.pid"   # exec keeps the pid: cleanup.sh stops it
fi
exec "${cmd[@]}"
