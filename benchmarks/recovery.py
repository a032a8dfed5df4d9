"""Recovery time after each kind of fault of a two-node torchrun job, with torchrun's defaults and with
imgtrain's settings.

Every trial starts two torchrun agents ("nodes", one worker each, ``--nnodes=1:2``, Gloo, c10d rendezvous)
with tests/integration/elastic_nodes.py's Node on a small generated ImageFolder and a tiny model (a step
takes ~0.1-0.3 s on 2 cores, a checkpoint every ``--save-every`` steps), waits until the 2-node group has
saved a checkpoint and gone ``--steps-after-save`` steps past it, injects the fault, and reads the trainer's
metrics.jsonl: with ``training.log_interval=1`` every step is a record with a unix ``time``, and every
(re)start appends a ``start`` record whose timeline splits the recovery into its parts. Faults:

  worker     kill -9 the worker of the second (non-host) node; both agents restart the group at world 2
  node       kill -9 the second node (agent and worker); the first goes on alone
  rejoin     after "node": restart the killed node; seconds until world size 2 and a step completes
  host       kill -9 the node whose agent hosts the c10d store. defaults: plain c10d, the first agent hosts
             it (expected: the job is lost); imgtrain: a standalone ``imgtrain rendezvous-store``, every
             agent is_host=false, and the survivor's recovery is measured
  partition  two network namespaces joined by a veth pair, the link set down on the non-host side (root)
  sigterm    SIGTERM to both agents (a preempted job): seconds to the checkpoint and to the exit, then
             from the relaunch of both nodes to the first step

Settings: ``defaults`` = torchrun's rendezvous defaults (shared worker store, no --rdzv-conf) and torch's
Gloo timeout (30 min); ``imgtrain-torchrun`` = TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, elastic_nodes.RDZV_CONF
(as scripts/launch_training.sh), distributed.timeout=10 and net.ipv4.tcp_retries2=3 for the partition,
agents started with torchrun; ``imgtrain`` = the same settings with the agents started by ``imgtrain launch``
(workers forked from the agent once it has imported what they need, as scripts/launch_training.sh starts
them); ``imgtrain-forkserver`` = ``imgtrain launch --start-method forkserver`` (workers forked from a fork
server that imports torch beside the agent: what ``--nproc-per-node=gpu`` gets).
All use --max-restarts=10 (torchrun's default, 0, restarts nothing). A trial that has not recovered
after ``--cap`` seconds is recorded as "> cap"; every trial kills all its processes and namespaces.

    python benchmarks/recovery.py --faults worker,node,rejoin,host,partition,sigterm \\
        --settings defaults,imgtrain --repetitions 2 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

_TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(_TESTS / "integration"), str(_TESTS)]  # elastic_nodes and the conftest it imports

from bench_common import add_run_args, command_line, machine_info, make_jpeg_folder, record, stats  # noqa: E402

from conftest import free_port, subprocess_env  # noqa: E402
from elastic_nodes import (  # noqa: E402
    RDZV_CONF,
    Node,
    add_namespace_pair,
    cleanup_pids,
    delete_namespaces,
    events,
    ip,
    train_args,
)

FAULTS = ("worker", "node", "rejoin", "host", "partition", "sigterm")
SETTINGS = ("defaults", "imgtrain-torchrun", "imgtrain", "imgtrain-forkserver")
# Every process of a trial inherits this variable (forks of a fork server have no command line of their own).
TRIAL_ENV = "IMGTRAIN_RECOVERY_TRIAL"
# Parts of a recovery, from the timestamps: (key, label). All in seconds.
PARTS = [
    ("detect_and_rendezvous_s", "fault (or relaunch) -> new worker process start"),
    ("worker_start_s", "process start -> process group ready"),
    ("build_s", "process group ready -> model and data built"),
    ("checkpoint_load_s", "built -> checkpoint loaded"),
    ("first_step_s", "checkpoint loaded -> first step completed"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}"
    )
    p.add_argument("--repetitions", type=int, default=2, help="trials per (fault, settings)")
    p.add_argument(
        "--cap", type=float, default=120.0, help="seconds a recovery may take before it is '> cap'"
    )
    p.add_argument("--save-every", type=int, default=5, help="checkpoint.save_every_steps")
    p.add_argument(
        "--steps-after-save", type=int, default=2, help="inject the fault this many steps after a save"
    )
    p.add_argument("--images", type=int, default=96, help="training images (3 classes); global batch 8")
    add_run_args(p, "recovery")
    args = p.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [f for f in args.faults if f not in FAULTS] + [s for s in args.settings if s not in SETTINGS]
    if bad or not args.faults or not args.settings:
        p.error(
            f"unknown or missing fault/settings {bad}; faults: {', '.join(FAULTS)}; "
            f"settings: {', '.join(SETTINGS)}"
        )
    if args.repetitions < 1 or args.save_every < 1 or args.steps_after_save < 0 or args.cap <= 0:
        p.error("--repetitions, --save-every and --cap must be positive, --steps-after-save >= 0")
    return args


def boot_time_correction() -> float:
    """psutil's create_time (the trainer's timeline.process_start) counts from /proc/stat's boot time,
    which Linux rounds to whole seconds; this is what to add to get the unix time (error ~10 ms)."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return (time.time() - uptime) - psutil.boot_time()


