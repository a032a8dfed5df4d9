"""A standalone c10d rendezvous store, run outside the training nodes.

With torchrun's c10d backend the rendezvous store normally lives inside the agent of one training node:
if that node dies, every other agent loses the rendezvous and the job ends, whatever ``--max-restarts``
says. Running the store in its own small process (on a login node, a Kubernetes Deployment, a Slurm
"service" step) and pointing every agent at it with ``is_host=false`` removes the training nodes from
the single point of failure: any of them may die or join.

torch's TCPStore server listens on every interface whatever host it is given, and torch's rendezvous
unpickles what agents write into the store: whoever reaches the port runs code in every agent. So the store
binds its own socket to one address and hands it to TCPStore (``master_listen_fd``), and refuses a wildcard
address unless asked (docs/security.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed import TCPStore

log = logging.getLogger(__name__)


class BindError(ValueError):
    """The store cannot or must not listen on the address it was given."""


def is_wildcard(host: str) -> bool:
    """True for an address that means every interface (``0.0.0.0``, ``::``, empty)."""
    try:
        return not host or ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def store_address(host: str | None, allow_wildcard: bool = False) -> str:
    """The address to listen on: ``host``, else the pod IP that Kubernetes' downward API puts in $POD_IP."""
    host = host or os.environ.get("POD_IP", "")
    if not host:
        raise BindError(
            "no address to listen on: give --host (an address of this machine that the agents "
            "reach; in Kubernetes set POD_IP from status.podIP)"
        )
    if is_wildcard(host) and not allow_wildcard:
        raise BindError(
            f"--host {host} listens on every interface, and whoever reaches the store runs code "
            "in every agent: give one address, or --allow-wildcard-bind behind a firewall "
            "(docs/security.md)"
        )
    return host


def host_port(host: str, port: int) -> str:
    """host:port, with an IPv6 address in brackets."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_on(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (that one address; port 0: any free port)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise BindError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        # A restarted store must get its port back while the old connections sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise BindError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def tcp_store_on(host: str, port: int, timeout: datetime.timedelta) -> tuple[TCPStore, str]:
    """A TCPStore server listening on host:port only (torch's own listens on every interface), and the
    address it listens on. wait_for_workers=False: clients come and go, it waits for no fixed count."""
    from torch.distributed import TCPStore

    sock = listen_on(host, port)
    bound, bound_port = sock.getsockname()[:2]
    # The TCPStore owns the listening socket from here on and closes it.
    store = TCPStore(
        host.strip("[]"),
        bound_port,
        is_master=True,
        wait_for_workers=False,
        timeout=timeout,
        master_listen_fd=sock.detach(),
    )
    return store, bound


def serve_store(host: str, port: int, stop: threading.Event | None = None) -> None:
    """Serve a TCPStore on host:port (that address only) until SIGTERM/SIGINT (or ``stop`` is set)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    store, bound = tcp_store_on(host, port, timeout=datetime.timedelta(seconds=60))
    print(f"imgtrain: rendezvous store listening on {bound}:{store.port}", flush=True)
    stop.wait()
    del store


def lighthouse_command(
    host: str, port: int, min_replicas: int, heartbeat_timeout_ms: int, join_timeout_ms: int
) -> list[str]:
    """The command line of torchft's lighthouse (the quorum service of replicated mode) on host:port.

    The Rust binary ships in torchft's wheel and starts in milliseconds (importing torch for the Python
    wrapper takes seconds): a restarted lighthouse is back before the replicas' heartbeats give up."""
    exe = shutil.which(
        "torchft_lighthouse",
        path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    if exe is None:
        raise BindError("torchft_lighthouse is not installed: pip install 'imgtrain[ft]' (torchft)")
    bind = host_port(host, port)
    return [
        exe,
        "--bind",
        bind,
        "--min_replicas",
        str(min_replicas),
        "--heartbeat_timeout_ms",
        str(heartbeat_timeout_ms),
        "--join_timeout_ms",
        str(join_timeout_ms),
    ]
