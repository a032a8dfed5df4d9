"""Helpers for multi-node tests: each "node" is one torchrun agent (plus its workers) in its own
session, optionally inside its own network namespace."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

import conftest
from conftest import read_jsonl, subprocess_env

# The rendezvous settings imgtrain documents (docs/fault_tolerance.md, "What we measured about torchrun's rendezvous").
RDZV_CONF = (
    "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,read_timeout=15,"
    "close_timeout=5,heartbeat_timeout=5"
)


class Node:
    def __init__(
        self,
        name: str,
        endpoint: str,
        args: list[str],
        log_dir: Path,
        nnodes: str = "1:2",
        netns: str | None = None,
        ifname: str | None = None,
        max_restarts: int = 10,
        is_host: bool | None = None,
        local_addr: str | None = None,
        backend: str = "c10d",
        tuned: bool = True,
        monitor_interval: float | None = 0.5,
        entry: list[str] | None = None,
        launcher: str = "torchrun",
    ):
        """``tuned=False``: torchrun's own rendezvous defaults (no RDZV_CONF, the shared worker store), as
        benchmarks/recovery.py compares them; ``monitor_interval=None``: torchrun's default (0.1 s);
        ``entry``: what torchrun starts (default ``-m imgtrain``; a script path for benchmarks/scaling.py);
        ``launcher="imgtrain"``: ``imgtrain launch`` (pre-imported workers) with the same arguments."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = subprocess_env()
        if tuned:
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = ifname
        agent = {
            "torchrun": ["torch.distributed.run"],
            "imgtrain": ["imgtrain", "launch"],
            "imgtrain-forkserver": ["imgtrain", "launch", "--start-method=forkserver"],
        }[launcher]
        cmd = [
            sys.executable,
            "-m",
            *agent,
            f"--nnodes={nnodes}",
            "--nproc-per-node=1",
            f"--rdzv-backend={backend}",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=imgtrain-test",
            "--rdzv-conf="
            + ",".join(
                ([RDZV_CONF] if tuned else [])
                + ([] if is_host is None else [f"is_host={str(is_host).lower()}"])
            ),
            f"--max-restarts={max_restarts}",
            *([] if monitor_interval is None else [f"--monitor-interval={monitor_interval}"]),
            *([f"--local-addr={local_addr}"] if local_addr else []),
            *(entry or ["-m", "imgtrain"]),
            *args,
        ]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def workers(self) -> list[psutil.Process]:
        """The training workers: the agent's imgtrain children (torchrun), or its fork server's children."""
        tree = self.tree()
        servers = {
            p.pid
            for p in tree[1:]
            if _ppid(p) == self.proc.pid and "multiprocessing.forkserver" in _cmdline(p)
        }
        if servers:
            return [p for p in tree if _ppid(p) in servers]
        return [p for p in tree[1:] if "imgtrain" in _cmdline(p)]

    def kill(self) -> None:
        """kill -9 the whole node: the agent and every worker (workers run in sessions of their own)."""
        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.log.close()


def _ppid(p: psutil.Process) -> int | None:
    try:
        return p.ppid()
    except psutil.Error:
        return None


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def wait_for(predicate, timeout: float, what: str, nodes: list[Node] = (), poll: float = 0.5):
    """conftest.wait_for, failing with the nodes' logs."""
    return conftest.wait_for(
        predicate,
        timeout,
        what,
        poll=poll,
        context=lambda: "\n\n".join(f"--- {n.name} ---\n{n.output()[-5000:]}" for n in nodes),
    )


