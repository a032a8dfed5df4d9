#!/usr/bin/env bash
# Everything imgtrain measures or checks on a lent GPU machine, in one command: each part has its own time
# limit and writes its own files under $OUT, so a part that fails or runs out of time does not lose the
# others. Run from the repository root, all parts or the ones named:
#   OUT=/tmp/gpu-results benchmarks/gpu_suite.sh [compute pipeline main_job compile decode batch_finder metrics profiler]
# Packages the machine's image lacks travel as wheels in .whl/ (docs/BENCHMARKS.md, "GPU").
set -u
OUT=${OUT:-/tmp/gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/suite.log"; }
quiet() { grep -v ' INFO ' | tee -a "$OUT/suite.log"; }

compute() {
    log "compute: AMP, channels_last, activation checkpointing (eager)"
    timeout 160 python3 benchmarks/gpu_training.py compute --models resnet50 vit_b_16 --precisions fp32 bf16 fp16 \
        --ckpt block stage --no-channels-last resnet50 --warmup 5 --steps 20 --out "$OUT/compute.json" 2>&1 | quiet
}

pipeline() {
    log "pipeline: real JPEGs, CPU decode vs nvJPEG, against synthetic"
    timeout 110 python3 benchmarks/gpu_training.py pipeline --decode cpu gpu --workers 14 --warmup 5 --steps 20 \
        --out "$OUT/pipeline.json" 2>&1 | quiet
}

main_job() {
    log "README's main job on the GPU (quickstart recipe, bf16), then NCCL compression hooks under torchrun"
    timeout 75 python3 -m imgtrain train output_dir=/tmp/q_main optimization.mixed_precision=bf16 \
        >"$OUT/quickstart.log" 2>&1
    log "quickstart rc=$? $(tail -c 600 /tmp/q_main/summary.json 2>/dev/null | tr '\n' ' ')"
    for m in powersgd onebit; do
        timeout 45 python3 -m torch.distributed.run --standalone --nproc-per-node=1 -m imgtrain train \
            distributed.compression=$m distributed.powersgd.start_iter=2 distributed.onebit.warmup_steps=2 \
            training.max_steps=40 output_dir=/tmp/q_$m >"/tmp/q_$m.log" 2>&1
        log "nccl $m rc=$? $(grep -o 'compression[^\"]*' /tmp/q_$m.log | head -2 | tr '\n' ' ')"
        tail -3 "/tmp/q_$m.log" >>"$OUT/suite.log"
    done
}

compile() {
    log "compute: torch.compile"
    timeout 150 python3 benchmarks/gpu_training.py compute --models resnet50 vit_b_16 --precisions --ckpt \
        --no-channels-last --compile-models resnet50 vit_b_16 --warmup 5 --steps 20 --compile-warmup 3 \
        --out "$OUT/compile.json" 2>&1 | quiet
}

decode() {
    log "decode: nvJPEG and the GPU crop/resize of one batch of 256, alone"
    timeout 60 python3 benchmarks/gpu_training.py decode --steps 20 --out "$OUT/decode.json" 2>&1 | quiet
}

batch_finder() {
    log "batch finder on the GPU: ResNet-50 bf16, allocator capped at 20 GiB (a real CUDA OOM ends each probe)"
    timeout 120 python3 -m imgtrain find-batch-size model.name=resnet50 optimization.mixed_precision=bf16 \
        data.image_size=224 data.val_resize=null data.workers=0 --memory-limit 20GiB --start 128 --steps 3 \
        --out "$OUT/batch_size.yaml" --json >"$OUT/batch_finder.txt" 2>"$OUT/batch_finder.log"
    log "batch finder rc=$? $(tail -c 900 "$OUT/batch_finder.txt")"
}

metrics() {
    log "Prometheus endpoint with NVML GPU series during a GPU run"
    python3 -m imgtrain train output_dir=/tmp/q_metrics optimization.mixed_precision=bf16 training.epochs=3 \
        monitoring.prometheus.enabled=true >/tmp/q_metrics.log 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do
        # Saved once the GPU series are there (NVML is read at each scrape).
        python3 -c "import urllib.request as u, sys; t = u.urlopen('http://127.0.0.1:9450/metrics', timeout=1).read().decode(); open('$OUT/metrics.txt', 'w').write(t); sys.exit('imgtrain_gpu_utilization_percent' not in t)" 2>/dev/null && break
        sleep 0.25
    done
    wait "$pid"
    log "metrics run rc=$? $(grep -c '^imgtrain_' "$OUT/metrics.txt" 2>/dev/null) imgtrain series; GPU: $(grep '^imgtrain_gpu' "$OUT/metrics.txt" 2>/dev/null | head -4 | tr '\n' ' ')"
}

profiler() {
    log "profiler: CUDA traces of a GPU run, then profile-summary"
    timeout 60 python3 -m imgtrain train output_dir=/tmp/q_prof optimization.mixed_precision=bf16 training.epochs=1 \
        profiler.enabled=true >/tmp/q_prof.log 2>&1
    log "profiled run rc=$?"
    timeout 30 python3 -m imgtrain profile-summary /tmp/q_prof --top 8 >"$OUT/profile_summary.txt" 2>&1
    log "profile-summary rc=$?"; head -40 "$OUT/profile_summary.txt" | tee -a "$OUT/suite.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)'; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(compute pipeline main_job compile decode batch_finder metrics profiler)
for part in "${parts[@]}"; do "$part"; done
log "done"
