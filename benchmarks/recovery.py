"""Recovery time after a worker failure: seconds from a kill -9 of one worker under torchrun to the first
training step completed after torchrun has restarted the group.

Each repetition starts ``torchrun --nproc-per-node=2 --max-restarts=N -m imgtrain train`` on a small
generated ImageFolder, waits until a checkpoint is published and training has gone ``--steps-after-save``
steps past it, kills the worker with RANK ``--kill-rank`` (SIGKILL), and reads metrics.jsonl: with
``training.log_interval=1`` every step is a record with a unix ``time``. The restarted trainer's
``start`` record carries a timeline of its restart (setup begins, process group formed, model and data
built, checkpoint loaded), which splits the recovery into phases. Everything before "setup begins" is
torchrun noticing the failure, stopping the survivor, the new rendezvous round, and the new workers
starting and importing torch. The run then finishes; each repetition is a fresh run.

    python benchmarks/recovery.py --repetitions 3 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench_common import command_line, default_out, machine_info, make_jpeg_folder, stats, write_result

# Phases of a recovery, each measured from the kill to the moment it ended (restarted trainer's clock).
# (The trainer's timeline also has "process_start", from psutil's create_time: Linux gives it relative to a
# boot time rounded to whole seconds, too coarse here.)
PHASES = [
    ("setup_start", "new worker imported, setup begins"),
    ("process_group_ready", "process group formed"),
    ("checkpoint_loaded", "model/data built, checkpoint loaded"),
    ("start", "training loop entered"),
    ("first_step", "first step completed"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repetitions", type=int, default=3, help="kill -9 and recover this many times")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun --max-restarts")
    p.add_argument("--kill-rank", type=int, default=1, choices=(0, 1), help="RANK of the worker killed")
    p.add_argument("--save-every", type=int, default=10, help="checkpoint.save_every_steps")
    p.add_argument("--steps-after-save", type=int, default=2, help="kill this many steps after that save")
    p.add_argument("--epochs", type=int, default=2, help="training.epochs of each run")
    p.add_argument("--images", type=int, default=200, help="training images (4 classes); global batch 8")
    p.add_argument("--image-size", type=int, default=32, help="data.image_size")
    p.add_argument("--width", type=int, default=16, help="model.width of simple_cnn")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    p.add_argument("--torchrun-arg", action="append", default=[],
                   help="extra torchrun argument, e.g. --torchrun-arg=--rdzv-conf=join_timeout=60 (repeatable)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per repetition")
    p.add_argument("--dir", default=None, help="keep the runs and their logs here (default: a temp dir)")
    p.add_argument("--out", type=Path, default=default_out("recovery"), help="result JSON")
    args = p.parse_args(argv)
    if args.repetitions < 1 or args.save_every < 1 or args.steps_after_save < 0:
        p.error("--repetitions and --save-every must be >= 1, --steps-after-save >= 0")
    if args.images < 8 * (args.save_every + args.steps_after_save + 1):
        p.error("--images too small: the kill must come before the end of the first epoch")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip().endswith("}")]


def train_args(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return ["train", "--output-dir", str(out), f"data.root={data}", "model.name=simple_cnn",
            f"model.width={args.width}", f"data.image_size={args.image_size}",
            f"data.val_resize={args.image_size}", "data.workers=0", f"training.epochs={args.epochs}",
            "training.batch_size=4", "training.warmup_epochs=0", "training.progress_bar=false",
            "training.log_interval=1", f"checkpoint.save_every_steps={args.save_every}",
            "checkpoint.keep_last_n=2"]


def torchrun_cmd(args: argparse.Namespace, train: list[str], port: int | str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--max-restarts={args.max_restarts}", *args.torchrun_arg,
            "-m", "imgtrain", *train]


def worker_with_rank(torchrun: subprocess.Popen, rank: int) -> psutil.Process | None:
    try:
        children = psutil.Process(torchrun.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in children:
        try:
            if p.environ().get("RANK") == str(rank) and "imgtrain" in p.cmdline():
                return p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def wait_for(cond, proc: subprocess.Popen, deadline: float, what: str, log: Path):
    while True:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"torchrun exited ({proc.returncode}) before {what}; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}; see {log}")
        time.sleep(0.01)


def one_repetition(i: int, args: argparse.Namespace, data: Path, work: Path) -> dict:
    out = work / f"rep{i}"
    metrics = out / "metrics.jsonl"
    log_path = work / f"rep{i}.log"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    kill_after = args.save_every + args.steps_after_save
    published = out / "checkpoints" / f"step_{args.save_every:09d}" / "manifest.json"
    deadline = time.monotonic() + args.timeout

    def steps() -> list[int]:
        return [r["step"] for r in read_metrics(metrics) if r.get("event") == "train"]

    def after_restart():
        recs = read_metrics(metrics)
        starts = [k for k, r in enumerate(recs) if r.get("event") == "start"]
        if len(starts) < 2:
            return None
        first = next((r for r in recs[starts[-1]:] if r.get("event") == "train"), None)
        return (recs[starts[-1]], first) if first else None

    with open(log_path, "w") as log:
        proc = subprocess.Popen(torchrun_cmd(args, train_args(args, data, out), free_port()), stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: published.exists() and max(steps(), default=0) >= kill_after, proc, deadline,
                     f"step {kill_after} and checkpoint {args.save_every}", log_path)
            victim = wait_for(lambda: worker_with_rank(proc, args.kill_rank), proc, deadline,
                              f"the worker with RANK={args.kill_rank}", log_path)
            killed_at = max(steps())
            t_kill = time.time()
            victim.send_signal(signal.SIGKILL)
            start, first = wait_for(after_restart, proc, deadline, "a step after the restart", log_path)
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                for p in psutil.Process(proc.pid).children(recursive=True):
                    p.kill()
                proc.kill()
                proc.wait()
    timeline = {**start.get("timeline", {}), "start": start["time"], "first_step": first["time"]}
    phases = {k: round(timeline[k] - t_kill, 3) for k, _ in PHASES if k in timeline}
    return {"repetition": i, "killed_rank": args.kill_rank, "killed_at_step": killed_at,
            "resumed_from_step": start["step"], "first_step_after_restart": first["step"],
            "recovery_s": phases["first_step"], "phases_s": phases, "torchrun_exit_code": rc,
            "log": str(log_path) if args.dir else None}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.dir:  # the runs and their logs are kept there
        work_dir = contextlib.nullcontext(str(Path(args.dir) / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}"))
    else:
        work_dir = tempfile.TemporaryDirectory(prefix="imgtrain-bench-recovery-")
    with work_dir as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_jpeg_folder(work / "data", images=args.images, classes=4, size=max(args.image_size, 16))
        print(f"imgtrain recovery: torchrun --nproc-per-node=2 --max-restarts={args.max_restarts}, kill -9 of "
              f"rank {args.kill_rank} {args.steps_after_save} steps after the checkpoint of step "
              f"{args.save_every}; {args.repetitions} repetitions", flush=True)
        reps = []
        for i in range(args.repetitions):
            r = one_repetition(i, args, data, work)
            reps.append(r)
            print(f"  repetition {i}: killed at step {r['killed_at_step']}, resumed from step "
                  f"{r['resumed_from_step']}, first step after the restart ({r['first_step_after_restart']}) "
                  f"{r['recovery_s']:.2f} s after the kill; torchrun exit code {r['torchrun_exit_code']}",
                  flush=True)
    phases = {k: stats([r["phases_s"][k] for r in reps]) for k, _ in PHASES
              if all(k in r["phases_s"] for r in reps)}
    print(f"\nseconds after the kill -9 ({args.repetitions} repetitions)")
    print(f"{'':<40}{'median':>10}{'min':>10}{'max':>10}")
    for k, label in PHASES:
        if k in phases:
            s = phases[k]
            print(f"{label:<40}{s['median']:>10.2f}{s['min']:>10.2f}{s['max']:>10.2f}")
    result = {
        "benchmark": "recovery",
        "command": command_line(),
        "torchrun_command": torchrun_cmd(args, train_args(args, Path("<data>"), Path("<run>")), "<port>"),
        "machine": {**machine_info(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "unit": "s",
        "recovery_s": stats([r["recovery_s"] for r in reps]),
        "phases_s": phases,
        "repetitions": reps,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
