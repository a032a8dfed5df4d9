"""Checkpoint cost: the training-loop stall per save, async against synchronous, and the throughput a
training loop loses with a save every N steps. Both in the same run, through imgtrain's own code.

The model, optimizer (SGD with momentum, so the state holds the weights and one momentum buffer per
parameter), checkpoint manager and the components registered with it are those of an
``imgtrain.train.trainer.Trainer`` built by ``setup()`` from a config; a save is the manager's public
``CheckpointManager.save(step, blocking=...)`` (snapshot of every registered component to CPU memory;
then serialize, sha256, write, fsync and publish by rename, in the caller for a synchronous save, in the
manager's background thread for an async one). Saves are numbered by a counter of their own: only the
trainer advances its step.

1. Stall per save: saves with an idle loop, async and sync alternating. The stall is the ``stall_s``
   that ``CheckpointManager.save`` reports (the trainer writes the same to metrics.jsonl); for async
   saves, the time the background write then takes is reported too.
2. Throughput at a save interval: windows of ``--windows-saves`` x (save, ``--save-every`` training
   steps) ending with ``CheckpointManager.wait()`` (the wait the next save would pay in a longer run),
   against the same steps with no save. Training steps are ``Trainer.train_step`` on in-memory uint8
   batches, so data loading does not blur the comparison. The variants rotate order every round.

    python benchmarks/checkpoint.py --model resnet50 --image-size 32 --batch 8 --save-every 10
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
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


def train_steps(trainer, batches, n: int, counter: list[int]) -> None:
    for _ in range(n):
        batch = batches[counter[0] % len(batches)]
        trainer.train_step([batch], [len(batch[1])])
        trainer.progress.step += 1
        counter[0] += 1


def part_stall(args, trainer, names) -> dict:
    """Saves with an idle loop; async and sync alternate, the order flipping every pair."""
    async_write: list[float] = []
    stall: dict[str, list[float]] = {"async": [], "sync": []}
    for i in range(args.saves):
        for mode in ("async", "sync") if i % 2 == 0 else ("sync", "async"):
            # A new checkpoint directory per save, as in a run.
            report = trainer.checkpointer.save(next(names), blocking=mode == "sync")
            stall[mode].append(report.stall_s)
            if mode == "async":
                with Clock() as c:
                    trainer.checkpointer.wait()
                async_write.append(c.seconds)
    return {
        "async": stats(stall["async"]),
        "sync": stats(stall["sync"]),
        "async_background_write": stats(async_write),
        "source": "SaveReport.stall_s of CheckpointManager.save",
    }


def part_interval(args, trainer, batches, names) -> dict:
    n, k = args.save_every, args.window_saves
    counter = [0]
    train_steps(trainer, batches, args.warmup, counter)
    variants = ["none", "async", "sync"]
    rounds = []
    for r in range(args.rounds):
        order = variants[r % 3 :] + variants[: r % 3]
        row = {}
        for v in order:
            with Clock() as c:
                for _ in range(k):
                    if v != "none":
                        trainer.checkpointer.save(next(names), blocking=v == "sync")
                    train_steps(trainer, batches, n, counter)
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
            f"model.name={args.model}",
            f"model.small_input={str(args.small_input).lower()}",
            f"model.width={args.width}",
            f"data.root={root}",
            f"data.image_size={args.image_size}",
            "data.workers=0",
            f"training.batch_size={args.batch}",
            "training.warmup_epochs=0",
            "training.base_lr=0.01",
            "optimization.optimizer=sgd",
            "optimization.momentum=0.9",
            "checkpoint.keep_last_n=2",
            "checkpoint.save_at_epoch_end=false",
            f"checkpoint.dir={tmp_path / 'checkpoints'}",
            f"output_dir={tmp_path / 'run'}",
        ]
        trainer = make_trainer(overrides, args.verbose)
        try:
            result = benchmark(args, trainer, overrides, tmp_path)
        finally:
            trainer.close()
    record("checkpoint", result, args.out)
    return result


def benchmark(args, trainer, overrides, tmp_path: Path) -> dict:
    batches = synthetic_batches(4, args.batch, args.image_size, trainer.data.num_classes)
    counter = [0]
    train_steps(trainer, batches, 1, counter)  # creates the momentum buffers that a checkpoint holds
    fs = filesystem_of(tmp_path)
    print(
        f"imgtrain checkpoint: {args.model}, {args.image_size} px, batch {args.batch}, checkpoints on "
        f"{fs} ({tmp_path}); part 1: {args.saves} saves per mode; part 2: {args.rounds} rounds of "
        f"{args.window_saves} x (save + {args.save_every} steps) per variant",
        flush=True,
    )

    names = itertools.count(trainer.progress.step + 1)  # save numbers, increasing like a run's steps
    stall = part_stall(args, trainer, names)
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

    interval = part_interval(args, trainer, batches, names)
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
