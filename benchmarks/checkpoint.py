"""Checkpoint cost: the training-loop stall per save, async against synchronous, and the throughput a
training loop loses with a save every N steps. Both in the same run, through imgtrain's own code.

The model, optimizer (SGD with momentum, so the state holds the weights and one momentum buffer per
parameter), checkpoint manager and the components registered with it are those of an
``imgtrain.train.trainer.Trainer`` built by ``setup()`` from a config; a save is the trainer's
``save_checkpoint(blocking=...)``, which calls the manager's ``CheckpointManager.save(step, ...)``
(snapshot of every registered component to CPU memory; then serialize, sha256, write, fsync and publish
by rename, in the caller for a synchronous save, in the manager's background thread for an async one).
The steps between saves are real ones (``Trainer.run_steps``): only the trainer advances its step.

1. Stall per save: saves with one training step between them (each save a new step, as in a run),
   async and sync alternating. The stall is the ``stall_s``
   that the trainer writes to metrics.jsonl for every save ({"event": "checkpoint", ...}); for async
   saves, the time the background write then takes is reported too.
2. Throughput at a save interval: windows of ``--windows-saves`` x (save, ``--save-every`` training
   steps) ending with ``CheckpointManager.wait()`` (the wait the next save would pay in a longer run),
   against the same steps with no save. Training steps are ``Trainer.run_steps`` (the loop's own step:
   ``train_step``, counters, metrics) on in-memory uint8 batches, so data loading does not blur the
   comparison. The variants rotate order every round.

    python benchmarks/checkpoint.py --model resnet50 --image-size 32 --batch 8 --save-every 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_common import (
    Clock,
    add_model_args,
    command_line,
    machine_info,
    make_jpeg_folder,
    make_trainer,
    print_table,
    record,
    stats,
    synthetic_batches,
    trainer_overrides,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, model="resnet50", batch=8, image_size=32)
    p.add_argument("--classes", type=int, default=10, help="classes of the generated dataset (model head)")
    p.add_argument("--saves", type=int, default=5, help="part 1: saves per mode (async, sync)")
    p.add_argument("--save-every", type=int, default=10, help="part 2: training steps between saves")
    p.add_argument("--window-saves", type=int, default=1, help="part 2: saves per timed window")
    p.add_argument("--rounds", type=int, default=6, help="part 2: rounds; each runs every variant once")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before part 2")
    p.add_argument(
        "--dir",
        default=None,
        help="where checkpoints are written (a temp dir under it); default: the system temp dir",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result here instead of the record (results/checkpoint/latest.json + history.jsonl)",
    )
    p.add_argument("--verbose", action="store_true", help="keep imgtrain's INFO logging")
    args = p.parse_args(argv)
    for k in ("batch", "saves", "save_every", "window_saves", "rounds", "classes", "image_size"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def filesystem_of(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts), e.g. ext4 or tmpfs."""
    path = path.resolve()
    best, fstype = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if (
                len(parts) >= 3
                and (str(path) + "/").startswith(parts[1].rstrip("/") + "/")
                and len(parts[1]) >= len(best)
            ):
                best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def state_size(trainer) -> dict:
    """Bytes of the model's and optimizer's tensors, and of the newest checkpoint's files on disk."""
    sd = trainer.checkpointer.state_dict()
    model = sum(t.numel() * t.element_size() for t in sd["model"].values() if torch.is_tensor(t))
    opt = sum(
        t.numel() * t.element_size()
        for s in sd["optimizer"]["state"].values()
        for t in s.values()
        if torch.is_tensor(t)
    )
    out = {"model_bytes": model, "optimizer_bytes": opt}
    ckpts = trainer.checkpointer.list()
    if ckpts:  # state.pt and the rank's own file (RNG streams)
        files = json.loads((Path(ckpts[0].path) / "manifest.json").read_text())["files"]
        out["state_file_bytes"] = sum(f["bytes"] for f in files.values())
    return out


def part_stall(args, trainer, batches: Iterator) -> dict:
    """Saves with one training step between them; async and sync alternate, the order flipping every pair."""
    async_write: list[float] = []
    stall: dict[str, list[float]] = {"async": [], "sync": []}
    for i in range(args.saves):
        for mode in ("async", "sync") if i % 2 == 0 else ("sync", "async"):
            trainer.run_steps(batches, 1)  # a new step, so a new checkpoint directory per save, as in a run
            stall[mode].append(trainer.save_checkpoint(blocking=mode == "sync"))
            if mode == "async":
                with Clock() as c:
                    trainer.checkpointer.wait()
                async_write.append(c.seconds)
    return {
        "async": stats(stall["async"]),
        "sync": stats(stall["sync"]),
        "async_background_write": stats(async_write),
        "source": "the stall Trainer.save_checkpoint returns and writes to metrics.jsonl (stall_s)",
    }


