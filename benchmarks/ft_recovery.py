"""What each kind of fault costs the survivors, for fault_tolerance.mode ``restart`` and ``replicated`` side
by side in one run (issue 19): seconds from the fault until the survivors' next committed step, and the
steps redone.

Both modes train the same tiny model on the same generated ImageFolder with two "nodes" on this machine,
one worker each (tests/integration/elastic_nodes.py's Node), every step logged (training.log_interval=1):

  restart     one elastic job of two ``imgtrain launch`` agents with benchmarks/recovery.py's "imgtrain"
              settings and measurements, both dialling a standalone ``imgtrain rendezvous-store`` (as the
              lighthouse runs outside the groups): a fault restarts every worker from the last checkpoint
              (taken every ``--save-every`` steps; the fault lands ``--steps-after-save`` steps after one).
  replicated  two replica groups, each its own single-node ``imgtrain launch``, and a torchft lighthouse
              (--heartbeat_timeout_ms 1000, as deploy/lighthouse/ ships it): the survivor goes on alone.

Faults (to the second node / replica group):

  worker     kill -9 its worker (its agent restarts it; replicated: it heals from the survivor)
  node       kill -9 the agent and its worker
  rejoin     after "node": relaunch it; seconds until *it* commits a step again, and from its process start
  hang       SIGSTOP its worker (a frozen peer: given up after the collective timeout, 10 s in both modes),
             SIGCONT once the survivors went on (replicated: seconds until it is back in the quorum)
  partition  the second node's network-namespace link down (restart: benchmarks/recovery.py's trial;
             replicated: each group on its own namespace "host", advertising its address, the lighthouse
             on the first; the link comes back after the collective timeout + 1 s)

"Steps redone" is the last step logged before the fault minus the step training resumed from: a restart
rolls back to its checkpoint, a survivor in replicated mode should never go back (0). A trial that has not
recovered after ``--cap`` seconds is "> cap"; every trial kills all its processes.

    python benchmarks/ft_recovery.py --faults worker,node,rejoin,hang,partition --repetitions 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from bench_common import add_run_args, make_jpeg_folder, record
from ft_common import (
    COLLECTIVE_TIMEOUT,
    MODES,
    Groups,
    comma_list,
    last_step,
    logs_tail,
    next_commit,
    result_head,
    resume,
    starts_after,
    suspend,
    train_records,
    wait,
    work_dir,
)
from recovery import (
    Trial,
    boot_time_correction,
    fmt,
    kill_worker,
    measure,
    start_store,
    summarize,
    trial_partition,
)

from elastic_nodes import Hosts, add_namespace_pair, delete_namespaces, train_args

FAULTS = ("worker", "node", "rejoin", "hang", "partition")
SCENARIOS = {
    "worker": ("worker",),
    "node": ("node", "rejoin"),
    "hang": ("hang",),
    "partition": ("partition",),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--repetitions", type=int, default=2, help="trials per (fault, mode)")
    p.add_argument(
        "--cap", type=float, default=120.0, help="seconds a recovery may take before it is '> cap'"
    )
    p.add_argument("--save-every", type=int, default=5, help="checkpoint.save_every_steps (both modes)")
    p.add_argument(
        "--steps-after-save",
        type=int,
        default=2,
        help="restart: inject the fault this many steps after a save; replicated: after this many steps",
    )
    p.add_argument("--images", type=int, default=96, help="training images (3 classes)")
    add_run_args(p, "ft_recovery")
    args = p.parse_args(argv)
    args.faults = comma_list(p, args.faults, FAULTS, "--faults")
    args.modes = comma_list(p, args.modes, MODES, "--modes")
    if args.repetitions < 1 or args.save_every < 1 or args.steps_after_save < 0 or args.cap <= 0:
        p.error("--repetitions, --save-every and --cap must be positive, --steps-after-save >= 0")
    return args


# ------------------------------------------------------------------------------------ restart mode


def restart_trial(scenario: str, args: argparse.Namespace, work: Path, data: Path, correction: float) -> dict:
    """benchmarks/recovery.py's trial with its "imgtrain" settings, both agents dialling a standalone
    rendezvous store (as the lighthouse of replicated mode runs outside the groups): no agent hosts it, so
    neither start order nor the loss of the first node decides the outcome."""
    if scenario == "partition":
        return _with_cleanup(Trial(args, "imgtrain", work, data), lambda t: trial_partition(t, correction))
    return _with_cleanup(
        Trial(args, "imgtrain", work, data), lambda t: _restart_fault(t, scenario, correction)
    )


def _with_cleanup(trial, fn) -> dict:
    try:
        res = fn(trial)
    finally:
        leaked = trial.cleanup()
    for r in res.values():
        r["leaked_processes"] = leaked
    return res


def _restart_fault(trial: Trial, scenario: str, correction: float) -> dict:
    endpoint = start_store(trial)
    # partition=True: distributed.timeout=COLLECTIVE_TIMEOUT, what gives up on a frozen peer (hang).
    train = trial.train(partition=True)
    assert f"distributed.timeout={COLLECTIVE_TIMEOUT}" in train
    first, second = (trial.node(n, endpoint, train=train, is_host=False) for n in ("first", "second"))
    trial.ready_for_fault()
    t = time.time()
    last = trial.last_step_before(t)
    cap = trial.args.cap
    if scenario == "worker":
        kill_worker(second)
        return {"worker": measure(trial, t, 2, cap, [first, second], correction, last)}
    if scenario == "hang":
        stopped = suspend(second)
        try:
            return {"hang": measure(trial, t, None, cap, [first, second], correction, last)}
        finally:
            resume(stopped)
    second.kill()
    res = {"node": measure(trial, t, 1, cap, [first], correction, last)}
    if "rejoin" in trial.args.faults and res["node"]["outcome"] == "recovered":
        t = time.time()
        again = trial.node("second-again", endpoint, train=train, is_host=False)
        r = measure(trial, t, 2, cap, [first, again], correction)
        r["measured_from"] = "relaunch of the killed node's imgtrain launch"
        if r["outcome"] == "recovered":  # the survivor trained alone until the restart at world 2
            wait(lambda: next_commit(trial.out, t + r["total_s"] + 2), 60)
            r["survivor_stall_s"] = job_stall(trial.out, t, t + r["total_s"] + 2)
        res["rejoin"] = r
    return res


# --------------------------------------------------------------------------------- replicated mode


def replicated_trial(
    scenario: str, args: argparse.Namespace, work: Path, correction: float, data: Path
) -> dict:
    def train(i: int) -> list[str]:
        return [
            *train_args(data, work / "run" / f"rg{i}"),
            f"checkpoint.save_every_steps={args.save_every}",
            "training.epochs=40",
            "fault_tolerance.hang_timeout=600",
            "fault_tolerance.first_step_timeout=600",
        ]

    if scenario == "partition":
        return _replicated_partition(work, train, args)
    groups = Groups(work, 2, train, args.cap)
    return _with_cleanup(groups, lambda g: _replicated_fault(g, scenario, args, correction))


def _replicated_partition(work: Path, train, args: argparse.Namespace) -> dict:
    """The groups on two hosts (network namespaces, each group advertising its address; the lighthouse on
    host 0): host 1's link goes down, as in restart mode's trial, for at least the collective timeout
    plus a second; then it comes back. Survivor: until its next committed step; the cut-off group: from the
    link's return until it commits again (healed), and whether it restarted on the way."""
    if shutil.which("ip") is None:
        return {"partition": {"outcome": "not run", "note": "iproute2 is not installed"}}
    created: list[str] = []
    try:
        hosts = Hosts(*add_namespace_pair(created, "fp", "10.231.12"), names=("", ""))
        return _with_cleanup(Groups(work, 2, train, args.cap, hosts), lambda g: _partition(g, hosts, args))
    finally:
        delete_namespaces(created)


