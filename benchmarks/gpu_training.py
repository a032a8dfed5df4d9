"""Training images/s on one CUDA device: mixed precision, channels_last, torch.compile, activation
checkpointing, and the real input pipeline (CPU decode vs GPU decode) against synthetic batches.

Every variant is an imgtrain ``Trainer`` set up from a config (as ``imgtrain train`` sets it up) and steps
through ``Trainer.train_step``; only the overrides differ. Times are taken between
``torch.cuda.synchronize()`` calls around the timed steps, so the GPU's queue is drained on both sides.
GPU utilization is NVML's "percent of time a kernel was running", sampled every 50 ms during the timed
steps (the figure nvidia-smi and the DCGM exporter show).

``compute``: synthetic uint8 batches that already sit on the GPU (no loader, no copy): the model's speed.

``pipeline``: ImageNet-like JPEGs (about 400x350, quality 90, cut from scikit-learn's two sample photos,
written once in parallel) read by imgtrain's real loader (``data.workers`` processes, pinned memory, the
side-stream prefetcher), decoded on the CPU (``data.decode.device=cpu``) or by nvJPEG (``data.decode.device=gpu``); the
same trainer then runs synthetic batches, so real / synthetic is the share of the model's speed the input
pipeline delivers.

    python benchmarks/gpu_training.py compute --models resnet50 vit_b_16 --precisions fp32 bf16 fp16
    python benchmarks/gpu_training.py pipeline --decode cpu gpu --workers 14
    python benchmarks/gpu_training.py decode      # nvJPEG and the GPU crop/resize of one batch, alone

On a CPU-only machine both subcommands run too (on the CPU), for a dry run with tiny settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from bench_common import (
    command_line,
    machine_info,
    make_trainer,
    record,
    shutdown_loader_workers,
    synthetic_batches,
)

from imgtrain.data.prefetch import device_batches

DEFAULT_BATCH = {"resnet50": 256, "vit_b_16": 128}


class GpuUtilSampler:
    """Mean NVML GPU utilization and the highest memory use seen while active (None without NVML)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no NVML (CPU machine, or nvidia-ml-py missing)
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __enter__(self) -> GpuUtilSampler:
        self.samples = []
        self._stop.clear()
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples), 1) if self.samples else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(trainer) -> None:
    shutdown_loader_workers(trainer)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch.compiler.reset()  # the compiled graphs of the model just released


def _base_overrides(args, model: str, batch: int, precision: str) -> list[str]:
    prec = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}[precision]
    return [
        f"model.name={model}",
        f"training.batch_size={batch}",
        f"optimization.mixed_precision={prec}",
        f"data.image_size={args.image_size}",
        f"output_dir={args.tmp}/run",
        "training.log_interval=1000000",
        "data.val_resize=null",
    ]


def time_steps(trainer, batches, warmup: int, steps: int, sampler: GpuUtilSampler) -> dict:
    device = trainer.info.device
    t0 = time.perf_counter()
    for i in range(warmup):
        b = batches[i % len(batches)]
        trainer.train_step([b], [len(b[1])])
        if i == 0:
            _sync(device)
            first = time.perf_counter() - t0
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with sampler:
        t1 = time.perf_counter()
        for i in range(steps):
            b = batches[i % len(batches)]
            trainer.train_step([b], [len(b[1])])
        _sync(device)
        seconds = time.perf_counter() - t1
    images = sum(len(batches[i % len(batches)][1]) for i in range(steps))
    out = {
        "images_per_s": round(images / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 2),
        "first_step_s": round(first, 2) if warmup else None,
        "gpu_util_pct": sampler.mean,
    }
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def compute_variants(args) -> list[dict]:
    v = []
    for m in args.models:
        for p in args.precisions:
            v.append({"model": m, "precision": p, "compile": False, "ckpt": "off", "channels_last": True})
    for m in args.models:
        for ck in args.ckpt:
            v.append(
                {
                    "model": m,
                    "precision": args.ckpt_precision,
                    "compile": False,
                    "ckpt": ck,
                    "channels_last": True,
                }
            )
    for m in args.no_channels_last:
        v.append({"model": m, "precision": "bf16", "compile": False, "ckpt": "off", "channels_last": False})
    for m in args.compile_models:
        v.append({"model": m, "precision": "bf16", "compile": True, "ckpt": "off", "channels_last": True})
    return v