def part_interval(args, trainer, batches: Iterator) -> dict:
    n, k = args.save_every, args.window_saves
    trainer.run_steps(batches, args.warmup)
    variants = ["none", "async", "sync"]
    rounds = []
    for r in range(args.rounds):
        order = variants[r % 3 :] + variants[: r % 3]
        row = {}
        for v in order:
            with Clock() as c:
                for _ in range(k):
                    if v != "none":
                        trainer.save_checkpoint(blocking=v == "sync")
                    trainer.run_steps(batches, n)
                trainer.checkpointer.wait()
            row[v] = {"steps_per_s": k * n / c.seconds, "seconds": c.seconds}
        for v in ("async", "sync"):
            row[f"{v}_over_none"] = row[v]["steps_per_s"] / row["none"]["steps_per_s"]
        rounds.append(row)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v} {row[v]['steps_per_s']:.3f} steps/s" for v in variants)
            + f"; async/none {row['async_over_none']:.3f}, sync/none {row['sync_over_none']:.3f}",
            flush=True,
        )
    per = {v: stats([row[v]["steps_per_s"] for row in rounds]) for v in variants}
    return {
        "save_every_steps": n,
        "saves_per_window": k,
        "steps_per_window": k * n,
        "steps_per_s": per,
        "async_over_none": stats([row["async_over_none"] for row in rounds]),
        "sync_over_none": stats([row["sync_over_none"] for row in rounds]),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = Path(args.dir) if args.dir else None
    if base:
        base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imgtrain-bench-ckpt-", dir=base) as tmp:
        tmp_path = Path(tmp)
        root = make_jpeg_folder(
            tmp_path / "data",
            images=2 * args.classes,
            classes=args.classes,
            size=max(args.image_size, 16),
            val_per_class=1,
        )
        overrides = [
            *trainer_overrides(args, root, tmp_path / "run"),
            "optimization.optimizer=sgd",
            "optimization.momentum=0.9",
            "checkpoint.keep_last_n=2",
            "checkpoint.save_at_epoch_end=false",
            f"checkpoint.dir={tmp_path / 'checkpoints'}",
        ]
        trainer = make_trainer(overrides, args.verbose)
        try:
            result = benchmark(args, trainer, overrides, tmp_path)
        finally:
            trainer.close()
    record("checkpoint", result, args.out)
    return result


def benchmark(args, trainer, overrides, tmp_path: Path) -> dict:
    batches = itertools.cycle(synthetic_batches(4, args.batch, args.image_size, trainer.data.num_classes))
    trainer.run_steps(batches, 1)  # creates the momentum buffers that a checkpoint holds
    fs = filesystem_of(tmp_path)
    print(
        f"imgtrain checkpoint: {args.model}, {args.image_size} px, batch {args.batch}, checkpoints on "
        f"{fs} ({tmp_path}); part 1: {args.saves} saves per mode; part 2: {args.rounds} rounds of "
        f"{args.window_saves} x (save + {args.save_every} steps) per variant",
        flush=True,
    )

    stall = part_stall(args, trainer, batches)
    size = state_size(trainer)
    mb = size.get("state_file_bytes", size["model_bytes"] + size["optimizer_bytes"]) / 1e6
    a, s = stall["async"]["median"], stall["sync"]["median"]
    print_table(
        f"stall per save ({mb:.1f} MB checkpoint: model {size['model_bytes'] / 1e6:.1f} MB + SGD "
        f"momentum {size['optimizer_bytes'] / 1e6:.1f} MB; lower is better)",
        "s",
        [
            ("sync (checkpoint.async_save=false)", stall["sync"], "1.000 (baseline)"),
            ("async (checkpoint.async_save=true)", stall["async"], f"{a / s:.3f}"),
            ("  async: background write after it", stall["async_background_write"], ""),
        ],
    )
    print(
        f"async stalls the loop {s / a:.1f}x less than sync (median stall {a * 1e3:.0f} ms vs "
        f"{s * 1e3:.0f} ms)",
        flush=True,
    )

    interval = part_interval(args, trainer, batches)
    per = interval["steps_per_s"]
    ra, rs = interval["async_over_none"]["median"], interval["sync_over_none"]["median"]
    print_table(
        f"training steps/s with a save every {args.save_every} steps (higher is better)",
        "steps/s",
        [
            ("no saves", per["none"], "1.000 (baseline)"),
            ("async save every N steps", per["async"], f"{ra:.3f} (median of per-round ratios)"),
            ("sync save every N steps", per["sync"], f"{rs:.3f} (median of per-round ratios)"),
        ],
    )
    print(
        f"throughput lost at one save per {args.save_every} steps: async {100 * (1 - ra):.1f}%, "
        f"sync {100 * (1 - rs):.1f}%"
    )

    return {
        "benchmark": "checkpoint",
        "command": command_line(),
        "machine": {**machine_info(), "checkpoint_filesystem": fs},
        "settings": {
            "model": args.model,
            "small_input": args.small_input,
            "image_size": args.image_size,
            "batch": args.batch,
            "classes": trainer.data.num_classes,
            "saves": args.saves,
            "save_every": args.save_every,
            "window_saves": args.window_saves,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "imgtrain_overrides": overrides,
        },
        "state": {**size, "megabytes": mb},
        "stall_s": stall,
        "stall_ratio_async_over_sync": a / s,
        "interval": interval,
        "throughput_lost_fraction": {"async": 1 - ra, "sync": 1 - rs},
        "finished_unix": time.time(),
    }


if __name__ == "__main__":
    main(sys.argv[1:])
