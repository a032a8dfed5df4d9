"""The cost of watching: training images/s with monitoring off and with Prometheus metrics on, side by side.

Each variant is an imgtrain ``Trainer`` built by ``setup()`` from the same config except
``monitoring.prometheus.enabled`` and stepped by ``Trainer.run_steps``, the training loop's own per-step
path: ``train_step`` (with the metrics variant's step-phase marks and gradient hooks), the step counter,
the metrics processor's per-step call (with metrics on: gauges, and every ``--straggler-interval`` steps
the straggler check) and every ``--log-interval`` steps the window's record (the all-reduce of its sums,
the metrics.jsonl record and, with metrics on, the Prometheus record). Batches are synthetic uint8
tensors held in memory, so that loader noise does not drown a sub-percent difference. With metrics on, a
thread scrapes the endpoint every ``--scrape-interval`` seconds (default 1 s, 15x Prometheus's default
rate) so that the cost of serving, including the psutil readings, is in the number.

Variants alternate in rounds (the order flips every round); the result is the ratio of medians and the
median of per-round ratios. ``--profiler`` adds a variant with torch.profiler on (metrics off), stepped
as ``Trainer.train`` steps it: started before the round, ``step()`` after every optimizer step, stopped
after it, on a continuous schedule (1 warm-up + 3 active steps, repeated), so every timed step is
profiled or warming up and the Chrome traces are written to disk as in a real profiled run.

    python benchmarks/monitoring_overhead.py --model resnet18 --batch 32 --image-size 32 --steps 30 --rounds 6
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import threading
import time
import urllib.request
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
    shutdown_loader_workers,
    stats,
    synthetic_batches,
    trainer_overrides,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_model_args(p, model="resnet18", batch=32, image_size=32)
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant per round")
    p.add_argument("--rounds", type=int, default=6, help="rounds; each runs every variant once")
    p.add_argument("--log-interval", type=int, default=10, help="training.log_interval")
    p.add_argument(
        "--straggler-interval", type=int, default=50, help="monitoring.prometheus.straggler_interval"
    )
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between scrapes (0: none)")
    p.add_argument(
        "--control",
        action="store_true",
        help="add an A/A control: a second trainer with monitoring off, to show the noise between instances",
    )
    p.add_argument(
        "--profiler", action="store_true", help="add a variant with torch.profiler on (traces written)"
    )
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only the metrics work per step measured alone, against one run of --steps steps with metrics off",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result here instead of the record (results/monitoring_overhead/latest.json + history.jsonl)",
    )
    p.add_argument("--verbose", action="store_true", help="keep imgtrain's INFO logging")
    args = p.parse_args(argv)
    for k in ("batch", "steps", "rounds", "log_interval", "straggler_interval"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


def run_steps(trainer, batches: list, warmup: int, steps: int) -> dict:
    """``steps`` timed optimizer steps (after ``warmup``) through the trainer's own per-step path."""
    it = itertools.cycle(batches)
    trainer.profiler.start(trainer.info.rank)  # no-op unless profiler.enabled
    trainer.run_steps(it, warmup)
    with Clock() as clock:
        trainer.run_steps(it, steps)
    trainer.profiler.stop()
    return {"images_per_s": steps * trainer.global_batch / clock.seconds, "seconds": clock.seconds}


def metrics_seconds_per_step(trainer, reps: int = 2000) -> float:
    """Host time of the metrics work of one step, measured alone (no model): the phase marks, one
    gradient-hook body per parameter, ``on_step`` (with its straggler check every N steps) and the
    Prometheus record every ``log_interval`` steps. Autograd's cost of calling a Python hook (about a
    microsecond per parameter) is not in it; the side-by-side images/s includes everything."""
    m = trainer.metrics
    params = [p for p in trainer.model_without_ddp.parameters() if p.requires_grad]
    record = {
        "event": "train",
        "step": 0,
        "epoch": 1,
        "loss": 1.0,
        "train_top1": 50.0,
        "lr": 0.1,
        "images_per_s": 100.0,
        "step_s": 0.1,
        "data_wait_s": 0.0,
        "bad_images": 0,
    }
    step0 = trainer.progress.step
    t0 = time.perf_counter()
    for i in range(reps):
        m.timer.begin()
        for p in params:
            m.timer._grad_ready(p)
        m.timer.backward_done()
        m.timer.end()
        m.on_step(step0 + i + 1, 0.0)
        if (i + 1) % trainer.cfg.training.log_interval == 0:
            m.log(record)
    return (time.perf_counter() - t0) / reps


