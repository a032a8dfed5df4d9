"""Process group from torchrun's environment, DDP wrapping and small rank helpers."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from imgtrain.config import DistributedConfig
from imgtrain.errors import EXIT_SIGINT, ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job. A value, not global state: pass it to what needs it."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group
    node: str
    restart_count: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def _choose_backend(cfg: DistributedConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: DistributedConfig) -> DistInfo:
    """Join the job that torchrun describes in the environment, or run as one process without one.

    The first collectives (rendezvous, parameter broadcast, checkpoint load) use the long
    ``init_timeout``; call :func:`set_collective_timeout` after the first step to tighten it to
    ``timeout`` so that a dead peer is noticed quickly.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    backend = _choose_backend(cfg)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("distributed.backend", "nccl", "'gloo' or 'auto': CUDA is not available")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    use_pg = "MASTER_ADDR" in os.environ and world_size >= 1 and "RANK" in os.environ
    if use_pg and not dist.is_initialized():
        _import_group_binding_modules()
        timeout = datetime.timedelta(seconds=cfg.init_timeout)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        with _exit_if_agent_dies(rank) if agent_store else contextlib.nullcontext():
            store_kw = {}
            if agent_store:
                store_kw = {
                    "store": _fresh_agent_store_namespace(rank, world_size, timeout),
                    "rank": rank,
                    "world_size": world_size,
                }
            dist.init_process_group(
                backend=backend,
                timeout=timeout,
                device_id=device if backend == "nccl" else None,
                **store_kw,
            )
    return DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size if use_pg else 1,
        device=device,
        backend=backend if use_pg else None,
        node=socket.gethostname(),
        restart_count=restart_count,
    )


def _import_group_binding_modules() -> None:
    """Import, while no process group exists, the torch modules that capture the default group on import.

    ``torch.distributed.nn.functional`` writes ``group=group.WORLD`` into its functions' default arguments,
    and DDP's constructor imports it (through FSDP's sharded tensors). Imported after
    ``init_process_group``, it would hold the default group for the life of the interpreter:
    ``destroy_process_group`` could not free it, and its Gloo worker threads would live into interpreter
    finalization, where one that releases a tensor aborts the process ("terminate called without an
    active exception", exit -6 after a finished run). Defensive: imgtrain's own imports load the module
    earlier today (so it did not hold the group in the abort seen in CI); importing it here keeps that so
    whatever the import order."""
    import torch.distributed.nn.functional  # noqa: F401


@contextlib.contextmanager
def _exit_if_agent_dies(rank: int, poll: float = 0.1):
    """While this worker joins the process group through its agent's store: exit at once, with one line,
    if the agent (this process's parent: torchrun's agent, `imgtrain launch`'s agent or its fork server,
    which exits with the agent) dies.

    The agent's death signal (SIGINT) does not end that wait: Python runs a signal handler only once the
    store call it interrupts returns, and a store call waits up to ``init_timeout`` (30 min). Nor does the
    store fail it: every worker forked from the agent that hosts the store holds a copy of the store's
    listening socket (docs/fault_tolerance.md says why the copies stay), so a connection the agent had not
    accepted yet when it died (or one made after) is still taken by the kernel, and the client's first
    request waits for a reply that nobody sends. Watched from a thread: getppid() changes when the parent
    dies (the orphan is handed to init or a subreaper)."""
    parent = os.getppid()
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll):
            if os.getppid() != parent:
                os.write(
                    2,
                    f"imgtrain: rank {rank}: its launcher (parent process {parent}) died while this process "
                    "joined the process group; exiting\n".encode(),
                )
                os._exit(EXIT_SIGINT)  # the agent's death signal, as a worker that could take it exits

    watcher = threading.Thread(target=watch, name="imgtrain-agent-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _fresh_agent_store_namespace(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The store torchrun's agent shares with its workers, under a namespace new to this worker group.

    torchrun (c10d rendezvous) keeps one store for the whole job and hands it to every restarted group
    without a per-restart prefix, so the process group's address keys of the group it just killed are
    still there: a restarted rank reads its peer's old address and fails with "connectFullMesh ...
    Connection refused", restart after restart (pytorch issue #135712). TORCHELASTIC_RESTART_COUNT
    is no fix: it is per agent and differs between nodes. Instead rank 0 picks a random token and
    hands it to each rank through keys that cannot be stale: rank r bumps its own counter and waits
    for the token under that count, which only the live rank 0 can have written.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    if rank == 0:
        token = uuid.uuid4().hex
        acked: dict[int, int] = {}
        pending = set(range(1, world_size))
        deadline = time.monotonic() + timeout.total_seconds()
        while pending:
            for r in sorted(pending):
                if store.check([f"imgtrain/confirm/{r}/{token}"]):
                    pending.discard(r)
                    continue
                count = store.add(f"imgtrain/hello/{r}", 0)
                if count and acked.get(r) != count:
                    store.set(f"imgtrain/ack/{r}/{count}", token)
                    acked[r] = count
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"ranks {sorted(pending)} did not join the process group within "
                    f"{timeout.total_seconds():.0f}s (distributed.init_timeout)"
                )
            if pending:
                time.sleep(0.01)
    else:
        count = store.add(f"imgtrain/hello/{rank}", 1)
        token = store.get(f"imgtrain/ack/{rank}/{count}").decode()
        store.set(f"imgtrain/confirm/{rank}/{token}", "1")
    return dist.PrefixStore(f"imgtrain/{token}", store)


def set_collective_timeout(info: DistInfo, seconds: float) -> None:
    """Tighten (or widen) the default group's collective timeout once the job is running."""
    if not info.enabled:
        return
    try:
        dist.set_timeout(datetime.timedelta(seconds=seconds))
    except (AttributeError, RuntimeError) as e:  # pragma: no cover - depends on torch build
        log.warning("could not change the process-group timeout to %ss: %s", seconds, e)


def destroy_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, cfg: DistributedConfig) -> nn.Module:
    if not info.enabled:
        return model
    if cfg.sync_batchnorm and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif cfg.sync_batchnorm:
        log.warning(
            "distributed.sync_batchnorm: torch's SyncBatchNorm needs CUDA; on %s each process "
            "keeps its own BatchNorm statistics",
            info.device,
        )
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[info.local_rank] if info.device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        static_graph=cfg.static_graph,
    )


def comm_device(info: DistInfo) -> torch.device:
    """Where tensors handed to collectives must live: CUDA for NCCL, CPU for Gloo."""
    return info.device if info.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a single process) and return it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo, group=None) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def new_control_group(info: DistInfo):
    """A Gloo group for small per-step agreements (stop, save) between CPU threads. With NCCL, doing them
    on the default group would put a GPU round trip, and a wait for the GPU, into every step."""
    if info.backend == "nccl":
        return dist.new_group(backend="gloo")
    return None


def broadcast_string(text: str | None, info: DistInfo, src: int = 0) -> str | None:
    """Rank ``src``'s string on every rank (used to agree on the checkpoint to resume from)."""
    if not info.enabled:
        return text
    # Sent as bytes in a tensor rather than broadcast_object_list: nothing is unpickled.
    data = b"\x00" if text is None else b"\x01" + text.encode()
    dev = comm_device(info)
    length = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(length, src=src)
    buf = torch.zeros(int(length.item()), dtype=torch.uint8, device=dev)
    if info.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=src)
    raw = bytes(buf.cpu().tolist())
    return None if raw[:1] == b"\x00" else raw[1:].decode()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
