"""torchft 0.2.0 internals imgtrain's replicated mode depends on, each behind one small override.

The DDP wrapper's gradient hook:

torchft's ``DistributedDataParallel._comm_hook`` waits on the fault-tolerant all-reduce and then asserts
that the work's future (private ``_ManagedFuture._fut``) exists. When a peer dies *during* the all-reduce,
``work.wait()`` reports the error to the Manager and returns False before that future is ever set, so the
assertion escapes ``backward()`` and kills the survivor as well (3 of 3 tries, ../shared/notes/torchft.md).
The Manager has already recorded the error, so its commit vote will discard the step; all the hook has to
do is return a completed future. torchft's nightly has the same fix.

Where torchft's servers listen:

torchft 0.2.0 binds its two servers to every interface and takes no address: ``Manager.__init__`` builds its
``ManagerServer`` with ``bind="[::]:<port>"``, and ``HTTPTransport.__init__`` its checkpoint server with
``_IPv6HTTPServer(("", 0), ...)`` (dual stack). Both names are looked up in their module while the object is
built, so :func:`manager_on` and :class:`WeightsOnlyHTTPTransport` substitute a factory bound to one
address for exactly that call (the port torchft chose, ``TORCHFT_MANAGER_PORT`` included, is kept;
:func:`_substituted` says why that swap is safe).

Where the gradient group's Gloo listens:

torchft's reconfigurable ``ProcessGroupGloo._create_pg`` builds torch's Gloo backend from a timeout alone,
so Gloo takes its default device: GLOO_SOCKET_IFNAME's interface, else whatever the host name resolves to
(127.0.0.1 on many hosts, which no peer reaches). :class:`MembersGloo` given an ``address`` overrides
``_create_pg`` to build the backend from options whose one device is that address, and otherwise does what
torchft's does (a canary compares torchft's source with the one this mirrors). Setting GLOO_SOCKET_IFNAME
instead would be process-wide state that every child process inherits.

The same hook serves a replica group of several processes (:class:`GroupFaultTolerantDDP`), after the
gradient is summed inside the group.

Also here: the removal of a restarted group's stale manager address, the quorum's members and their sizes
(one list for the gradient's divisor, the data share and the checks on group ids and sizes) and a
weights-only checkpoint transport. This module is the one place that touches torchft's private symbols; tests/unit/test_internals.py names each one
when an upgrade changes it.
"""

# No `from __future__ import annotations`: DDP's register_comm_hook checks the hook's evaluated annotations.
import contextlib
import socket
import types
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torchft.manager
from torch import nn
from torchft import DistributedDataParallel, Manager, ProcessGroupGloo
from torchft.checkpointing import http_transport
from torchft.checkpointing._serialization import _streaming_load
from torchft.checkpointing.http_transport import HTTPTransport
from torchft.manager import MANAGER_ADDR_KEY, REPLICA_ID_KEY

from imgtrain.config import MAX_REPLICA_GROUPS
from imgtrain.distributed.rendezvous import host_port

PRIVATE_SYMBOL = (
    "torchft.ddp.DistributedDataParallel._comm_hook, torchft.manager._ManagedFuture._fut, "
    "torchft.manager.extract_trailing_digits (global_ranks of ProcessGroup.configure, in the order of the "
    "quorum's replica ids as strings, whose position is configure's rank and Manager.participating_rank()), "
    "torchft.checkpointing.http_transport.HTTPTransport._load_from_address, "
    "torchft.checkpointing._serialization._streaming_load, "
    "torchft.manager.ManagerServer (looked up by Manager.__init__, bind=[::]:<port>), "
    "torchft.checkpointing.http_transport._IPv6HTTPServer (looked up by HTTPTransport.__init__), "
    "torchft.manager.MANAGER_ADDR_KEY and REPLICA_ID_KEY (read by Manager.__init__ from the group's store), "
    "torchft.process_group.ProcessGroupGloo._create_pg (called by ProcessGroupWrapper.configure; mirrored by "
    "MembersGloo._create_pg)"
)


class FaultTolerantDDP(DistributedDataParallel):
    """torchft's DDP (gradients all-reduced over the live replica groups through the Manager) whose
    hook survives a peer dying inside the all-reduce."""

    @staticmethod
    def _comm_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        work = state.allreduce(bucket.buffer())
        if not work.wait():  # a peer died: the Manager holds the error and should_commit() says no
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
            done.set_result(bucket.buffer())
            return done
        fut = work.get_future()
        # The Manager's future wraps torch's; DDP's reducer needs torch's own (else backward hangs).
        # After an earlier error in the step the Manager hands out a plain completed future instead.
        return fut._fut if hasattr(fut, "_fut") else fut