def _scraper(port: int, interval: float, stop: threading.Event, scrapes: list[float]) -> None:
    """Scrapes like Prometheus; records each scrape's wall time (the exporter's work happens in it)."""
    while not stop.wait(interval):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            r.read()
        scrapes.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="imgtrain-bench-") as tmp:
        tmp_path = Path(tmp)
        # A tiny real ImageFolder only so that setup() finds classes; the timed steps use in-memory batches.
        root = make_jpeg_folder(tmp_path / "data", 16, size=args.image_size)
        common = [f"training.log_interval={args.log_interval}"]
        variants = {
            "off": [*trainer_overrides(args, root, tmp_path / "off"), *common],
            "metrics": [
                *trainer_overrides(args, root, tmp_path / "metrics"),
                *common,
                "monitoring.prometheus.enabled=true",
                "monitoring.prometheus.port=0",
                "monitoring.prometheus.linger_s=0",
                f"monitoring.prometheus.straggler_interval={args.straggler_interval}",
            ],
        }
        if args.control:  # a second, identical trainer with monitoring off: the A/A noise floor
            variants["off_again"] = [*trainer_overrides(args, root, tmp_path / "off_again"), *common]
        if args.profiler:
            variants["profiler"] = [
                *trainer_overrides(args, root, tmp_path / "profiler"),
                *common,
                "profiler.enabled=true",
                "profiler.wait=0",
                "profiler.warmup=1",
                "profiler.active=3",
                "profiler.repeat=0",
            ]
        trainers = {}
        stop, scrapes = threading.Event(), []
        try:
            for name, ov in variants.items():
                torch.manual_seed(0)
                trainers[name] = make_trainer(ov, args.verbose)
            if args.scrape_interval > 0:
                threading.Thread(
                    target=_scraper,
                    args=(trainers["metrics"].metrics.port, args.scrape_interval, stop, scrapes),
                    daemon=True,
                ).start()
            result = (
                cost_only(args, trainers, variants) if args.cost_only else benchmark(args, trainers, variants)
            )
        finally:
            stop.set()
            for t in trainers.values():
                shutdown_loader_workers(t)
                t.close()
    result["scrapes"] = len(scrapes)
    if scrapes:
        result["scrape_seconds"] = stats(scrapes)
        print(
            f"{len(scrapes)} scrapes, median {1e3 * result['scrape_seconds']['median']:.1f} ms each (wall time, "
            f"client side)"
        )
    record("monitoring_overhead", result, args.out)
    return result


def cost_only(args, trainers: dict, variants: dict) -> dict:
    batches = synthetic_batches(4, args.batch, args.image_size, trainers["off"].data.num_classes)
    off = run_steps(trainers["off"], batches, args.warmup, args.steps)
    step_s = args.batch / off["images_per_s"]
    cost = metrics_seconds_per_step(trainers["metrics"])
    params = sum(1 for p in trainers["metrics"].model_without_ddp.parameters() if p.requires_grad)
    print(
        f"{args.model} ({params} parameter tensors): metrics work per step, measured alone: {1e6 * cost:.1f} us "
        f"= {100 * cost / step_s:.3f}% of a step with monitoring off ({1e3 * step_s:.1f} ms, mean of {args.steps})"
    )
    return {
        "benchmark": "monitoring_overhead",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "image_size": args.image_size,
            "steps": args.steps,
            "log_interval": args.log_interval,
            "straggler_interval": args.straggler_interval,
            "parameter_tensors": params,
            "imgtrain_overrides": variants,
        },
        "off_step_seconds": step_s,
        "metrics_seconds_per_step_alone": cost,
        "metrics_share_of_off_step": cost / step_s,
    }


def benchmark(args, trainers: dict, variants: dict) -> dict:
    first = next(iter(trainers.values()))
    print(
        f"imgtrain monitoring overhead: {args.model}, batch {args.batch}, {args.image_size} px, synthetic "
        f"batches; {args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up) per variant; "
        f"scrape every {args.scrape_interval}s",
        flush=True,
    )
    batches = synthetic_batches(4, args.batch, args.image_size, first.data.num_classes)
    for t in trainers.values():
        run_steps(t, batches, 0, 2)  # one-time allocations
    names = list(trainers)
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        row = {v: run_steps(trainers[v], batches, args.warmup, args.steps) for v in order}
        for v in names[1:]:
            row[f"ratio_{v}_over_off"] = row[v]["images_per_s"] / row["off"]["images_per_s"]
        rounds.append(row)
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v} {row[v]['images_per_s']:.1f} img/s" for v in names),
            flush=True,
        )
    per = {v: stats([row[v]["images_per_s"] for row in rounds]) for v in names}
    cost = metrics_seconds_per_step(trainers["metrics"])
    step_s = args.batch / per["off"]["median"]
    ratios = {v: stats([row[f"ratio_{v}_over_off"] for row in rounds]) for v in names[1:]}
    base = per["off"]["median"]
    print_table(
        "training throughput (images/s, higher is better)",
        "img/s",
        [("monitoring off", per["off"], "1.000 (baseline)")]
        + [(v, per[v], f"{per[v]['median'] / base:.4f}") for v in names[1:]],
    )
    for v, s in ratios.items():
        print(
            f"\n{v} / off, median of per-round ratios: {s['median']:.4f} (min {s['min']:.4f}, max {s['max']:.4f});"
            f" cost {100 * (1 - s['median']):.2f}%"
        )
    print(
        f"\nmetrics work per step, measured alone: {1e6 * cost:.1f} us = {100 * cost / step_s:.3f}% of the "
        f"median step with monitoring off ({1e3 * step_s:.1f} ms)"
    )
    return {
        "benchmark": "monitoring_overhead",
        "command": command_line(),
        "machine": machine_info(),
        "settings": {
            "model": args.model,
            "batch": args.batch,
            "image_size": args.image_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "log_interval": args.log_interval,
            "straggler_interval": args.straggler_interval,
            "scrape_interval": args.scrape_interval,
            "imgtrain_overrides": variants,
        },
        "unit": "images/s",
        **per,
        "ratio_of_medians": {v: per[v]["median"] / base for v in names[1:]},
        "ratio_per_round": ratios,
        "metrics_seconds_per_step_alone": cost,
        "metrics_share_of_off_step": cost / step_s,
        "rounds": rounds,
    }


if __name__ == "__main__":
    main()