def _partition(g: Groups, hosts: Hosts, args: argparse.Namespace) -> dict:
    g.launch()
    g.ready(args.steps_after_save + 2)
    t = time.time()
    last = last_step(g.runs[0], t)
    hosts.link(1, up=False)
    r = g.survivor_recovery(t, last)
    time.sleep(max(0.0, t + COLLECTIVE_TIMEOUT + 1 - time.time()))  # the cut outlasts the collective timeout
    t_back = time.time()
    hosts.link(1, up=True)
    r["link_down_s"] = round(t_back - t, 3)
    r["cut_off_back_after_link_up_s"] = g.back(1, t_back)
    r["cut_off_restarted"] = bool(starts_after(g.runs[1], t))
    return {"partition": r}


def _replicated_fault(g: Groups, scenario: str, args: argparse.Namespace, correction: float) -> dict:
    g.launch()
    g.ready(args.steps_after_save + 2)  # past the first step, in which the quorum forms
    victim = g.group[1]
    t = time.time()
    last = last_step(g.runs[0], t)
    if scenario == "worker":
        kill_worker(victim)
        r = g.survivor_recovery(t, last)
        r["victim_back_s"] = g.back(1, t)  # its agent restarts the worker, which heals
        return {"worker": r}
    if scenario == "hang":
        stopped = suspend(victim)
        r = g.survivor_recovery(t, last)
        t_cont = time.time()
        resume(stopped)
        r["victim_back_after_sigcont_s"] = g.back(1, t_cont)
        return {"hang": r}
    victim.kill()
    res = {"node": g.survivor_recovery(t, last)}
    if "rejoin" in args.faults and res["node"]["outcome"] == "recovered":
        t = time.time()
        at = last_step(g.runs[0], t)
        g.relaunch(1)
        rec = wait(lambda: next_commit(g.runs[1], t), args.cap, alive=[g.group[1]])
        if rec is None:
            res["rejoin"] = {"outcome": "> cap", "cap_s": args.cap, "note": logs_tail([g.group[1]], 800)}
        else:
            starts = starts_after(g.runs[1], t)
            process_start = starts[0]["timeline"]["process_start"] + correction if starts else None
            res["rejoin"] = {
                "outcome": "recovered",
                "total_s": round(rec["time"] - t, 3),
                "measured_from": "relaunch of the killed group's imgtrain launch",
                "from_process_start_s": round(rec["time"] - process_start, 3) if process_start else None,
                "survivor_step_at_relaunch": at,
                "first_step": rec["step"],
                # Healed to the survivor's step: nothing is redone, whatever its own checkpoint holds.
                "steps_redone": max(0, at - (rec["step"] - 1)),
                "survivor_stall_s": survivor_stall(g, t, rec["time"]),
            }
    if "node" not in args.faults:
        res.pop("node")
    return res


