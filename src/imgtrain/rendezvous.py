"""A standalone c10d rendezvous store, run outside the training nodes.

With torchrun's c10d backend the rendezvous store normally lives inside the agent of one training node:
if that node dies, every other agent loses the rendezvous and the job ends, whatever ``--max-restarts``
says. Running the store in its own small process (on a login node, a Kubernetes Deployment, a Slurm
"service" step) and pointing every agent at it with ``is_host=false`` removes the training nodes from
the single point of failure: any of them may die or join.
"""

from __future__ import annotations

import datetime
import logging
import signal
import threading

log = logging.getLogger(__name__)


def serve_store(host: str, port: int, stop: threading.Event | None = None) -> None:
    """Serve a TCPStore on host:port until SIGTERM/SIGINT (or ``stop`` is set)."""
    from torch.distributed import TCPStore

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    # wait_for_workers=False: agents come and go; the store must not wait for a fixed count of them.
    store = TCPStore(host, port, is_master=True, wait_for_workers=False,
                     timeout=datetime.timedelta(seconds=60), multi_tenant=True)
    print(f"imgtrain: rendezvous store listening on {host}:{store.port}", flush=True)
    stop.wait()
    del store
