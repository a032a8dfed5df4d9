"""Compute-only training step: imgtrain's Trainer.train_step against a torchvision-reference-style loop.

Both variants train the same torchvision model (same initial weights, copied), with SGD (momentum 0.9,
weight decay 1e-4, one parameter group), cross-entropy and fp32, on the same fixed in-memory batch:
no loader, no decoding. They differ only in the step code:

* imgtrain: ``Trainer.train_step`` of a Trainer built by ``setup()`` from a config, as ``imgtrain train``
  builds it, fed the uint8 batch its loader would yield (normalized on the device inside the step);
* reference: the loop of torchvision's references/classification/train.py (``model(image)``,
  ``criterion``, ``zero_grad``, ``backward``, ``step``, ``loss.item()``), fed the batch already
  normalized to float, as its loader yields it.

The variants alternate in rounds (the order flips every round) at each image size, in one process, so
that drift on a shared machine hits both alike. imgtrain / reference is the ratio of step times:
1.0 means imgtrain's step costs what the reference's does. Wall time follows the machine's load; the
process CPU time (with ``--threads 1``) is the load-robust measure. The script also times imgtrain's
on-device normalization against the out-of-place form it replaced, and ``--profile`` writes
torch.profiler operator tables of a few steps of each variant.

    python benchmarks/reference_step.py --model resnet18 --batch 8 --sizes 112 224 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from bench_common import (
    add_model_args,
    command_line,
    machine_info,
    make_jpeg_folder,
    make_trainer,
    print_table,
    record,
    stats,
    synthetic_batches,
)
from torch import nn


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, model="resnet18", batch=8, image_size=224)
    p.add_argument("--sizes", type=int, nargs="+", default=[112, 224], help="image sizes to compare")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs both variants once per size")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write torch.profiler operator tables of 2 steps per variant and size to this dir",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra imgtrain config override (repeatable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result here instead of the record (results/reference_step/latest.json)",
    )
    p.add_argument("--verbose", action="store_true", help="keep imgtrain's INFO logging")
    args = p.parse_args(argv)
    for k in ("batch", "steps", "rounds"):
        if getattr(args, k) < 1:
            p.error(f"--{k} must be >= 1")
    return args


class Reference:
    """torchvision references/classification/train.py's train_one_epoch step, fp32, no clipping."""

    def __init__(self, model_name: str, num_classes: int, state: dict):
        self.model = torchvision.models.get_model(model_name, weights=None, num_classes=num_classes)
        self.model.load_state_dict(state)
        self.model.train()
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step(self, image: torch.Tensor, target: torch.Tensor) -> float:
        output = self.model(image)
        loss = self.criterion(output, target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()


def timed(fn, warmup: int, steps: int) -> tuple[float, float]:
    """Median (wall, process CPU) seconds per step of ``steps`` calls after ``warmup`` untimed ones. The
    CPU time is the load-robust one with one torch thread: other processes on the cores stretch the wall
    time, not the CPU time a step needs."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def profile_table(fn, path: Path) -> None:
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            fn()
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n")
    print(f"  wrote {path}", flush=True)


def normalize_costs(trainer, batch: int, size: int, calls: int = 20) -> dict:
    """CPU ms per batch of imgtrain's DeviceNormalize against the out-of-place form it replaced, which
    allocated three batch-sized float tensors (the reference does this in its loader workers)."""
    norm = trainer.normalize
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    variants = {"device_normalize": norm, "out_of_place": lambda t: (t.float() - norm.mean) * norm.inv_std}
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(5):
        for v in variants if r % 2 == 0 else reversed(list(variants)):
            variants[v](x)
            c0 = time.process_time()
            for _ in range(calls):
                variants[v](x)
            samples[v].append((time.process_time() - c0) / calls * 1e3)
    out = {v: stats(samples[v]) for v in variants}
    print(
        f"  normalize {batch} x {size} px: DeviceNormalize {out['device_normalize']['median']:.2f} ms CPU, "
        f"out-of-place {out['out_of_place']['median']:.2f} ms CPU",
        flush=True,
    )
    return {"unit": "CPU ms per batch", **out}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="imgtrain-bench-") as tmp:
        root = make_jpeg_folder(Path(tmp) / "data", 16, size=32)
        result = benchmark(args, root, Path(tmp))
    record("reference_step", result, args.out)
    return result


def benchmark(args, root: Path, tmp: Path) -> dict:
    per_size: dict[int, dict] = {}
    print(
        f"compute-only step: {args.model}, batch {args.batch}, sizes {args.sizes}, fp32, "
        f"{torch.get_num_threads()} torch threads; {args.rounds} rounds x {args.steps} timed steps "
        f"(+{args.warmup} warm-up) per variant",
        flush=True,
    )
    setups = {}
    for size in args.sizes:
        overrides = [
            f"model.name={args.model}",
            "model.small_input=false",
            f"data.root={root}",
            f"data.image_size={size}",
            "data.workers=0",
            f"training.batch_size={args.batch}",
            "training.warmup_epochs=0",
            "training.base_lr=0.01",
            "optimization.momentum=0.9",
            "optimization.weight_decay=1e-4",
            "optimization.mixed_precision=none",
            f"output_dir={tmp / f'run{size}'}",
            *args.override,
        ]
        trainer = make_trainer(overrides, args.verbose)
        ref = Reference(args.model, trainer.data.num_classes, trainer.model_without_ddp.state_dict())
        images, labels, weights, bad = synthetic_batches(1, args.batch, size, trainer.data.num_classes)[0]
        normalized = trainer.normalize(images)  # the reference's loader yields normalized floats
        setups[size] = (
            trainer,
            overrides,
            {
                "imgtrain": lambda t=trainer, b=(images, labels, weights, bad): t.train_step(
                    [b], [len(b[1])]
                ),
                "reference": lambda r=ref, x=normalized, y=labels: r.step(x, y),
            },
        )
        per_size[size] = {
            k: [] for k in ("imgtrain", "reference", "ratio", "imgtrain_cpu", "reference_cpu", "ratio_cpu")
        }
    try:
        for r in range(args.rounds):
            for size in args.sizes:
                fns = setups[size][2]
                order = ["imgtrain", "reference"] if r % 2 == 0 else ["reference", "imgtrain"]
                row = {v: timed(fns[v], args.warmup, args.steps) for v in order}
                for v in order:
                    per_size[size][v].append(row[v][0])
                    per_size[size][f"{v}_cpu"].append(row[v][1])
                per_size[size]["ratio"].append(row["imgtrain"][0] / row["reference"][0])
                per_size[size]["ratio_cpu"].append(row["imgtrain"][1] / row["reference"][1])
                print(
                    f"  round {r + 1}/{args.rounds}, {size} px: imgtrain {row['imgtrain'][0] * 1e3:.0f} ms "
                    f"(CPU {row['imgtrain'][1] * 1e3:.0f} ms), reference {row['reference'][0] * 1e3:.0f} ms "
                    f"(CPU {row['reference'][1] * 1e3:.0f} ms), ratio {per_size[size]['ratio'][-1]:.3f} "
                    f"(CPU {per_size[size]['ratio_cpu'][-1]:.3f})",
                    flush=True,
                )
        normalize = {str(size): normalize_costs(setups[size][0], args.batch, size) for size in args.sizes}
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for size in args.sizes:
                for v, fn in setups[size][2].items():
                    profile_table(fn, args.profile / f"{v}_{size}px.txt")
    finally:
        for trainer, _, _ in setups.values():
            trainer.close()

    results = {}
    for size in args.sizes:
        s = {v: stats(per_size[size][v]) for v in ("imgtrain", "reference", "imgtrain_cpu", "reference_cpu")}
        ratio = stats(per_size[size]["ratio"])
        ratio_cpu = stats(per_size[size]["ratio_cpu"])
        base = s["reference"]["median"]
        print_table(
            f"{size} px: seconds per step (lower is better)",
            "s",
            [
                ("reference (torchvision loop)", s["reference"], "1.000 (baseline)"),
                ("imgtrain Trainer.train_step", s["imgtrain"], f"{s['imgtrain']['median'] / base:.3f}"),
            ],
        )
        print(
            f"imgtrain / reference at {size} px, median of per-round ratios: wall {ratio['median']:.3f} "
            f"(min {ratio['min']:.3f}, max {ratio['max']:.3f}), process CPU {ratio_cpu['median']:.3f} "
            f"(min {ratio_cpu['min']:.3f}, max {ratio_cpu['max']:.3f})"
        )
        results[str(size)] = {
            **s,
            "ratio_imgtrain_over_reference": ratio,
            "ratio_cpu": ratio_cpu,
            "ratio_of_medians": s["imgtrain"]["median"] / base,
        }
    return {
        "benchmark": "reference_step",
        "command": command_line(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "load_average": list(os.getloadavg()),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "sizes": args.sizes,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "imgtrain_overrides": {str(s): setups[s][1] for s in args.sizes},
        },
        "unit": "seconds per step",
        "sizes": results,
        "normalize": normalize,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