def survivor_stall(g: Groups, t: float, healed_at: float) -> float | None:
    """What a group's return costs the survivor (the quorum change and the heal)."""
    wait(lambda: next_commit(g.runs[0], healed_at + 2), 60)
    return job_stall(g.runs[0], t, healed_at + 2)


def job_stall(run: Path, t_from: float, t_to: float) -> float | None:
    """The longest gap between two of the run's steps in [t_from, t_to], less its median step: how long
    training stood still around a membership change."""
    recs = [r for r in train_records(run) if t_from <= r["time"] <= t_to]
    if len(recs) < 2:
        return None
    gaps = [b["time"] - a["time"] for a, b in zip(recs, recs[1:], strict=False)]
    return round(max(gaps) - statistics.median(r["step_s"] for r in recs), 3)


# ------------------------------------------------------------------------------ projection (docs/scaling.md)

# The failure rate the projection uses: Llama Team, AI @ Meta, "The Llama 3 Herd of Models" (arXiv:2407.21783,
# 2024), section 3.3.4: 419 unexpected interruptions in a 54-day snapshot of pre-training on 16,384 H100 GPUs.
LLAMA3_INTERRUPTIONS, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384


def _median(trials: list[dict], key: str) -> float | None:
    vals = [t[key] for t in trials if t.get("outcome") == "recovered" and t.get(key) is not None]
    return statistics.median(vals) if vals else None


def project(
    trials: dict[str, dict[str, list[dict]]],
    gpus: int = 64,
    checkpoint_interval_s: float = 600.0,
    rate_multipliers: tuple[float, ...] = (1, 10, 100),
) -> dict:
    """Expected goodput per day of a ``gpus``-GPU job in each mode, from this run's node crash and rejoin
    costs and the Llama 3 failure rate (every interruption taken as a node loss followed by its return).

    Seconds the whole job loses per fault: restart = node crash -> next step + half a checkpoint interval
    redone (on average; twice if the restart at the node's return rolled back too) + the job's stall when
    the node returns; replicated = node crash -> survivors' next step + the survivors' stall when it
    returns (nothing redone). Both modes run one node short while it is away (the same in both: left
    out)."""
    per_fault: dict[str, float | None] = {}
    for mode in ("restart", "replicated"):
        crash = _median(trials.get("node", {}).get(mode, []), "total_s")
        back = _median(trials.get("rejoin", {}).get(mode, []), "survivor_stall_s")
        per_fault[mode] = None if crash is None or back is None else crash + back
    if per_fault["restart"] is not None:
        # The crash rolls back to the last checkpoint; so does the restart at the node's return unless it
        # saved first (SIGTERM to the workers: then it redid nothing).
        redone_at_return = _median(trials.get("rejoin", {}).get("restart", []), "steps_redone") or 0
        rollbacks = 2 if redone_at_return > 0 else 1
        per_fault["restart"] += rollbacks * checkpoint_interval_s / 2
    faults_per_day = gpus * LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * LLAMA3_GPUS)
    rows = []
    for m in rate_multipliers:
        row = {"rate_multiplier": m, "faults_per_day": round(faults_per_day * m, 4)}
        for mode, cost in per_fault.items():
            row[f"{mode}_goodput"] = None if cost is None else round(1 - faults_per_day * m * cost / 86400, 6)
        rows.append(row)
    return {
        "gpus": gpus,
        "checkpoint_interval_s": checkpoint_interval_s,
        "source": f"{LLAMA3_INTERRUPTIONS} unexpected interruptions in {LLAMA3_DAYS} days on {LLAMA3_GPUS} GPUs "
        "(The Llama 3 Herd of Models, arXiv:2407.21783, section 3.3.4)",
        "lost_seconds_per_fault": {k: None if v is None else round(v, 2) for k, v in per_fault.items()},
        "rows": rows,
    }