def run_compute(args) -> list[dict]:
    rows = []
    sampler = GpuUtilSampler()
    for var in compute_variants(args):
        batch = args.batch or DEFAULT_BATCH.get(var["model"], 64)
        over = _base_overrides(args, var["model"], batch, var["precision"]) + [
            f"training.compile={str(var['compile']).lower()}",
            f"model.activation_checkpointing={var['ckpt']}",
            f"model.channels_last={str(var['channels_last']).lower()}",
            "data.workers=0",
        ]
        row = dict(var, batch=batch)
        try:
            trainer = make_trainer(over)
            device = trainer.info.device
            batches = [
                tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in b)
                for b in synthetic_batches(4, batch, args.image_size, trainer.data.num_classes)
            ]
            warmup = args.warmup + (args.compile_warmup if var["compile"] else 0)
            row.update(time_steps(trainer, batches, warmup, args.steps, sampler))
            _release(trainer)
        except Exception as e:  # one failing variant (e.g. OOM) must not lose the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(args, {"kind": "compute", "rows": rows})
    return rows


# ------------------------------------------------------------------------------------------ pipeline


def _write_class(job: tuple[Path, int, int, int]) -> int:
    d, c, n, seed = job
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from input_pipeline import _random_photo
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    rng = np.random.default_rng(seed * 1000 + c)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _random_photo(rng, photos).save(d / f"{i:05d}.jpg", quality=90)
    return n


def ensure_jpegs(root: Path, images: int, classes: int, procs: int) -> Path:
    done = root / "done.json"
    if done.exists() and json.loads(done.read_text()).get("images", 0) >= images:
        return root
    per = -(-images // classes)
    jobs = [(root / "train" / f"class_{c:03d}", c, per, 0) for c in range(classes)]
    jobs += [(root / "val" / f"class_{c:03d}", c, 2, 1) for c in range(classes)]
    with ProcessPoolExecutor(procs) as ex:
        list(ex.map(_write_class, jobs))
    done.write_text(json.dumps({"images": per * classes}))
    return root


def run_pipeline(args) -> list[dict]:
    t0 = time.perf_counter()
    root = ensure_jpegs(Path(args.data_dir), args.images, args.classes, args.gen_procs)
    gen_s = round(time.perf_counter() - t0, 1)
    rows = []
    sampler = GpuUtilSampler()
    for decode in args.decode:
        over = _base_overrides(args, args.model, args.batch or DEFAULT_BATCH.get(args.model, 64), "bf16") + [
            f"data.root={root}",
            f"data.workers={args.workers}",
            f"data.decode.device={decode}",
            f"data.prefetch_factor={args.prefetch}",
            "model.channels_last=true",
        ]
        row: dict = {"model": args.model, "decode": decode, "workers": args.workers, "generate_s": gen_s}
        try:
            trainer = make_trainer(over)
            device = trainer.info.device
            sampler_state = trainer.data.train_sampler.state
            sampler_state.epoch, sampler_state.consumed = 0, 0
            it = device_batches(trainer.data.train_loader, device, trainer.data.train_batch_transform)
            for _ in range(args.warmup):
                b = next(it)
                trainer.train_step([b], [len(b[1])])
            _sync(device)
            wait = images = 0.0
            with sampler:
                t1 = time.perf_counter()
                for _ in range(args.steps):
                    t = time.perf_counter()
                    b = next(it)
                    wait += time.perf_counter() - t
                    trainer.train_step([b], [len(b[1])])
                    images += len(b[1])
                _sync(device)
                seconds = time.perf_counter() - t1
            row["real"] = {
                "images_per_s": round(images / seconds, 1),
                "data_wait_fraction": round(wait / seconds, 3),
                "gpu_util_pct": sampler.mean,
            }
            if hasattr(it, "close"):  # GPU decode's prefetch thread still holds the loader's iterator
                it.close()
            del it
            shutdown_loader_workers(trainer)
            batches = [
                tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in b)
                for b in synthetic_batches(
                    4, trainer.cfg.training.batch_size, args.image_size, trainer.data.num_classes
                )
            ]
            row["synthetic"] = time_steps(trainer, batches, 3, args.steps, sampler)
            row["real_over_synthetic"] = round(
                row["real"]["images_per_s"] / row["synthetic"]["images_per_s"], 3
            )
            _release(trainer)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        _write(args, {"kind": "pipeline", "rows": rows})
    return rows


