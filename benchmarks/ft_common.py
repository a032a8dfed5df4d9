"""Shared by ft_recovery.py and ft_chaos.py: the processes of a trial on this machine (the torchft
lighthouse, the replica groups of ``fault_tolerance.mode=replicated``, the elastic nodes of the default
``restart`` mode), the faults they suffer, and what their metrics.jsonl says about committed steps.

Both modes get the same timeouts, so that they are compared on what they do after a fault, not on their
settings: a frozen peer is given up after ``COLLECTIVE_TIMEOUT`` seconds (``distributed.timeout`` in
restart mode, ``fault_tolerance.replicated.collective_timeout`` in replicated mode), and the lighthouse
drops a silent group after ``HEARTBEAT_MS`` (deploy/lighthouse/ ships the same value).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

_TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(_TESTS / "integration"), str(_TESTS)]  # elastic_nodes and the conftest it imports

from bench_common import command_line, machine_info  # noqa: E402
from recovery import wait_until  # noqa: E402

from conftest import free_port  # noqa: E402
from elastic_nodes import Hosts, Node, cleanup_pids, events  # noqa: E402

MODES = ("restart", "replicated")
COLLECTIVE_TIMEOUT = 10
HEARTBEAT_MS = 1000


def comma_list(p: argparse.ArgumentParser, text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """``a,b`` -> [a, b], each one of ``allowed`` (else the usage error names the culprit, exit 2)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        p.error(f"{option}: unknown or missing {bad or text!r}; of {', '.join(allowed)}")
    return items


