"""An emulated cluster network: N "hosts" (network namespaces) on one "switch", links rate-limited.

Topology (a star, like hosts on one switch)::

    host ns <prefix><pid>h0: eth0 10.232.0.1/24 --veth-- port p0 --+
    host ns <prefix><pid>h1: eth0 10.232.0.2/24 --veth-- port p1 --+-- bridge br0 in ns <prefix><pid>s
    ...                                                            |

Everything lives inside namespaces created here (the bridge too, in its own "switch" namespace), so
nothing is added to the machine's own network namespace and deleting the namespaces removes every
veth, bridge and qdisc with them. Each link is shaped in both directions by a token-bucket filter
(``tc qdisc ... tbf``) on the egress of both of its ends, i.e. a full-duplex link of the given rate.
Measured on these machines: tbf is accurate up to about 5 Gbit/s and veth itself tops out near
8 Gbit/s, so 1 and 2.5 Gbit/s are emulated faithfully and faster links are not. The kernel here has no
``sch_netem``, so latency cannot be emulated: links have the few-microsecond latency of veth.

Cleanup: :class:`StarNetwork` is a context manager; on entry it deletes namespaces left behind by
earlier runs whose owning process is gone (names carry the owner's pid), it turns SIGTERM and SIGHUP
into exceptions so that ``__exit__`` also runs when the benchmark is killed politely, and on exit it
deletes all it created. Needs root (CAP_NET_ADMIN); :func:`can_emulate` says whether this process can.

    sudo python benchmarks/netem.py --hosts 2 --rate-mbit 1000 --check   # build, ping, measure, remove
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(_TESTS / "integration") not in sys.path:
    sys.path[:0] = [str(_TESTS / "integration"), str(_TESTS)]  # elastic_nodes and the conftest it imports

from elastic_nodes import delete_namespaces, ip  # noqa: E402

PREFIX = "itn"
HOST_IF = "eth0"


@dataclass(frozen=True)
class Host:
    netns: str | None  # None: loopback fallback, the process runs in the machine's own namespace
    ifname: str
    addr: str


def can_emulate() -> tuple[bool, str]:
    """(True, "") when namespaces and tc can be used here, else (False, why)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return False, "creating network namespaces and qdiscs needs root"
    return True, ""


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix><pid>...`` whose pid is no longer running (a run killed with
    SIGKILL could not clean up). Namespaces of live runs are left alone. Returns what was deleted."""
    gone = []
    for name in list_namespaces(prefix):
        m = re.match(rf"{re.escape(prefix)}(\d+)[sh]", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            gone.append(name)
    delete_namespaces(gone)
    return gone


def tbf_args(rate_mbit: float) -> list[str]:
    # The bucket must hold at least one GSO super-packet (up to 64 KiB on veth) or big segments are
    # dropped, and ~2 ms of traffic so that the timer granularity does not cap the rate.
    burst = max(128 * 1024, int(rate_mbit * 1e6 / 8 * 0.002))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]


class StarNetwork:
    """``hosts`` namespaces joined to one bridge, every link shaped to ``rate_mbit`` (None: unshaped).
    With ``loopback=True`` (or when :func:`can_emulate` says no and ``fallback`` is set), nothing is
    created and every host is 127.0.0.1 in the machine's own namespace."""

    def __init__(
        self,
        hosts: int,
        rate_mbit: float | None = None,
        subnet: str = "10.232.0",
        prefix: str = PREFIX,
        loopback: bool = False,
        fallback: bool = True,
    ):
        if not 1 <= hosts <= 250:
            raise ValueError("hosts must be in 1..250")
        self.n = hosts
        self.rate_mbit = rate_mbit
        self.subnet = subnet
        self.prefix = f"{prefix}{os.getpid()}"
        self.base_prefix = prefix
        ok, why = can_emulate()
        self.emulated = ok and not loopback
        self.why_not = "loopback requested" if loopback else why
        if not ok and not loopback and not fallback:
            raise RuntimeError(f"cannot emulate a network: {why}")
        self.created: list[str] = []
        self.hosts: list[Host] = []
        self._old_handlers: dict[int, object] = {}

    @property
    def switch(self) -> str:
        return f"{self.prefix}s"

    # -------------------------------------------------------------- lifecycle

    def __enter__(self) -> StarNetwork:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise_exit)
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        if not self.emulated:
            print(
                f"netem: no emulated network ({self.why_not}): all hosts on loopback, links not shaped",
                file=sys.stderr,
            )
            self.hosts = [Host(None, "lo", "127.0.0.1") for _ in range(self.n)]
            return
        remove_leftovers(self.base_prefix)
        ip("netns", "add", self.switch)
        self.created.append(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(self.n):
            ns = f"{self.prefix}h{i}"
            ip("netns", "add", ns)
            self.created.append(ns)
            port = f"p{i}"
            # Both ends are created inside namespaces: nothing ever appears in the machine's own one.
            ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", HOST_IF, "netns", ns)
            ip("-n", self.switch, "link", "set", port, "master", "br0")
            ip("-n", self.switch, "link", "set", port, "up")
            addr = f"{self.subnet}.{i + 1}"
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", HOST_IF)
            ip("-n", ns, "link", "set", HOST_IF, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            self.hosts.append(Host(ns, HOST_IF, addr))
        if self.rate_mbit:
            self.set_rate(self.rate_mbit)

    def close(self) -> None:
        delete_namespaces(self.created[::-1])
        self.created.clear()
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    # -------------------------------------------------------------- shaping and counters

    def links(self) -> list[tuple[str, str]]:
        """(namespace, device) of both ends of every link."""
        out = []
        for i, h in enumerate(self.hosts):
            if h.netns:
                out += [(h.netns, h.ifname), (self.switch, f"p{i}")]
        return out

    def set_rate(self, rate_mbit: float | None) -> None:
        """Reshape every link (both directions) while jobs run; None removes the shaping."""
        self.rate_mbit = rate_mbit
        for ns, dev in self.links():
            if rate_mbit:
                _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_mbit))
            else:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)

    def tx_bytes(self, i: int) -> int:
        h = self.hosts[i]
        if h.netns is None:
            return int(Path(f"/sys/class/net/{h.ifname}/statistics/tx_bytes").read_text())
        stats = json.loads(_run("ip", "-j", "-s", "-n", h.netns, "link", "show", "dev", h.ifname))
        return int(stats[0]["stats64"]["tx"]["bytes"])

    def listening(self, i: int, port: int) -> bool:
        """Whether something listens on TCP ``port`` in host ``i`` (e.g. the rendezvous store)."""
        h = self.hosts[i]
        cmd = ["cat", "/proc/net/tcp", "/proc/net/tcp6"]
        text = subprocess.run(self.wrap(i, cmd) if h.netns else cmd, capture_output=True, text=True).stdout
        want = f":{port:04X}"
        return any(
            f[1].endswith(want) and f[3] == "0A"
            for f in (line.split() for line in text.splitlines()[1:])
            if len(f) > 3
        )

    def describe(self) -> dict:
        return {
            "emulated": self.emulated,
            "why_not": self.why_not,
            "rate_mbit": self.rate_mbit,
            "hosts": [vars(h) for h in self.hosts],
            "switch": self.switch if self.emulated else None,
            "qdisc": ("tbf " + " ".join(tbf_args(self.rate_mbit)[1:])) if self.rate_mbit else None,
            "latency": "not emulated (no sch_netem in this kernel): veth's microseconds",
        }

    def wrap(self, i: int, cmd: list[str]) -> list[str]:
        """``cmd`` run inside host ``i``'s namespace."""
        ns = self.hosts[i].netns
        return cmd if ns is None else ["ip", "netns", "exec", ns, *cmd]


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def measure_throughput(net: StarNetwork, a: int, b: int, seconds: float = 2.0) -> float:
    """Gbit/s of one TCP stream from host a to host b (a Python socket pair through the namespaces)."""
    port = 29977
    server = subprocess.Popen(
        net.wrap(b, [sys.executable, "-c", _SINK, net.hosts[b].addr, str(port)]),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        client = subprocess.run(
            net.wrap(a, [sys.executable, "-c", _SOURCE, net.hosts[b].addr, str(port), str(seconds)]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if client.returncode != 0:
            raise RuntimeError(client.stderr)
        nbytes, secs = map(float, client.stdout.split())
        return nbytes * 8 / secs / 1e9
    finally:
        server.wait(timeout=30)


_SINK = """
import socket, sys
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
c, _ = s.accept()
while c.recv(1 << 20):
    pass
"""
_SOURCE = """
import socket, sys, time
addr, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for _ in range(100):
    try:
        c = socket.create_connection((addr, port)); break
    except OSError:
        time.sleep(0.05)
buf = b"x" * (1 << 20); sent = 0; t0 = time.perf_counter()
while time.perf_counter() - t0 < secs:
    c.sendall(buf); sent += len(buf)
c.shutdown(socket.SHUT_WR); c.recv(1)
print(sent, time.perf_counter() - t0)
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--rate-mbit", type=float, default=1000.0)
    p.add_argument("--check", action="store_true", help="measure one TCP stream host0 -> host1")
    p.add_argument("--cleanup", action="store_true", help="only delete leftovers of dead runs, then exit")
    args = p.parse_args(argv)
    if args.cleanup:
        print("deleted:", remove_leftovers() or "nothing")
        return 0
    with StarNetwork(args.hosts, args.rate_mbit) as net:
        print(json.dumps(net.describe(), indent=1))
        if args.check and args.hosts >= 2:
            print(
                f"one TCP stream host0 -> host1: {measure_throughput(net, 0, 1):.2f} Gbit/s "
                f"(shaped to {args.rate_mbit / 1000:g} Gbit/s)"
            )
    print("removed; namespaces left with this prefix:", list_namespaces() or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