def run_decode(args) -> list[dict]:
    """nvJPEG decode of one batch, then the crop/resize/flip of the decoded images: per image (torchvision
    resized_crop + flip, the first GPU-decode implementation) against imgtrain's batched_resized_crop."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    from imgtrain.data.decode.cpu import sample_crop
    from imgtrain.data.decode.gpu import batched_resized_crop

    root = ensure_jpegs(Path(args.data_dir), args.images, args.classes, args.gen_procs)
    files = sorted((root / "train").rglob("*.jpg"))[: args.batch or 256]
    jpegs = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = args.image_size

    def per_image(imgs, params):
        out = torch.empty(len(imgs), 3, s, s, dtype=torch.uint8, device=device)
        for k, (img, (t, left, h, w, flip)) in enumerate(zip(imgs, params.tolist(), strict=True)):
            o = TF.resized_crop(img, t, left, h, w, [s, s], antialias=True)
            out[k] = o.flip(-1) if flip else o
        return out

    decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    g = torch.Generator().manual_seed(0)
    rows = []
    params = []
    for img in decoded:
        box = sample_crop(int(img.shape[-2]), int(img.shape[-1]), (0.08, 1.0))
        params.append(
            [box.top, box.left, box.height, box.width, int(torch.rand(1, generator=g).item() < 0.5)]
        )
    params = torch.tensor(params)
    variants = {
        "decode_jpeg (batch)": lambda: decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device),
        "crop+resize+flip per image": lambda: per_image(decoded, params),
        "batched_resized_crop": lambda: batched_resized_crop(list(decoded), params, s),
    }
    for name, fn in variants.items():
        for _ in range(3):
            fn()
        _sync(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - t0)
        times.sort()
        ms = 1000 * times[len(times) // 2]
        row = {
            "variant": name,
            "batch": len(jpegs),
            "median_ms": round(ms, 2),
            "images_per_s": round(len(jpegs) / ms * 1000, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    diff = (per_image(decoded, params).int() - batched_resized_crop(list(decoded), params, s).int()).abs()
    rows.append({"max_abs_difference_per_image_vs_batched": int(diff.max())})
    _write(args, {"kind": "decode", "rows": rows})
    return rows


def _write(args, payload: dict) -> None:
    """The envelope goes to --out on the lent machine; copying it to results/gpu/ is the record."""
    payload = {"command": command_line(), "machine": machine_info(), **payload}
    if torch.cuda.is_available():
        payload["gpu"] = torch.cuda.get_device_name()
        payload["torchvision"] = __import__("torchvision").__version__
    record(f"gpu_{payload['kind']}", payload, Path(args.out))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("compute", "pipeline", "decode"):
        s = sub.add_parser(name)
        s.add_argument("--image-size", type=int, default=224)
        s.add_argument(
            "--batch", type=int, default=None, help="per-step batch (default: 256 ResNet-50, 128 ViT)"
        )
        s.add_argument("--warmup", type=int, default=8)
        s.add_argument("--steps", type=int, default=30)
        s.add_argument("--out", required=True)
    c = sub.choices["compute"]
    c.add_argument("--models", nargs="+", default=["resnet50", "vit_b_16"])
    c.add_argument(
        "--precisions", nargs="*", default=["fp32", "bf16", "fp16"], choices=["fp32", "bf16", "fp16"]
    )
    c.add_argument("--ckpt", nargs="*", default=["block", "stage"], help="activation checkpointing variants")
    c.add_argument("--ckpt-precision", default="bf16")
    c.add_argument("--no-channels-last", nargs="*", default=["resnet50"], help="models also run without it")
    c.add_argument("--compile-models", nargs="*", default=[], help="models also run with torch.compile")
    c.add_argument("--compile-warmup", type=int, default=4, help="extra warm-up steps when compiled")
    q = sub.choices["pipeline"]
    q.add_argument("--model", default="resnet50")
    q.add_argument("--decode", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    q.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    q.add_argument("--prefetch", type=int, default=4)
    for q in (sub.choices["pipeline"], sub.choices["decode"]):
        q.add_argument("--images", type=int, default=8192)
        q.add_argument("--classes", type=int, default=32)
        q.add_argument("--gen-procs", type=int, default=os.cpu_count() or 2)
        q.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "imgtrain-gpu-bench-jpegs"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="imgtrain-gpu-bench-") as tmp:
        args.tmp = tmp
        {"compute": run_compute, "pipeline": run_pipeline, "decode": run_decode}[args.cmd](args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