def wait_until(predicate, timeout: float, watch: list[Node] | None = None, poll: float = 0.05):
    """predicate() until truthy; None after ``timeout`` or once every node in ``watch`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if watch and all(n.proc.poll() is not None for n in watch):
            return None
        time.sleep(poll)
    return None


class Trial:
    """One (fault, settings) repetition: its directory, data, nodes, and everything to clean up."""

    def __init__(self, args: argparse.Namespace, settings: str, work: Path, data: Path):
        self.args = args
        self.tuned = settings != "defaults"
        self.launcher = settings if settings in ("imgtrain", "imgtrain-forkserver") else "torchrun"
        os.environ[TRIAL_ENV] = str(work)  # inherited by every process the trial starts
        self.dir = work
        work.mkdir(parents=True, exist_ok=True)
        self.out = work / "run"
        self.data = data
        self.nodes: list[Node] = []
        self.store: subprocess.Popen | None = None
        self.namespaces: list[str] = []

    def train(self, partition: bool = False) -> list[str]:
        extra = [
            f"checkpoint.save_every_steps={self.args.save_every}",
            "training.epochs=40",
            "fault_tolerance.hang_timeout=600",
            "fault_tolerance.first_step_timeout=600",
        ]
        if not self.tuned:
            extra.append("distributed.timeout=1800")  # torch's default Gloo timeout (30 min)
        elif partition:
            extra.append("distributed.timeout=10")
        return [*train_args(self.data, self.out), *extra]

    def node(self, name: str, endpoint: str, **kw) -> Node:
        n = Node(
            name,
            endpoint,
            kw.pop("train", None) or self.train(),
            self.dir,
            tuned=self.tuned,
            monitor_interval=None,
            launcher=self.launcher,
            **kw,
        )
        self.nodes.append(n)
        return n

    def wait(self, predicate, timeout: float, what: str, watch: list[Node] | None = None, poll: float = 0.05):
        return wait_until(predicate, timeout, watch, poll)

    def require(self, predicate, timeout: float, what: str):
        value = self.wait(predicate, timeout, what, watch=self.nodes)
        if not value:
            logs = "\n".join(f"--- {n.name} ---\n{n.output()[-1500:]}" for n in self.nodes)
            raise RuntimeError(f"before the fault: no {what} within {timeout:.0f}s\n{logs}")
        return value

    def ready_for_fault(self, world: int = 2) -> None:
        """Wait for a group of ``world`` that has saved a checkpoint and trained --steps-after-save past it."""
        start = self.require(
            lambda: [e for e in events(self.out, "start") if e["world_size"] == world],
            180,
            f"group of world size {world}",
        )[-1]
        ckpt = self.require(
            lambda: [e for e in events(self.out, "checkpoint") if e["time"] > start["time"]],
            120,
            "checkpoint",
        )[0]
        self.require(
            lambda: (
                max((e["step"] for e in events(self.out, "train")), default=0)
                >= ckpt["step"] + self.args.steps_after_save
            ),
            60,
            "steps after the checkpoint",
        )

    def last_step_before(self, t: float) -> int:
        return max((e["step"] for e in events(self.out, "train") if e["time"] <= t), default=0)

    def cleanup(self) -> list[str]:
        cleanup_pids(self.nodes)
        if self.store is not None and self.store.poll() is None:
            self.store.kill()
            self.store.wait(timeout=10)
        delete_namespaces(self.namespaces)
        # Anything still running from this trial a few seconds later (the time to exit) is a bug of the
        # benchmark or a hung process: kill it and say so.
        deadline = time.monotonic() + 5
        while (left := self._processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        leaked = []
        for p, cmd in left:
            leaked.append(cmd[:200])
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        return leaked

    def _processes(self) -> list[tuple[psutil.Process, str]]:
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info.get("cmdline") or [])
            try:
                mine = str(self.dir) in cmd or p.environ().get(TRIAL_ENV) == str(self.dir)
            except psutil.Error:
                mine = False
            if mine:
                found.append((p, cmd))
        return found


def _all_records(run: Path) -> list[dict]:
    from conftest import read_jsonl

    path = run / "metrics.jsonl"
    try:
        return read_jsonl(path) if path.exists() else []
    except ValueError:  # a line being written
        return []


def recovered(trial: Trial, t0: float, world: int | None):
    """(start record, first train record after it) of the first restart after unix time t0 that completed
    a step (at world size ``world`` if given), else None."""
    last_start = None
    for r in _all_records(trial.out):
        if r.get("time", 0) <= t0:
            continue
        if r.get("event") == "start":
            last_start = r
        elif r.get("event") == "train" and last_start is not None:
            if world is None or last_start["world_size"] == world:
                return last_start, r
    return None


def split(t0: float, start: dict, first: dict, correction: float) -> dict:
    tl = start["timeline"]
    process_start = tl["process_start"] + correction
    return {
        "total_s": round(first["time"] - t0, 3),
        "detect_and_rendezvous_s": round(process_start - t0, 3),
        "worker_start_s": round(tl["process_group_ready"] - process_start, 3),
        "build_s": round(tl["built"] - tl["process_group_ready"], 3),
        "checkpoint_load_s": round(tl["checkpoint_loaded"] - tl["built"], 3),
        "first_step_s": round(first["time"] - tl["checkpoint_loaded"], 3),
        "world_size": start["world_size"],
        "resumed_step": start["step"],
        "first_step": first["step"],
    }


def measure(
    trial: Trial,
    t_fault: float,
    world: int | None,
    cap: float,
    watch: list[Node],
    correction: float,
    killed_at: int | None = None,
) -> dict:
    found = trial.wait(lambda: recovered(trial, t_fault, world), cap, "recovery", watch=watch)
    if not found:
        alive = [n.name for n in watch if n.proc.poll() is None]
        if alive:
            return {
                "outcome": "> cap",
                "cap_s": cap,
                "note": f"no step at world size {world} within the cap; still running: {', '.join(alive)}",
            }
        return {
            "outcome": "job lost",
            "note": "every agent exited: "
            + ", ".join(f"{n.name} exit code {n.proc.returncode}" for n in watch),
            "agents_exited_after_s": round(time.time() - t_fault, 2),
        }
    start, first = found
    r = {"outcome": "recovered", **split(t_fault, start, first, correction)}
    if killed_at is None:  # the group was stopped by the rendezvous itself (rejoin): its last step
        killed_at = trial.last_step_before(t_fault + r["detect_and_rendezvous_s"])
    r["last_step_before_fault"] = killed_at
    r["steps_redone"] = killed_at - start["step"]
    return r


# ---------------------------------------------------------------------------------------------- faults


def two_nodes(trial: Trial, endpoint: str, **kw) -> tuple[Node, Node]:
    first = trial.node("first", endpoint, **kw)
    time.sleep(1.0)  # the first agent is up (and hosts the store) before the second dials in
    second = trial.node("second", endpoint, **kw)
    return first, second


def kill_worker(node: Node) -> None:
    workers = node.workers()
    if not workers:
        raise RuntimeError(f"{node.name} has no worker to kill")
    for w in workers:
        w.send_signal(signal.SIGKILL)


def trial_worker(trial: Trial, correction: float) -> dict:
    first, second = two_nodes(trial, f"127.0.0.1:{free_port()}")
    trial.ready_for_fault()
    t = time.time()
    kill_worker(second)
    return {
        "worker": measure(trial, t, 2, trial.args.cap, [first, second], correction, trial.last_step_before(t))
    }


def trial_node(trial: Trial, correction: float, rejoin: bool) -> dict:
    endpoint = f"127.0.0.1:{free_port()}"
    first, second = two_nodes(trial, endpoint)
    trial.ready_for_fault()
    t = time.time()
    second.kill()
    res = {"node": measure(trial, t, 1, trial.args.cap, [first], correction, trial.last_step_before(t))}
    if rejoin:
        if res["node"]["outcome"] != "recovered":
            res["rejoin"] = {"outcome": "not run", "note": "the node loss itself was not survived"}
            return res
        t = time.time()
        again = trial.node("second-again", endpoint)
        r = measure(trial, t, 2, trial.args.cap, [first, again], correction)
        r["measured_from"] = "relaunch of the killed node's torchrun"
        res["rejoin"] = r
    return res


def start_store(trial: Trial) -> str:
    """A standalone ``imgtrain rendezvous-store`` on loopback for the trial (its cleanup stops it); the
    endpoint agents with is_host=false dial."""
    port = free_port()
    trial.store = subprocess.Popen(
        [sys.executable, "-m", "imgtrain", "rendezvous-store", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    if "listening" not in trial.store.stdout.readline():
        raise RuntimeError("imgtrain rendezvous-store did not start")
    return f"127.0.0.1:{port}"


def trial_host(trial: Trial, correction: float) -> dict:
    if trial.tuned:  # the store runs outside the training nodes
        first, second = two_nodes(trial, start_store(trial), is_host=False)
    else:  # plain c10d: the first agent hosts the store
        first, second = two_nodes(trial, f"127.0.0.1:{free_port()}")
    trial.ready_for_fault()
    t = time.time()
    first.kill()
    r = measure(trial, t, 1, trial.args.cap, [second], correction, trial.last_step_before(t))
    r["store"] = "standalone imgtrain rendezvous-store" if trial.tuned else "in the first agent (killed)"
    return {"host": r}


def trial_partition(trial: Trial, correction: float) -> dict:
    if shutil.which("ip") is None:
        return {"partition": {"outcome": "not run", "note": "iproute2 is not installed"}}
    ns, veth, addrs = add_namespace_pair(trial.namespaces, "rb", "10.231.9", fast_tcp_abort=trial.tuned)
    endpoint = f"{addrs[0]}:{free_port()}"
    args = trial.train(partition=True)
    host = trial.node(
        "host", endpoint, train=args, netns=ns[0], ifname=veth[0], is_host=True, local_addr=addrs[0]
    )
    time.sleep(1.0)
    other = trial.node(
        "other", endpoint, train=args, netns=ns[1], ifname=veth[1], is_host=False, local_addr=addrs[1]
    )
    trial.ready_for_fault()
    t = time.time()
    ip("-n", ns[1], "link", "set", veth[1], "down")
    r = measure(trial, t, 1, trial.args.cap, [host], correction, trial.last_step_before(t))
    r["cut_off_agent_running_at_end"] = other.proc.poll() is None
    return {"partition": r}


def trial_sigterm(trial: Trial, correction: float) -> dict:
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = two_nodes(trial, endpoint)
    trial.ready_for_fault()
    t = time.time()
    last = trial.last_step_before(t)
    for n in nodes:
        n.proc.send_signal(signal.SIGTERM)
    ckpt = trial.wait(
        lambda: [e for e in events(trial.out, "checkpoint") if e["time"] > t],
        trial.args.cap,
        "preemption checkpoint",
        watch=None,
    )
    exited = trial.wait(lambda: all(n.proc.poll() is not None for n in nodes), trial.args.cap, "exit")
    t_exit = time.time()
    r = {
        "signal_to_checkpoint_s": round(ckpt[0]["time"] - t, 3) if ckpt else None,
        "checkpoint_step": ckpt[0]["step"] if ckpt else None,
        "signal_to_exit_s": round(t_exit - t, 3) if exited else None,
        "exit_codes": [n.proc.returncode for n in nodes],
        "last_step_before_signal": last,
    }
    if not (ckpt and exited):
        return {"sigterm": {"outcome": "> cap", "cap_s": trial.args.cap, **r}}
    for n in nodes:
        n.close()
    t = time.time()
    nodes = [trial.node("first-relaunched", endpoint)]
    time.sleep(1.0)
    nodes.append(trial.node("second-relaunched", endpoint))
    m = measure(trial, t, 2, trial.args.cap, nodes, correction, last)
    m["measured_from"] = "relaunch of the first node (the second 1 s later)"
    if m["outcome"] == "recovered":
        m["total_with_preemption_s"] = round(r["signal_to_exit_s"] + m["total_s"], 3)
    return {"sigterm": {**m, **r}}


def run_trial(
    scenario: str,
    faults: list[str],
    args: argparse.Namespace,
    settings: str,
    work: Path,
    data: Path,
    correction: float,
) -> dict:
    trial = Trial(args, settings, work, data)
    try:
        if scenario == "worker":
            res = trial_worker(trial, correction)
        elif scenario == "node":
            res = trial_node(trial, correction, rejoin="rejoin" in faults)
            if "node" not in faults:
                res.pop("node")
        elif scenario == "host":
            res = trial_host(trial, correction)
        elif scenario == "partition":
            res = trial_partition(trial, correction)
        else:
            res = trial_sigterm(trial, correction)
    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
        res = {
            f: {"outcome": "error", "note": str(e)[-2000:]} for f in faults if f in _SCENARIO_FAULTS[scenario]
        }
    finally:
        leaked = trial.cleanup()
    for r in res.values():
        r["leaked_processes"] = leaked
        r["logs"] = str(work) if args.dir else None
    return res


_SCENARIO_FAULTS = {
    "worker": ("worker",),
    "node": ("node", "rejoin"),
    "host": ("host",),
    "partition": ("partition",),
    "sigterm": ("sigterm",),
}


def summarize(trials: list[dict]) -> dict:
    ok = [t for t in trials if t["outcome"] == "recovered"]
    s: dict = {"outcomes": [t["outcome"] for t in trials]}
    if ok:  # over the trials that recovered; "outcomes" says which did not
        for key in [
            "total_s",
            *(k for k, _ in PARTS),
            "steps_redone",
            "signal_to_checkpoint_s",
            "signal_to_exit_s",
            "total_with_preemption_s",
        ]:
            vals = [t[key] for t in ok if t.get(key) is not None]
            if len(vals) == len(ok):
                s[key] = stats(vals)
    return s


def fmt(s: dict, key: str) -> str:
    if key not in s:
        return "-"
    v = s[key]
    return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    correction = boot_time_correction()
    scenarios = [
        sc
        for sc in ("worker", "node", "host", "partition", "sigterm")
        if any(f in args.faults for f in _SCENARIO_FAULTS[sc])
    ]
    if args.dir:
        work_dir = contextlib.nullcontext(str(Path(args.dir) / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}"))
    else:
        work_dir = tempfile.TemporaryDirectory(prefix="imgtrain-bench-recovery-")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # subprocess_env() sets 1; kept for the record
    results: dict[str, dict[str, list[dict]]] = {f: {s: [] for s in args.settings} for f in args.faults}
    with work_dir as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = make_jpeg_folder(work / "data", images=args.images, classes=3, size=16)
        print(
            f"imgtrain recovery: faults {','.join(args.faults)}; settings {','.join(args.settings)}; "
            f"{args.repetitions} repetitions; cap {args.cap:.0f} s",
            flush=True,
        )
        for rep in range(args.repetitions):
            for sc in scenarios:
                for settings in args.settings:
                    t0 = time.time()
                    res = run_trial(
                        sc, args.faults, args, settings, work / f"{sc}-{settings}-{rep}", data, correction
                    )
                    for f, r in res.items():
                        r["repetition"] = rep
                        results[f][settings].append(r)
                        total = f"{r['total_s']:.2f} s" if "total_s" in r else ""
                        print(
                            f"  {f:<10} {settings:<18} rep {rep}: {r['outcome']} {total} "
                            f"{r.get('note', '')[:200]} (trial {time.time() - t0:.0f} s)",
                            flush=True,
                        )
    if env_threads is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    summary = {f: {s: summarize(results[f][s]) for s in args.settings} for f in args.faults}
    print(
        f"\nseconds, median (min-max) over {args.repetitions} repetitions; parts: "
        + "; ".join(f"{k[:-2]} = {label}" for k, label in PARTS)
    )
    cols = ["total_s", *(k for k, _ in PARTS), "steps_redone"]
    print(
        f"{'fault':<10}{'settings':<18}{'outcomes':<24}"
        + "".join(f"{k.removesuffix('_s'):>24}" for k in cols)
    )
    for f in args.faults:
        for s in args.settings:
            sm = summary[f][s]
            print(
                f"{f:<10}{s:<18}{','.join(sm['outcomes']):<24}" + "".join(f"{fmt(sm, k):>24}" for k in cols)
            )
    result = {
        "benchmark": "recovery",
        "command": command_line(),
        "machine": {
            **machine_info(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "imgtrain_rdzv_conf": RDZV_CONF,
        "process_start_correction_s": round(correction, 3),
        "parts": dict(PARTS),
        "unit": "s",
        "summary": summary,
        "trials": results,
    }
    record("recovery", result, args.out)
    return result


if __name__ == "__main__":
    main()
