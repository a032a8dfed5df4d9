#!/usr/bin/env bash
# Show a training job's state, current step, throughput and last checkpoint: from its run directory
# (metrics.jsonl, summary.json, written by the trainer), from a Prometheus endpoint of one of its ranks,
# and, when given, what Slurm or Kubernetes says about the job.
#
#   scripts/monitor.sh runs/r50                              # once
#   scripts/monitor.sh --watch 30 runs/r50                   # every 30 s until the run finishes
#   scripts/monitor.sh --metrics-url http://gpu1:9450/metrics
#   scripts/monitor.sh --slurm-job 12345 /shared/runs/r50
#   scripts/monitor.sh --k8s-job imgtrain-r50 [--namespace ns]
#
# Options:
#   --watch SECONDS     repeat until the run is finished (Ctrl-C to stop watching; the job goes on)
#   --json              print imgtrain's JSON status instead of the one-line summary
#   --metrics-url URL   read the rank's Prometheus exporter (port 9450 + local rank) instead of a run dir
#   --slurm-job ID      also print the Slurm job state (squeue / sacct)
#   --k8s-job NAME      also print the PyTorchJob's (or Job's) state and its pods (kubectl)
#   --namespace NS      Kubernetes namespace                                         [current]
# Exit status: 0 running or finished, 1 failed, diverged or preempted (state shows the exit code; an elastic
# restart makes it running again), stalled (no record for 5 min) or not started, 2 usage.
set -euo pipefail

watch=0
json="false"
metrics_url=""
slurm_job=""
k8s_job=""
namespace=""
run_dir=""

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --watch|--metrics-url|--slurm-job|--k8s-job|--namespace)
      [ $# -ge 2 ] || { echo "monitor.sh: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --watch) watch="$2"; shift 2 ;;
    --json) json="true"; shift ;;
    --metrics-url) metrics_url="$2"; shift 2 ;;
    --slurm-job) slurm_job="$2"; shift 2 ;;
    --k8s-job) k8s_job="$2"; shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    -*) echo "monitor.sh: unknown option $1" >&2; usage ;;
    *) run_dir="$1"; shift ;;
  esac
done
[ -n "$run_dir" ] || [ -n "$metrics_url" ] || [ -n "$k8s_job" ] || [ -n "$slurm_job" ] || usage

scheduler_state() {
  if [ -n "$slurm_job" ]; then
    local s
    s=$(squeue -h -j "$slurm_job" -o '%T %M %D' 2>/dev/null || true)
    [ -n "$s" ] || s=$(sacct -n -X -j "$slurm_job" -o State 2>/dev/null | head -n 1 || true)
    echo "slurm job $slurm_job: ${s:-unknown}"
  fi
  if [ -n "$k8s_job" ]; then
    local ns=()
    if [ -n "$namespace" ]; then ns=(-n "$namespace"); fi
    local cond
    cond=$(kubectl get pytorchjob "$k8s_job" "${ns[@]}" -o jsonpath='{.status.conditions[-1].type}' 2>/dev/null \
           || kubectl get job "$k8s_job" "${ns[@]}" -o jsonpath='{.status.conditions[-1].type}' 2>/dev/null || true)
    echo "kubernetes job $k8s_job: ${cond:-unknown (not found or still pending)}"
    kubectl get pods "${ns[@]}" -l app.kubernetes.io/name=imgtrain -o wide 2>/dev/null || true
  fi
}

report() {  # prints the status; returns 0 running/finished, 1 stalled/not started; sets $state
  local status
  if [ -n "$metrics_url" ]; then
    status=$(python -m imgtrain status --metrics-url "$metrics_url")
  elif [ -n "$run_dir" ]; then
    status=$(python -m imgtrain status "$run_dir")
  else
    scheduler_state
    state="unknown"
    return 0
  fi
  state=$(python -c 'import json, sys; print(json.loads(sys.argv[1])["state"])' "$status")
  if [ "$json" = "true" ]; then
    echo "$status"
  else
    python - "$status" <<'PY'
import json, sys
s = json.loads(sys.argv[1])
if "metrics" in s:
    print(f"{s['endpoint']}: {s['state']}")
    for k, v in sorted(s["metrics"].items()):
        print(f"  {k} = {v:g}")
    raise SystemExit
def fmt(v, spec=""):
    return "-" if v is None else format(v, spec)
print(f"{s['run_dir']}: {s['state']}"
      + (f" (exit code {s['exit_code']}: {s.get('error') or '-'})" if s.get("exit_code") is not None else "")
      + (f" (last record {s['last_record_age_s']:.0f} s ago)" if "last_record_age_s" in s else "")
      + f" | step {fmt(s.get('step'))} epoch {fmt(s.get('epoch'))} world {fmt(s.get('world_size'))}"
      + f" | {fmt(s.get('images_per_s'), '.1f')} images/s | loss {fmt(s.get('loss'), '.4f')}"
      + (f" | val top-1 {s['val_top1']:.2f}%" if s.get("val_top1") is not None else "")
      + f" | last checkpoint {s.get('last_checkpoint') or '-'}")
PY
  fi
  scheduler_state
  case "$state" in
    running|finished) return 0 ;;
    *) return 1 ;;
  esac
}

state=""
if [ "$watch" = 0 ]; then
  report
  exit $?
fi
while true; do
  report || true   # stalled, preempted (requeued) or not started yet: keep watching
  case "$state" in
    finished) exit 0 ;;
    failed|diverged) exit 1 ;;
  esac
  sleep "$watch"
done
