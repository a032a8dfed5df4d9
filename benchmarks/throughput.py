"""Training images/s: synthetic in-memory batches against imgtrain's real file pipeline, side by side.

Both variants go through the same ``imgtrain.train.trainer.Trainer`` (built by ``setup()`` from a config, as
``imgtrain train`` builds it) and the same ``Trainer.train_step``: same model, optimizer, on-device
normalization and loss. They differ only in where the uint8 batches come from:

* synthetic: a few random uint8 batches held in memory and cycled (no loader, no decoding);
* real: ``trainer.data.train_loader``, i.e. ``build_data``'s DataLoader with ``--workers`` worker
  processes reading JPEGs from an ImageFolder, decoding them and applying RandomResizedCrop + flip.

A step is timed as the trainer times it: from asking for the batch to the end of the optimizer step.
The variants alternate in rounds (the order flips every round) so that drift on a shared machine
cancels out; each round of the real pipeline starts a fresh epoch, so no prefetched batches carry over
from the pause. real / synthetic is the data-loading efficiency: 1.0 means the loader keeps the model
fed. A third variant, the loader alone (no model), shows what the pipeline delivers without competing
with training for the CPU.

    python benchmarks/throughput.py --model resnet18 --batch 32 --image-size 64 --steps 6 --workers 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import (
    add_model_args,
    command_line,
    machine_info,
    make_jpeg_folder,
    make_trainer,
    print_table,
    record,
    shutdown_loader_workers,
    stats,
    synthetic_batches,
    trainer_overrides,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, model="resnet18", batch=32, image_size=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant per round")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each runs every variant once")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (data.workers)")
    p.add_argument("--prefetch", type=int, default=4, help="data.prefetch_factor")
    p.add_argument(
        "--data-root",
        default=None,
        help="an ImageFolder root with train/ and val/; default: generate JPEGs in a temp dir",
    )
    p.add_argument(
        "--images",
        type=int,
        default=512,
        help="JPEGs to generate (raised to batch*(warmup+steps) so a round reads one epoch)",
    )
    p.add_argument("--source-size", type=int, default=96, help="side of the generated JPEGs (pixels)")
    p.add_argument("--no-loader-only", action="store_true", help="skip the loader-alone variant")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra imgtrain config override, e.g. data.decode.decoder=pil (repeatable)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result here instead of the record (results/throughput/latest.json + history.jsonl)",
    )
    p.add_argument("--verbose", action="store_true", help="keep imgtrain's INFO logging")
    args = p.parse_args(argv)
    for k in ("batch", "steps", "rounds", "image_size", "source_size"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.workers < 0:
        p.error("--warmup and --workers must be >= 0")
    return args


def run_synthetic(trainer, batches, warmup: int, steps: int) -> dict:
    images = seconds = 0.0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = batches[i % len(batches)]
        trainer.train_step([batch], [len(batch[1])])
        if i >= warmup:
            seconds += time.perf_counter() - t0
            images += len(batch[1])
    return {"images_per_s": images / seconds, "seconds": seconds}


def _epochs(trainer, first_epoch: int):
    """The real training loader's batches, epoch after epoch (only a small --data-root needs more than
    one epoch per round)."""
    sampler = trainer.data.train_sampler
    epoch = first_epoch
    while True:
        sampler.state.epoch = epoch
        sampler.state.consumed = 0
        yield from trainer.data.train_loader
        epoch += 1


def run_real(trainer, epoch: int, warmup: int, steps: int, train: bool = True) -> dict:
    batches = _epochs(trainer, epoch)
    images = seconds = wait = 0.0
    try:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter() - t0
            if train:
                trainer.train_step([batch], [len(batch[1])])
            if i >= warmup:
                seconds += time.perf_counter() - t0
                wait += t_data
                images += len(batch[1])
    finally:
        batches.close()
    return {"images_per_s": images / seconds, "seconds": seconds, "data_wait_fraction": wait / seconds}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="imgtrain-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.data_root:
            root = Path(args.data_root)
            generated = None
        else:
            n_images = max(args.images, args.batch * (args.warmup + args.steps))
            t0 = time.perf_counter()
            root = make_jpeg_folder(tmp_path / "data", n_images, size=args.source_size)
            generated = {
                "train_images": n_images,
                "side_px": args.source_size,
                "format": "JPEG",
                "seconds_to_write": round(time.perf_counter() - t0, 2),
            }
        overrides = [
            *trainer_overrides(args, root, tmp_path / "run"),
            f"data.workers={args.workers}",
            f"data.prefetch_factor={args.prefetch}",
            *args.override,
        ]
        trainer = make_trainer(overrides, args.verbose)
        try:
            result = benchmark(args, trainer, overrides, root, generated)
        finally:
            shutdown_loader_workers(trainer)
            trainer.close()
    record("throughput", result, args.out)
    return result


def benchmark(args, trainer, overrides, root, generated) -> dict:
    print(
        f"imgtrain throughput: {args.model}, batch {args.batch}, {args.image_size} px, "
        f"{args.workers} loader workers, {len(trainer.data.train_set)} train images in {root}; "
        f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up) per variant",
        flush=True,
    )
    syn = synthetic_batches(
        min(args.warmup + args.steps, 8), args.batch, args.image_size, trainer.data.num_classes
    )
    run_synthetic(trainer, syn, 0, 2)  # one-time allocations, kernel selection

    variants = ["synthetic", "real"] + ([] if args.no_loader_only else ["loader_only"])
    rounds: list[dict] = []
    epoch = 0
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        row: dict = {}
        for v in order:
            if v == "synthetic":
                row[v] = run_synthetic(trainer, syn, args.warmup, args.steps)
            else:
                row[v] = run_real(trainer, epoch, args.warmup, args.steps, train=v == "real")
                epoch += 1
        row["ratio_real_over_synthetic"] = row["real"]["images_per_s"] / row["synthetic"]["images_per_s"]
        rounds.append(row)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v} {row[v]['images_per_s']:.1f} img/s" for v in variants)
            + f", real/synthetic {row['ratio_real_over_synthetic']:.3f}",
            flush=True,
        )

    per = {v: stats([row[v]["images_per_s"] for row in rounds]) for v in variants}
    ratios = stats([row["ratio_real_over_synthetic"] for row in rounds])
    wait = stats([row["real"]["data_wait_fraction"] for row in rounds])
    base = per["synthetic"]["median"]
    rows = [
        ("synthetic (in-memory uint8)", per["synthetic"], "1.000 (baseline)"),
        ("real (JPEG files, build_data)", per["real"], f"{per['real']['median'] / base:.3f}"),
    ]
    if "loader_only" in per:
        rows.append(
            ("loader alone (no model)", per["loader_only"], f"{per['loader_only']['median'] / base:.3f}")
        )
    print_table("training throughput (images/s, higher is better)", "img/s", rows)
    print(
        f"\nreal / synthetic, median of per-round ratios: {ratios['median']:.3f} "
        f"(min {ratios['min']:.3f}, max {ratios['max']:.3f}); real pipeline: training waited for data "
        f"{100 * wait['median']:.1f}% of the step time (median)"
    )

    return {
        "benchmark": "throughput",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            "model": args.model,
            "small_input": args.small_input,
            "batch": args.batch,
            "image_size": args.image_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "workers": args.workers,
            "prefetch_factor": args.prefetch,
            "data_root": None if generated else str(root),
            "generated_data": generated,
            "train_images": len(trainer.data.train_set),
            "imgtrain_overrides": overrides,
        },
        "unit": "images/s",
        "synthetic": per["synthetic"],
        "real": per["real"],
        **({"loader_only": per["loader_only"]} if "loader_only" in per else {}),
        "ratio_real_over_synthetic": ratios,
        "ratio_of_medians": per["real"]["median"] / base,
        "real_data_wait_fraction": wait,
        "rounds": rounds,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