class GroupFaultTolerantDDP(nn.parallel.DistributedDataParallel):
    """DDP for a replica group of several processes: each gradient bucket is summed over the group's own
    process group (torchrun's), then averaged over the live replica groups through the Manager (rank r
    with rank r of every other group). The gradient is the sum over the group's processes divided by the
    number of groups in the quorum: the trainer's loss scale (groups present / samples trained) makes it
    the exact mean over every sample the quorum trained.

    ``find_unused_parameters=True`` for the reason torchft's own wrapper gives: it keeps the reducer from
    rebuilding its buckets after the first step, so that a group that (re)started later has the same
    buckets as its peers in the cross-group all-reduce."""

    def __init__(self, manager, module: nn.Module, process_group, **kwargs) -> None:
        super().__init__(module, process_group=process_group, find_unused_parameters=True, **kwargs)
        self.register_comm_hook((process_group, manager), self._group_then_replicas_hook)

    @staticmethod
    def _group_then_replicas_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        group, manager = state
        # Always, even after a peer group failed in this step: every process of the group runs the same
        # sequence of in-group collectives. A failure here (a process of this group died) escapes: the
        # group's launcher restarts all of its processes.
        dist.all_reduce(bucket.buffer(), group=group)
        return FaultTolerantDDP._comm_hook(manager, bucket)


# A replica id's trailing digits are the group id, then the group's process count, each in this many digits:
# torchft orders the quorum by replica id as a string, which is then the order of the group ids, and hands
# every process each member's trailing digits (``global_ranks``), so that each one also learns every
# member's size from the very first quorum.
_DIGITS = len(str(MAX_REPLICA_GROUPS - 1))
MAX_GROUPS = 10**_DIGITS  # also the bound of a group's process count


def replica_id(group: int, processes: int) -> str:
    """torchft's replica id of replica group ``group`` of ``processes`` processes (torchft appends a
    per-start uuid): "imgtrain_g" + the group id and the process count, each zero-padded."""
    if not (0 <= group < MAX_GROUPS and 0 < processes < MAX_GROUPS):
        raise ValueError(f"replica group {group} of {processes} processes: both must be below {MAX_GROUPS}")
    return f"imgtrain_g{group:0{_DIGITS}d}{processes:0{_DIGITS}d}"


@dataclass(frozen=True)
class QuorumView:
    """One quorum as torchft handed it to the gradient process group: the members' replica group ids and
    process counts in torchft's order (one entry per member, so a group id used twice appears twice), and
    this group's position among them. torchft's Manager derives its ``participating_rank()`` and
    ``num_participants()`` (the gradient's divisor) from the same list."""

    quorum_id: int = -1
    rank: int = 0
    groups: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()


class MembersGloo(ProcessGroupGloo):
    """torchft's reconfigurable Gloo group that also keeps the current quorum (:class:`QuorumView`).

    The Manager passes each member as ``global_ranks``: its replica id's trailing digits (:func:`replica_id`)
    x this group's process count + this process's rank in its group, in the quorum's order, and this
    group's position in that order as ``rank``."""

    quorum: QuorumView = QuorumView()

    def __init__(self, timeout: timedelta, address: str | None = None) -> None:
        """``address``: the IP address of this host that Gloo listens on and hands its peers; None: Gloo's
        default (GLOO_SOCKET_IFNAME's interface, else the host name's address)."""
        super().__init__(timeout=timeout)
        self.address = address

    def configure(self, store_addr, replica_id, rank, world_size, quorum_id=None, group_rank=None,
                  group_world_size=None, global_ranks=None) -> None:  # fmt: skip
        digits = [m // (group_world_size or 1) for m in global_ranks or ()]
        self.quorum = QuorumView(
            quorum_id=-1 if quorum_id is None else quorum_id,
            rank=rank,
            groups=tuple(d // MAX_GROUPS for d in digits),
            sizes=tuple(d % MAX_GROUPS for d in digits),
        )
        super().configure(
            store_addr, replica_id, rank, world_size, quorum_id, group_rank, group_world_size, global_ranks
        )

    def _create_pg(self, store: dist.Store, rank: int, world_size: int) -> dist.ProcessGroup:
        """torchft's ``_create_pg`` with the Gloo backend built on a device at ``address`` (as
        ``torch.distributed.new_group`` builds one from options) instead of Gloo's default device; the rest
        as torchft does it."""
        if self.address is None:
            return super()._create_pg(store, rank, world_size)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = self._timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self.address)]
        backend = dist.ProcessGroupGloo(store, rank, world_size, options)
        backend._set_sequence_number_for_group()
        if self._global_ranks:
            backend.options.global_ranks_in_group = self._global_ranks
        if self._group_rank and self._group_world_size:
            backend.options.group_name = (
                f"torchft_quorum_{self._quorum_id}_rank_{self._group_rank % self._group_world_size}"
            )
        pg = dist.ProcessGroup(store, rank, world_size)
        pg._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
        for device in ["cpu"] + [d for d in ("cuda", "xpu") if getattr(torch, d).is_available()]:
            pg._register_backend(torch.device(device), dist.ProcessGroup.BackendType.GLOO, backend)
        return pg


