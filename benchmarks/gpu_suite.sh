#!/usr/bin/env bash
# Everything imgtrain measures on a lent GPU machine, in one command, most valuable first: each part has
# its own time limit and writes its own file under $OUT, so a part that fails or runs out of time does not
# lose the others. Run from the repository root:
#   OUT=/tmp/gpu-results benchmarks/gpu_suite.sh
# The packages the machine's image lacks travel as wheels in .whl/ (docs/BENCHMARKS.md, "GPU").
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

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)'; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

log "compute: AMP, channels_last, activation checkpointing (eager)"
timeout 160 python3 benchmarks/gpu_training.py compute --models resnet50 vit_b_16 --precisions fp32 bf16 fp16 \
    --ckpt block stage --no-channels-last resnet50 --warmup 5 --steps 20 --out "$OUT/compute.json" \
    2>&1 | grep -v ' INFO ' | tee -a "$OUT/suite.log"

log "pipeline: real JPEGs, CPU decode vs nvJPEG, against synthetic"
timeout 110 python3 benchmarks/gpu_training.py pipeline --decode cpu gpu --workers 14 --warmup 5 --steps 20 \
    --out "$OUT/pipeline.json" 2>&1 | grep -v ' INFO ' | tee -a "$OUT/suite.log"

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

log "compute: torch.compile"
timeout 150 python3 benchmarks/gpu_training.py compute --models resnet50 vit_b_16 --precisions --ckpt \
    --no-channels-last --compile-models resnet50 vit_b_16 --warmup 5 --steps 20 --compile-warmup 3 \
    --out "$OUT/compile.json" 2>&1 | grep -v ' INFO ' | tee -a "$OUT/suite.log"
log "done"