def events(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        return [r for r in read_jsonl(path) if r.get("event") == kind]
    except ValueError:  # a line being written
        return []


def cleanup_pids(nodes: list[Node]) -> None:
    for n in nodes:
        n.close()
    # Orphaned workers of killed agents, if any survived.
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "imgtrain" in cmd and "train" in cmd and p.pid != os.getpid() and "pytest" not in cmd:
            try:
                if any(str(n.log_path.parent) in cmd for n in nodes):
                    p.kill()
            except psutil.NoSuchProcess:
                pass


def train_args(data: Path, out: Path) -> list[str]:
    """A run slow enough (~0.1-0.3 s per step on 2 cores) that membership changes happen mid-run."""
    from conftest import TINY

    return [
        "train",
        "--output-dir",
        str(out),
        f"data.root={data}",
        *TINY,
        "model.name=resnet18",
        "model.small_input=true",
        "data.image_size=16",
        "data.val_resize=16",
        "training.batch_size=4",
        "training.epochs=6",
        "checkpoint.save_every_steps=3",
        "checkpoint.keep_last_n=2",
        "distributed.timeout=20",
        "fault_tolerance.hang_timeout=120",
    ]


def lose_a_node_then_rejoin(out: Path, make_node, victim: str, kill_extra=None) -> list[Node]:
    """Two nodes ("first" and "second") train together; ``victim`` is killed (with ``kill_extra``, e.g. an
    etcd member), the other must go on alone from the last checkpoint within a minute, then a restarted
    node ("<victim>-again") must join and both must finish. Returns the nodes.

    Both start at once, in no set order: the store is external or named by ``is_host`` (the other node
    retries until it is up). Starting one after the other would make the first train alone until the
    second joins: a membership change of its own, and not what is tested here."""
    first = make_node("first")
    second = make_node("second")
    nodes = [first, second]
    dead, survivor = (first, second) if victim == "first" else (second, first)
    try:
        group = wait_for(
            lambda: [e for e in events(out, "start") if e["world_size"] == 2], 120, "a 2-node group", nodes
        )[0]
        # Saved by the 2-node group: with --nnodes=1:2 the first node may have trained (and saved) alone
        # until the second joined, and the survivor must resume from a 2-node checkpoint. Published (its
        # manifest written): the event comes when an asynchronous save starts.
        wait_for(
            lambda: [
                e
                for e in events(out, "checkpoint")
                if e["time"] > group["time"] and (Path(e["path"]) / "manifest.json").exists()
            ],
            120,
            "a checkpoint of the 2-node group",
            nodes,
        )
        starts = len(events(out, "start"))
        dead.kill()
        if kill_extra:
            kill_extra()
        killed_at = time.time()
        alone = wait_for(
            lambda: [e for e in events(out, "start")[starts:] if e["world_size"] == 1],
            120,
            f"the {survivor.name} node to continue alone",
            nodes,
        )[0]
        assert alone["resumed_from"], "the survivor must continue from the last checkpoint"
        step = wait_for(
            lambda: [e for e in events(out, "train") if e["time"] > alone["time"]],
            120,
            "a step after the node loss",
            nodes,
        )[0]
        assert step["time"] - killed_at < 60, f"recovery took {step['time'] - killed_at:.1f}s"
        starts = len(events(out, "start"))
        again = make_node(f"{victim}-again")
        nodes.append(again)
        wait_for(
            lambda: [e for e in events(out, "start")[starts:] if e["world_size"] == 2],
            120,
            "the restarted node to join (world size back to 2)",
            nodes,
        )
        assert survivor.proc.wait(timeout=300) == 0, survivor.output()[-3000:]
        assert again.proc.wait(timeout=60) == 0, again.output()[-3000:]
    finally:
        cleanup_pids(nodes)
    return nodes


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def add_namespace_pair(created: list[str], prefix: str, subnet: str, fast_tcp_abort: bool = True):
    """Two network namespaces ("hosts") joined by a veth pair, addresses ``{subnet}.1`` and ``{subnet}.2``.

    Names go into ``created`` as soon as they exist, so the caller can delete them whatever fails
    (:func:`delete_namespaces`). Returns (namespaces, veth ends, addresses)."""
    tag = uuid.uuid4().hex[:6]
    ns = (f"{prefix}A{tag}", f"{prefix}B{tag}")
    veth = (f"{prefix[:2].lower()}a{tag}", f"{prefix[:2].lower()}b{tag}")
    addrs = (f"{subnet}.1", f"{subnet}.2")
    for n in ns:
        ip("netns", "add", n)
        created.append(n)
    ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
    for n, v, a in zip(ns, veth, addrs, strict=True):
        ip("link", "set", v, "netns", n)
        ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
        ip("-n", n, "link", "set", v, "up")
        ip("-n", n, "link", "set", "lo", "up")
        if fast_tcp_abort:  # give up on a dead TCP peer after ~3 retransmissions instead of ~15 minutes
            subprocess.run(["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.tcp_retries2=3"], check=True)
    return ns, veth, addrs


@contextlib.contextmanager
def namespace_pair_for_test(prefix: str, subnet: str):
    """:func:`add_namespace_pair` for a test: skips it without iproute2 or without the rights to create
    namespaces, and deletes whatever was created when the test is done."""
    import pytest  # here: benchmarks/ import this module too, without pytest

    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    created: list[str] = []
    try:
        yield add_namespace_pair(created, prefix, subnet)
    except subprocess.CalledProcessError as e:
        if not created:
            pytest.skip(f"network namespaces unavailable (needs root): {e.stderr.decode().strip()}")
        raise
    finally:
        delete_namespaces(created)


def delete_namespaces(names: list[str]) -> None:
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


@dataclasses.dataclass(frozen=True)
class Hosts:
    """Two network namespaces as two hosts: each has its own address and host name, and each name resolves
    to that address on both (``/etc/netns/<ns>/hosts``, which ``ip netns exec`` mounts over /etc/hosts)."""

    namespaces: tuple[str, str]
    veths: tuple[str, str]
    addrs: tuple[str, str]
    names: tuple[str, str]

    def command(self, host: int, cmd: list[str], own_name: bool = True) -> list[str]:
        """``cmd`` run on ``host``: in its network namespace and, with ``own_name``, in a UTS namespace of
        its own named ``names[host]`` (what socket.gethostname() returns there). Each step execs the next:
        the process started is ``cmd``'s."""
        netns = ["ip", "netns", "exec", self.namespaces[host]]
        if not own_name:
            return [*netns, *cmd]
        return [*netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.names[host], *cmd]

    def link(self, host: int, up: bool) -> None:
        """Cut (``up=False``) or restore ``host``'s only link: it can then reach nothing but itself."""
        ip("-n", self.namespaces[host], "link", "set", self.veths[host], "up" if up else "down")


@contextlib.contextmanager
def hosts_for_test(prefix: str, subnet: str, names: tuple[str, str]):
    """:func:`namespace_pair_for_test` (with its skips) as :class:`Hosts` named ``names``."""
    with namespace_pair_for_test(prefix, subnet) as (ns, veth, addrs):
        hosts = Hosts(ns, veth, addrs, names)
        table = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(addrs, names, strict=True))
        dirs = [Path("/etc/netns") / n for n in ns]
        try:
            for d in dirs:
                d.mkdir(parents=True, exist_ok=True)
                (d / "hosts").write_text(table)
            yield hosts
        finally:
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