@contextlib.contextmanager
def _substituted(module: types.ModuleType, name: str, value: object) -> Iterator[None]:
    """``module.<name>`` is ``value`` inside the block, and what it was again after it.

    torchft 0.2.0 offers no way in: ``Manager.__init__`` builds its ``ManagerServer`` and
    ``HTTPTransport.__init__`` its ``_IPv6HTTPServer`` inline, with the wildcard address written into the
    call, and both start serving before they return (binding elsewhere afterwards would already have
    listened on every interface). Swapping the module global is safe as imgtrain does it: torchft reads
    these two names only in those constructors, and imgtrain builds one Manager and one transport per
    process, in the thread that builds the Trainer, so no other thread builds one meanwhile. Code that
    builds torchft Managers or transports from several threads at once must not use these adapters."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def manager_on(host: str, **kwargs) -> Manager:
    """``torchft.Manager(**kwargs)`` whose ManagerServer listens on ``host`` (one IP address) instead of
    every interface."""
    server = torchft.manager.ManagerServer

    def bound(*args, bind: str, **server_kwargs):
        return server(*args, bind=host_port(host, int(bind.rsplit(":", 1)[1])), **server_kwargs)

    with _substituted(torchft.manager, "ManagerServer", bound):
        return Manager(**kwargs)


class WeightsOnlyHTTPTransport(HTTPTransport):
    """torchft's HTTP checkpoint transport (a recovering replica fetches a live peer's state) that loads
    what it receives with ``weights_only=True``: imgtrain's state is tensors and plain data, and a peer's
    bytes are never unpickled (torchft 0.2.0 loads with weights_only=False). Its server listens on
    ``host`` (one IP address) only. ``advertise``: the host a peer fetches from, in place of torchft's
    ``socket.gethostname()``."""

    def __init__(self, timeout: timedelta, num_chunks: int, host: str, advertise: str | None = None):
        self.advertise = advertise  # before the server starts: its start logs address()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(http_transport._IPv6HTTPServer):
            address_family = family

        def bound(address: tuple[str, int], handler):
            return Server((host, address[1]), handler)

        with _substituted(http_transport, "_IPv6HTTPServer", bound):
            super().__init__(timeout=timeout, num_chunks=num_chunks)

    def address(self) -> str:
        url = urllib.parse.urlsplit(super().address())
        if not self.advertise:
            return url.geturl()
        return url._replace(netloc=host_port(self.advertise, url.port)).geturl()

    @classmethod
    def _load_from_address(cls, address: str, timeout: timedelta) -> object:
        with urllib.request.urlopen(address, timeout=timeout.total_seconds()) as f:
            return _streaming_load(f, weights_only=True)


def forget_manager_address(host: str, port: int) -> None:
    """Removes from a replica group's store the keys under which its rank 0's Manager publishes the
    group's manager server: every other rank's Manager reads them (and waits while they are absent)."""
    store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False)
    try:
        for key in (MANAGER_ADDR_KEY, REPLICA_ID_KEY):
            store.delete_key(key)
    finally:
        # TCPStore has no close(): its connection ends with the object. Dropped here, not whenever a
        # failure's traceback lets go of this frame (the Manager opens its own client right after).
        del store
