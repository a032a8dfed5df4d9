#!/usr/bin/env bash
# Stop a training job, remove its cluster resources, and prune its old checkpoints with
# `imgtrain checkpoints prune`: the retention rule training applies too (checkpoint.keep_last_n; see
# docs/fault_tolerance.md): keep the --keep newest checkpoints that verify (sha256 against their
# manifests) and anything newer; never the newest good one. --dry-run shows what would go and changes nothing.
#
#   scripts/cleanup.sh --dry-run --run-dir runs/r50 --keep 1
#   scripts/cleanup.sh --run-dir runs/r50 --keep 2                 # stop the launcher, prune
#   scripts/cleanup.sh --checkpoints s3://bucket/r50 --keep 3       # prune only (any fsspec URL)
#   scripts/cleanup.sh --slurm-job 12345 --run-dir /shared/runs/r50
#   scripts/cleanup.sh --k8s-overlay deploy/kubernetes/overlays/aws [--delete-volumes]
#
# Options:
#   --run-dir DIR          the run's output directory: stops the launcher recorded in DIR/logs/launcher.pid
#                          (scripts/launch_training.sh; only on the host that wrote it and only if that pid
#                          is still the launcher) and prunes DIR/checkpoints
#   --checkpoints DIR|URL  the checkpoint directory to prune (default: <run-dir>/checkpoints)
#   --keep N               newest checkpoints that verify to keep, >= 1                     [3]
#   --no-prune             stop and remove only
#   --slurm-job ID         scancel the job (SIGTERM first: it saves a checkpoint)
#   --k8s-overlay DIR      kubectl delete what the overlay applied, except PersistentVolumeClaims
#   --delete-volumes       with --k8s-overlay: delete the claims too (the dataset and PVC checkpoints!)
#   --namespace NS         Kubernetes namespace                                             [current]
#   --timeout SECONDS      how long a stopped launcher may take to save and exit            [120]
#   --dry-run              print what would be done, do nothing
set -euo pipefail

run_dir=""
ckpt=""
keep=3
prune="true"
slurm_job=""
overlay=""
delete_volumes="false"
namespace=""
timeout=120
dry_run="false"

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
die() { echo "cleanup.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --run-dir|--checkpoints|--keep|--slurm-job|--k8s-overlay|--namespace|--timeout)
      [ $# -ge 2 ] || die "$1 needs a value" ;;
  esac
  case "$1" in
    --run-dir) run_dir="$2"; shift 2 ;;
    --checkpoints) ckpt="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    --no-prune) prune="false"; shift ;;
    --slurm-job) slurm_job="$2"; shift 2 ;;
    --k8s-overlay) overlay="$2"; shift 2 ;;
    --delete-volumes) delete_volumes="true"; shift ;;
    --namespace) namespace="$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --dry-run) dry_run="true"; shift ;;
    -h|--help) usage 0 ;;
    *) echo "cleanup.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ "$keep" =~ ^[1-9][0-9]*$ ]] || die "--keep must be a whole number >= 1 (the newest good checkpoint is never removed)"
[ -n "$run_dir$ckpt$slurm_job$overlay" ] || usage
if [ -z "$ckpt" ] && [ -n "$run_dir" ]; then ckpt="$run_dir/checkpoints"; fi

say() { echo "cleanup.sh: $*" >&2; }
# Running, and not a zombie waiting for its parent to reap it (that one has already exited).
alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != "Z" ]; }
act() {  # run a command, or print it under --dry-run
  if [ "$dry_run" = "true" ]; then
    echo "would run: $(printf '%q ' "$@")"
  else
    "$@"
  fi
}

# ---- stop the job
if [ -n "$slurm_job" ]; then
  # SIGTERM reaches the batch script's trap, which lets imgtrain save before the job ends.
  act scancel --signal=TERM --full "$slurm_job"
fi
# The pid file names a pid on one host; by now that pid may be another process (the launcher exited, the
# pid was reused) or the file may come from another machine sharing the run directory. Signal it only if
# it is this host's launcher: launch_training.sh itself, or the agent it exec'd in local mode.
is_launcher() {
  local args
  args=$(ps -ww -o args= -p "$1" 2>/dev/null) || return 1  # -ww: a long path is not cut at 80 columns
  [[ "$args" =~ (^|[[:space:]/])launch_training\.sh([[:space:]]|$) || "$args" =~ (^|[[:space:]/])torchrun([[:space:]]|$) \
     || "$args" == *"-m imgtrain launch"* ]]
}
if [ -n "$run_dir" ] && [ -f "$run_dir/logs/launcher.pid" ]; then
  { read -r pid || true; read -r pid_host || true; } <"$run_dir/logs/launcher.pid"
  pid="${pid:-}"
  pid_host="${pid_host:-}"
  if ! [[ "$pid" =~ ^[0-9]+$ ]] || ! alive "$pid"; then
    say "no running launcher in $run_dir/logs/launcher.pid"
  elif [ "$pid_host" != "$(hostname)" ]; then
    die "$run_dir/logs/launcher.pid names pid $pid on host '${pid_host:-?}', not this host ($(hostname)): run cleanup.sh there"
  elif ! is_launcher "$pid"; then
    # The launcher has exited and its pid was reused: nothing of the job runs here.
    say "pid $pid of $run_dir/logs/launcher.pid is no longer the launcher ($(ps -o args= -p "$pid" | cut -c1-60)): not signalling it"
  else
    say "stopping the launcher (pid $pid) with SIGTERM: its nodes save a checkpoint and exit"
    if [ "$dry_run" = "false" ]; then
      kill -TERM "$pid"
      deadline=$((SECONDS + timeout))
      while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 1; done
      if alive "$pid"; then
        die "pid $pid still running after ${timeout}s; not pruning while it may be saving"
      fi
    else
      echo "would run: kill -TERM $pid"
    fi
  fi
fi

# ---- remove cluster resources (the claims stay unless asked: they hold the dataset)
if [ -n "$overlay" ]; then
  [ -f "$overlay/kustomization.yaml" ] || die "$overlay has no kustomization.yaml"
  ns=()
  if [ -n "$namespace" ]; then ns=(-n "$namespace"); fi
  manifests=$(kubectl kustomize "$overlay" | DELETE_VOLUMES="$delete_volumes" python -c '
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
keep = os.environ["DELETE_VOLUMES"] != "true"
print(yaml.safe_dump_all([d for d in docs if not (keep and d["kind"] == "PersistentVolumeClaim")]))')
  if [ "$dry_run" = "true" ]; then
    echo "would delete:"
    python -c '
import sys, yaml
for d in yaml.safe_load_all(sys.stdin):
    if d:
        print("  " + d["kind"] + "/" + d["metadata"]["name"])' <<<"$manifests"
  else
    kubectl delete "${ns[@]}" --ignore-not-found -f - <<<"$manifests"
  fi
fi

# ---- prune checkpoints
if [ "$prune" = "true" ] && [ -n "$ckpt" ]; then
  args=(checkpoints prune "$ckpt" --keep "$keep")
  if [ "$dry_run" = "true" ]; then args+=(--dry-run); fi
  python -m imgtrain "${args[@]}"
fi
