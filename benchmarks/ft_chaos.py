"""Goodput under chaos (issue 19): 2-3 "nodes" train for ``--minutes`` per mode while a seeded fault of a
random kind hits one of them every ``--fault-every`` seconds, for fault_tolerance.mode ``restart`` and
``replicated`` in the same run, under the same fault schedule.

  restart     one elastic job (``imgtrain launch --nnodes=1:N``, a standalone rendezvous store): every
              fault restarts all workers from the last checkpoint (``--save-interval`` seconds apart).
  replicated  N replica groups and a torchft lighthouse (ft_common.py): the others go on, the victim heals.

Faults (kind and victim drawn from ``--seed``; the victim among the nodes up at that moment, and never the
last one up): ``worker`` kill -9 its worker (its agent restarts it), ``node`` kill -9 the agent and worker,
relaunched ``--rejoin-after`` seconds later, ``hang`` SIGSTOP its worker for ``--hang-for`` seconds. Every
fault is logged with its time. (Partitions are left out: see ft_recovery.py.)

    goodput = steps that advanced the model x fault-free step time / wall time

steps that advanced the model: from the first completed step to the end of the window, the highest step
reached (a step rolled back and done again counts once; records of the same step from several groups
once); wall time: from the first completed step to the end of the window; fault-free step time: the mode's
own wall seconds between the model's consecutive steps, averaged over those under 3x their median (what
a fault-free run pays per step stays in: the quorum, logging, evaluation, checkpoints; a fault's stall
drops out), so that a run without faults scores 1.0. The
median of the per-step ``step_s`` records (the definition before 2026-12-06, ``goodput_step_s``) leaves
those out: a fault-free replicated run scored 0.81 with it. Also: the raw steps of both modes (``steps_advanced``), the final accuracy (the last
evaluation, at an epoch end), restarts, steps redone (rolled back). Checkpoints are every
``--save-interval`` seconds in both modes (not also at each epoch end: an epoch here is ~10 s). On one
machine the nodes share its cores, so a node that is down speeds the others up: compare the two modes of
one run only.

    python benchmarks/ft_chaos.py --minutes 10 --nodes 3 --fault-every 60 --seed 0    # the record
    python benchmarks/ft_chaos.py --minutes 1 --fault-every 20 --out /tmp/smoke.json  # a smoke test
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

from bench_common import add_run_args, make_jpeg_folder, record
from ft_common import (
    COLLECTIVE_TIMEOUT,
    MODES,
    Groups,
    comma_list,
    next_commit,
    records,
    result_head,
    resume,
    starts_after,
    suspend,
    train_records,
    work_dir,
)
from recovery import Trial, kill_worker, start_store

from elastic_nodes import Node, train_args

KINDS = ("worker", "node", "hang")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10.0, help="training time per mode (the issue: >= 10)")
    p.add_argument("--nodes", type=int, default=3, choices=(2, 3), help="nodes / replica groups")
    p.add_argument("--fault-every", type=float, default=60.0, help="seconds between faults")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    p.add_argument("--seed", type=int, default=0, help="draws the faults' kinds and victims")
    p.add_argument("--rejoin-after", type=float, default=15.0, help="seconds before a killed node returns")
    p.add_argument("--hang-for", type=float, default=20.0, help="seconds a hung worker stays stopped")
    p.add_argument(
        "--save-interval",
        type=float,
        default=10.0,
        help="checkpoint.save_interval, both modes: restart mode rolls back to the last one (the record "
        "before 2026-12-06 said 60 but saved at every ~9 s epoch end; 60 with a fault every 60 s leaves restart "
        "mode a checkpoint only when a node returns)",
    )
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--images", type=int, default=384, help="training images (3 classes)")
    add_run_args(p, "ft_chaos")
    args = p.parse_args(argv)
    args.kinds = comma_list(p, args.kinds, KINDS, "--kinds")
    args.modes = comma_list(p, args.modes, MODES, "--modes")
    if min(args.minutes, args.fault_every, args.rejoin_after, args.hang_for, args.save_interval) <= 0:
        p.error("--minutes, --fault-every, --rejoin-after, --hang-for and --save-interval must be positive")
    return args


def schedule(args: argparse.Namespace) -> list[tuple[float, str, float]]:
    """(seconds after the first step, kind, a draw in [0, 1) that picks the victim among the nodes up):
    the same list for both modes."""
    rng = random.Random(args.seed)
    n = int(args.minutes * 60 // args.fault_every)
    return [((k + 1) * args.fault_every, rng.choice(args.kinds), rng.random()) for k in range(n)]


def train(args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    return [
        *train_args(data, out),
        "checkpoint.save_every_steps=null",
        "checkpoint.save_at_epoch_end=false",  # else an epoch end (every ~10 s here) saves, not the interval
        f"checkpoint.save_interval={args.save_interval}",
        "training.epochs=10000",  # the window ends the run, not the schedule
        f"distributed.timeout={COLLECTIVE_TIMEOUT}",
        "fault_tolerance.hang_timeout=600",
        "fault_tolerance.first_step_timeout=600",
    ]


class Chaos:
    """The nodes of one mode and the faults done to them. ``nodes[i]`` is node i's current process."""

    def __init__(self, args: argparse.Namespace, mode: str, work: Path, data: Path):
        self.args, self.mode, self.work = args, mode, work
        self.pending: list[tuple[float, str, int, object]] = []  # (when, "rejoin" | "resume", node, what)
        self.log: list[dict] = []
        self.down: set[int] = set()  # killed or stopped, and not yet training again: never a victim
        self.returning: dict[int, float] = {}  # relaunched or resumed at (unix time), not yet training
        if mode == "replicated":
            self.groups = Groups(work, args.nodes, lambda i: train(args, data, work / "run" / f"rg{i}"), 120)
            self.runs = self.groups.runs
            self.trial = None
        else:
            self.trial = Trial(
                argparse.Namespace(cap=120, save_every=1, steps_after_save=0), "imgtrain", work, data
            )
            self.runs = [self.trial.out]
            self.groups = None
        self.nodes: list[Node] = []

    def launch(self) -> None:
        if self.groups is not None:
            self.groups.launch()
            self.nodes = self.groups.group
            return
        self.endpoint = start_store(self.trial)
        self.nodes = [self.restart_node(i) for i in range(self.args.nodes)]

    def restart_node(self, i: int, suffix: str = "") -> Node:
        node = self.trial.node(
            f"node{i}{suffix}",
            self.endpoint,
            train=train(self.args, self.trial.data, self.trial.out),
            is_host=False,
            nnodes=f"1:{self.args.nodes}",
        )
        return node

    def relaunch(self, i: int) -> None:
        if self.groups is not None:
            self.nodes[i] = self.groups.relaunch(i)
        else:
            self.nodes[i] = self.restart_node(i, f"-{len(self.trial.nodes)}")

    def first_step_time(self, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            times = [r["time"] for run in self.runs for r in train_records(run)]
            if times:
                return min(times)
            time.sleep(0.2)
        raise RuntimeError(f"{self.mode}: no step within {timeout:.0f} s")

    def inject(self, kind: str, draw: float, t0: float) -> None:
        up = [i for i in range(self.args.nodes) if i not in self.down]
        entry = {"at_s": round(time.time() - t0, 2), "kind": kind}
        if len(up) < 2:
            self.log.append({**entry, "skipped": "only one node up"})
            return
        victim = up[int(draw * len(up))]
        entry["node"] = victim
        try:
            if kind == "worker":
                kill_worker(self.nodes[victim])
            elif kind == "node":
                self.nodes[victim].kill()
                self.down.add(victim)
                self.pending.append((time.time() + self.args.rejoin_after, "rejoin", victim, None))
            else:
                stopped = suspend(self.nodes[victim])
                self.down.add(victim)
                self.pending.append((time.time() + self.args.hang_for, "resume", victim, stopped))
        except RuntimeError as e:  # e.g. no worker at that moment (it is restarting)
            entry["skipped"] = str(e)
        self.log.append(entry)

    def due(self, t0: float) -> None:
        now = time.time()
        for item in [p for p in self.pending if p[0] <= now]:
            self.pending.remove(item)
            _, what, i, stopped = item
            if what == "rejoin":
                self.relaunch(i)
            else:
                resume(stopped)
            self.returning[i] = now
            self.log.append({"at_s": round(now - t0, 2), "kind": what, "node": i})
        for i, since in list(self.returning.items()):
            if self.trains_again(i, since):
                del self.returning[i]
                self.down.discard(i)
                self.log.append({"at_s": round(time.time() - t0, 2), "kind": "back", "node": i})

    def trains_again(self, i: int, since: float) -> bool:
        """Node ``i``, relaunched or resumed at ``since``, takes part in training again: its replica group
        committed a step, or (restart) the job restarted with every node that is not down."""
        if self.groups is not None:
            return next_commit(self.runs[i], since) is not None
        expected = self.args.nodes - len(self.down - {i})
        return any(s["world_size"] >= expected for s in starts_after(self.runs[0], since))

    def cleanup(self) -> list[str]:
        for _, what, _, stopped in self.pending:
            if what == "resume":
                resume(stopped)
        return self.groups.cleanup() if self.groups is not None else self.trial.cleanup()


def fault_free_seconds_per_step(recs: list[dict]) -> float:
    """Wall seconds per step of the model when no fault holds it up: the times between the model's
    consecutive steps (the first record of each new highest step, any run), averaged over those shorter
    than 3x their median. What a fault-free run pays per step is kept (the quorum, logging, evaluation,
    checkpoints); a fault's stall, a restart and its redone steps are one long gap and drop out. Taken
    over the whole window, so that a shared machine's load weighs on it as on the run."""
    firsts, top = [], 0
    for r in sorted(recs, key=lambda r: r["time"]):
        if r["step"] > top:
            firsts.append((r["time"], r["step"] - top))
            top = r["step"]
    gaps = [(b[0] - a[0]) / b[1] for a, b in zip(firsts, firsts[1:], strict=False)]
    if not gaps:
        return float("nan")
    usual = [g for g in gaps if g < 3 * statistics.median(gaps)]
    return statistics.fmean(usual)


def outcome(chaos: Chaos, t0: float, t_end: float) -> dict:
    """Goodput and the rest from the runs' records up to ``t_end``."""
    recs = [
        {**r, "run": i} for i, run in enumerate(chaos.runs) for r in train_records(run) if r["time"] <= t_end
    ]
    steps = max((r["step"] for r in recs), default=0)
    step_s = statistics.median(r["step_s"] for r in recs) if recs else float("nan")
    wall = t_end - t0
    advanced = steps - max((r["step"] for r in recs if r["time"] <= t0), default=0)
    fault_free_step = fault_free_seconds_per_step(recs)
    starts = [s for run in chaos.runs for s in records(run, "start") if s.get("time", 0) > t0]
    # Steps done again: whenever the model's step (the highest any run logged) is trained again from a lower
    # one (a restart from a checkpoint, or every replica group lost at once); a group that heals jumps to
    # its peers' step and redoes nothing. Records of the same step from several groups are not redos, nor is
    # a thawed group's late record of the step it had committed before it froze: only a run that goes
    # back on its own steps starts a redo.
    frontier, pos, redone = 0, None, 0
    last: dict[int, int] = {}
    for r in sorted(recs, key=lambda r: r["time"]):
        step = r["step"]
        went_back = step <= last.get(r["run"], 0)
        last[r["run"]] = step
        if step > frontier:
            frontier, pos = step, None
        elif pos is None:
            if step < frontier and went_back:
                redone += frontier - step + 1
                pos = step
        elif step < pos:  # rolled back again while redoing
            redone += pos - step + 1
            pos = step
        else:
            pos = max(pos, step)
    evals = sorted(
        (e for run in chaos.runs for e in records(run, "eval") if e["time"] <= t_end), key=lambda e: e["time"]
    )
    return {
        "goodput": round(advanced * fault_free_step / wall, 4) if recs else 0.0,
        "goodput_step_s": round(steps * step_s / wall, 4) if recs else 0.0,
        "steps_advanced": steps,
        "fault_free_s_per_step": round(fault_free_step, 4),
        "step_s": {"median": step_s},
        "wall_s": round(wall, 1),
        "restarts": len(starts) if chaos.mode == "restart" else None,
        "process_starts_after_first_step": len(starts),
        "steps_redone": redone,
        "val_top1": evals[-1]["val_top1"] if evals else None,
        "val_top1_at_step": evals[-1]["step"] if evals else None,
    }


def run_mode(args: argparse.Namespace, mode: str, work: Path, data: Path, plan) -> dict:
    chaos = Chaos(args, mode, work, data)
    try:
        chaos.launch()
        t0 = chaos.first_step_time()
        end = t0 + args.minutes * 60
        faults = list(plan)
        while time.time() < end:
            if faults and time.time() - t0 >= faults[0][0]:
                _, kind, draw = faults.pop(0)
                chaos.inject(kind, draw, t0)
                print(f"  {mode:<11} {chaos.log[-1]}", flush=True)
            chaos.due(t0)
            time.sleep(0.1)
        result = outcome(chaos, t0, end)
    finally:
        leaked = chaos.cleanup()
    return {
        **result,
        "faults": chaos.log,
        "leaked_processes": leaked,
        "logs": str(work) if args.dir else None,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = schedule(args)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    modes: dict[str, dict] = {}
    with work_dir(args, "ft_chaos") as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_jpeg_folder(work / "data", images=args.images, classes=3, size=16)
        print(
            f"imgtrain ft_chaos: {args.nodes} nodes, {args.minutes:g} min per mode, a fault every "
            f"{args.fault_every:g} s ({len(plan)} faults, seed {args.seed}), modes {','.join(args.modes)}",
            flush=True,
        )
        for mode in args.modes:
            try:
                modes[mode] = run_mode(args, mode, work / mode, data, plan)
            except (RuntimeError, OSError) as e:
                modes[mode] = {"outcome": "error", "note": str(e)[-2000:]}
            print(
                f"{mode}: "
                + ", ".join(f"{k} {v}" for k, v in modes[mode].items() if k not in ("faults", "logs"))
            )
    ratio = steps_ratio = None
    if all(isinstance(modes.get(m, {}).get("goodput"), float) for m in MODES) and modes["restart"]["goodput"]:
        ratio = round(modes["replicated"]["goodput"] / modes["restart"]["goodput"], 3)
        # Each mode's goodput is against its own fault-free speed; the steps compare the speeds themselves.
        steps_ratio = round(
            modes["replicated"]["steps_advanced"] / max(1, modes["restart"]["steps_advanced"]), 3
        )
        print(f"goodput replicated / restart: {ratio}; steps advanced replicated / restart: {steps_ratio}")
    result = {
        **result_head("ft_chaos", args),
        "schedule": [{"at_s": t, "kind": k} for t, k, _ in plan],
        "modes": modes,
        "goodput_ratio_replicated_over_restart": ratio,
        "steps_ratio_replicated_over_restart": steps_ratio,
    }
    record("ft_chaos", result, args.out)
    return result


if __name__ == "__main__":
    main()