def work_dir(args: argparse.Namespace, name: str):
    """A context manager giving the trial directory: under --dir (kept), else a temporary one."""
    if args.dir:
        return contextlib.nullcontext(str(Path(args.dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    return tempfile.TemporaryDirectory(prefix=f"imgtrain-bench-{name}-")


def start_lighthouse(
    log_dir: Path, host: str = "127.0.0.1", netns: list[str] = ()
) -> tuple[subprocess.Popen, str]:
    """torchft's lighthouse on a free port of ``host`` (loopback), as deploy/lighthouse/ runs it; ``netns``
    prefixes its command (a network namespace: Hosts.command); (process, its URL)."""
    exe = shutil.which("torchft_lighthouse")
    if exe is None:
        raise RuntimeError("torchft_lighthouse is not on PATH (pip install 'imgtrain[ft]')")
    port = free_port()
    log = open(log_dir / "lighthouse.log", "w")  # noqa: SIM115 - closed with the process (stop_lighthouse)
    proc = subprocess.Popen(
        [
            *netns,
            exe,
            "--bind",
            f"{host}:{port}",
            "--min_replicas",
            "1",
            "--heartbeat_timeout_ms",
            str(HEARTBEAT_MS),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while "listening on" not in (log_dir / "lighthouse.log").read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"the lighthouse did not start: {(log_dir / 'lighthouse.log').read_text()[-500:]}"
            )
        time.sleep(0.1)
    return proc, f"http://{host}:{port}"


def stop_lighthouse(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    proc.log.close()  # type: ignore[attr-defined]


def replicated_overrides(group: int, groups: int, lighthouse: str, advertise: str | None = None) -> list[str]:
    """The config keys of one replica group (docs/fault_tolerance.md, "Replicated mode")."""
    return [
        *([f"fault_tolerance.replicated.advertise_address={advertise}"] if advertise else []),
        "fault_tolerance.mode=replicated",
        f"fault_tolerance.replicated.num_groups={groups}",
        f"fault_tolerance.replicated.group_id={group}",
        f"fault_tolerance.replicated.lighthouse={lighthouse}",
        f"fault_tolerance.replicated.collective_timeout={COLLECTIVE_TIMEOUT}",
    ]


def replica_group(
    name: str,
    group: int,
    groups: int,
    lighthouse: str,
    train: list[str],
    log_dir: Path,
    hosts: Hosts | None = None,
) -> Node:
    """One replica group: its own single-node ``imgtrain launch`` (its own rendezvous on a free port, as
    deploy/lighthouse/replicated.sbatch's --standalone), restarting a crashed worker in place. With
    ``hosts``: on host ``group``, advertising its address."""
    return Node(
        name,
        f"127.0.0.1:{free_port()}",
        [*train, *replicated_overrides(group, groups, lighthouse, hosts and hosts.addrs[group])],
        log_dir,
        nnodes="1",
        launcher="imgtrain",
        monitor_interval=None,
        netns=hosts and hosts.namespaces[group],
    )


def suspend(node: Node) -> list[psutil.Process]:
    """SIGSTOP the node's training workers (a hang: alive, holding its sockets, doing nothing)."""
    workers = node.workers()
    if not workers:
        raise RuntimeError(f"{node.name} has no worker to stop")
    for w in workers:
        w.suspend()
    return workers


def resume(workers: list[psutil.Process]) -> None:
    for w in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            w.resume()


def records(run: Path, kind: str) -> list[dict]:
    """A run's metrics.jsonl records of one kind. A replica group may keep its records in a directory of
    its own under the output_dir it was given (``group-<id>/``): that is looked at too."""
    if not (run / "metrics.jsonl").exists():
        run = next((p.parent for p in sorted(run.glob("*/metrics.jsonl"))), run)
    return events(run, kind)


def train_records(run: Path) -> list[dict]:
    return records(run, "train")


def last_step(run: Path, before: float | None = None) -> int:
    """The highest step a run had logged (by unix time ``before``, if given): with training.log_interval=1
    every committed step is a record."""
    return max((r["step"] for r in train_records(run) if before is None or r["time"] <= before), default=0)


def next_commit(run: Path, after_time: float, after_step: int | None = None) -> dict | None:
    """The first step record after ``after_time`` (and above ``after_step``: a step that moved the model)."""
    for r in train_records(run):
        if r["time"] > after_time and (after_step is None or r["step"] > after_step):
            return r
    return None


def starts_after(run: Path, t: float) -> list[dict]:
    return [r for r in records(run, "start") if r.get("time", 0) > t]


def wait(predicate, timeout: float, poll: float = 0.05, alive: list[Node] | None = None):
    """predicate() until truthy; None after ``timeout`` or once every node in ``alive`` has exited."""
    return wait_until(predicate, timeout, alive, poll)


def result_head(name: str, args: argparse.Namespace) -> dict:
    """The first keys of an ft_* result: what ran, where, with which settings and timeouts."""
    return {
        "benchmark": name,
        "command": command_line(),
        "machine": {**machine_info(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "collective_timeout_s": COLLECTIVE_TIMEOUT,
        "lighthouse_heartbeat_timeout_ms": HEARTBEAT_MS,
    }


def logs_tail(nodes: list[Node], chars: int = 1500) -> str:
    """Each node's last error lines (imgtrain's one-line errors, exceptions), else the end of its log:
    torchrun's own failure summary comes last and names no cause."""
    out = []
    for n in nodes:
        text = n.output()
        errors = [
            line
            for line in text.splitlines()
            if line.startswith("imgtrain:")
            and "using the" not in line
            or re.match(r"^\w*(Error|Exception)\b", line)
        ]
        out.append(f"--- {n.name} ---\n" + ("\n".join(errors[-5:]) if errors else text[-chars:]))
    return "\n".join(out)


class Groups:
    """``n`` replica groups and their lighthouse; group i's run directory is ``<work>/run/rg<i>`` and its
    command line ``train(i)`` (without the replicated-mode keys, added here). With ``hosts`` (two network
    namespaces) group i runs on host i and the lighthouse on host 0's address."""

    def __init__(
        self, work: Path, n: int, train: Callable[[int], list[str]], cap: float, hosts: Hosts | None = None
    ):
        self.dir, self.n, self.train, self.cap, self.hosts = work, n, train, cap, hosts
        work.mkdir(parents=True, exist_ok=True)
        self.lighthouse: subprocess.Popen | None = None
        self.url = ""
        self.nodes: list[Node] = []  # every process started, for the cleanup
        self.group: list[Node] = []  # the current process of each group
        self.runs = [work / "run" / f"rg{i}" for i in range(n)]

    def launch(self) -> None:
        if self.hosts is None:
            self.lighthouse, self.url = start_lighthouse(self.dir)
        else:
            netns = self.hosts.command(0, [], own_name=False)
            self.lighthouse, self.url = start_lighthouse(self.dir, self.hosts.addrs[0], netns)
        self.group = [self.start(i) for i in range(self.n)]

    def start(self, i: int, name: str | None = None) -> Node:
        node = replica_group(name or f"rg{i}", i, self.n, self.url, self.train(i), self.dir, self.hosts)
        self.nodes.append(node)
        return node

    def relaunch(self, i: int) -> Node:
        self.group[i] = self.start(i, f"rg{i}-{sum(n.name.startswith(f'rg{i}') for n in self.nodes)}")
        return self.group[i]

    def ready(self, steps: int, timeout: float = 300) -> None:
        """Every group has committed ``steps`` steps."""
        if not wait(lambda: all(last_step(r) >= steps for r in self.runs), timeout, alive=self.nodes):
            raise RuntimeError(f"the replica groups did not reach step {steps}\n{logs_tail(self.nodes)}")

    def survivor_recovery(self, t: float, last: int) -> dict:
        """Seconds from ``t`` until group 0 commits a step above ``last``; did it restart on the way?"""
        rec = wait(lambda: next_commit(self.runs[0], t, last), self.cap, alive=[self.group[0]])
        restarted = bool(starts_after(self.runs[0], t))
        if rec is None:
            return {
                "outcome": "> cap" if self.group[0].proc.poll() is None else "job lost",
                "cap_s": self.cap,
            }
        first = next_commit(self.runs[0], t)  # the survivor's first record after the fault
        return {
            "outcome": "recovered",
            "total_s": round(rec["time"] - t, 3),
            "last_step_before_fault": last,
            "first_step": rec["step"],
            "steps_redone": max(0, last - (first["step"] - 1)),
            "survivor_restarted": restarted,
        }

    def back(self, i: int, t: float) -> float | None:
        """Seconds from ``t`` until group ``i`` commits a step again (healed into the quorum)."""
        rec = wait(lambda: next_commit(self.runs[i], t), self.cap)
        return round(rec["time"] - t, 3) if rec else None

    def cleanup(self) -> list[str]:
        """Stop everything; the command lines of processes that outlived it (then killed)."""
        cleanup_pids(self.nodes)
        stop_lighthouse(self.lighthouse)
        leaked = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if str(self.dir) in cmd and p.pid != os.getpid():
                leaked.append(cmd[:200])
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        return leaked