def print_projection(p: dict) -> None:
    print(
        f"\nprojection to {p['gpus']} GPUs, checkpoint every {p['checkpoint_interval_s']:.0f} s; {p['source']}"
    )
    print("| failure rate | faults/day | restart goodput | replicated goodput |")
    print("| --- | ---: | ---: | ---: |")
    for r in p["rows"]:
        cells = [
            "-" if r[f"{m}_goodput"] is None else f"{100 * r[f'{m}_goodput']:.3f}%"
            for m in ("restart", "replicated")
        ]
        print(f"| Llama 3 x {r['rate_multiplier']:g} | {r['faults_per_day']} | {cells[0]} | {cells[1]} |")


# --------------------------------------------------------------------------------------------- main


def run(scenario: str, mode: str, args, work: Path, data: Path, correction: float) -> dict:
    try:
        if mode == "restart":
            res = restart_trial(scenario, args, work, data, correction)
        else:
            res = replicated_trial(scenario, args, work, correction, data)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        res = {
            f: {"outcome": "error", "note": str(e)[-2000:]} for f in SCENARIOS[scenario] if f in args.faults
        }
    for r in res.values():
        r["logs"] = str(work) if args.dir else None
    return res


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    correction = boot_time_correction()
    scenarios = [s for s, fs in SCENARIOS.items() if any(f in args.faults for f in fs)]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, dict[str, list[dict]]] = {f: {m: [] for m in args.modes} for f in args.faults}
    with work_dir(args, "ft_recovery") as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_jpeg_folder(work / "data", images=args.images, classes=3, size=16)
        print(
            f"imgtrain ft_recovery: faults {','.join(args.faults)}; modes {','.join(args.modes)}", flush=True
        )
        for rep in range(args.repetitions):
            for sc in scenarios:
                for mode in args.modes:  # alternated: drift of the shared machine hits both alike
                    t0 = time.time()
                    res = run(sc, mode, args, work / f"{sc}-{mode}-{rep}", data, correction)
                    for f, r in res.items():
                        if f not in args.faults:
                            continue
                        r["repetition"] = rep
                        results[f][mode].append(r)
                        total = f"{r['total_s']:.2f} s" if "total_s" in r else ""
                        print(
                            f"  {f:<10} {mode:<11} rep {rep}: {r['outcome']} {total} "
                            f"redone {r.get('steps_redone', '-')} {r.get('note', '')[:200]} "
                            f"(trial {time.time() - t0:.0f} s)",
                            flush=True,
                        )
    summary = {f: {m: summarize(results[f][m]) for m in args.modes} for f in args.faults}
    print(
        "\nseconds until the survivors' next committed step (rejoin: until the rejoined node's), median (min-max)"
    )
    print(f"{'fault':<10}{'mode':<12}{'outcomes':<28}{'total':>24}{'steps redone':>24}")
    for f in args.faults:
        for m in args.modes:
            s = summary[f][m]
            print(
                f"{f:<10}{m:<12}{','.join(s['outcomes']):<28}{fmt(s, 'total_s'):>24}{fmt(s, 'steps_redone'):>24}"
            )
    result = {
        **result_head("ft_recovery", args),
        "unit": "s",
        "summary": summary,
        "trials": results,
    }
    result["projection"] = project(results)
    print_projection(result["projection"])
    record("ft_recovery", result, args.out)
    return result


if __name__ == "__main__":
    main()
