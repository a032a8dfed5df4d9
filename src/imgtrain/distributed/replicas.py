"""Replicated mode (``fault_tolerance.mode: replicated``): replica groups under torchft.

Each replica group (one ``imgtrain launch``/torchrun of one or more processes, e.g. a node's GPUs) runs a
torchft ``Manager`` in each process (the group's rank 0 hosts its manager server). Before every step the
Manager asks the lighthouse for a quorum of the live groups; each gradient bucket is summed over the
group's own processes and then all-reduced over a reconfigurable Gloo group of exactly those groups (rank r
with rank r of each); after the backward pass every process of every group votes whether the step commits
(no peer died or froze inside it). A dead group's peers go on without restarting; a group
that comes back (or was frozen and fell behind) fetches the live state from a peer before its first step:
the Trainer's own ``state_dict()``, so model, optimizer, schedule, scaler, EMA, counters and the data
position arrive together; each process fetches from the same rank of the peer, so rank-local state (RNG
streams) heals per rank.

Exact data: a step's global sample set is a function of (epoch, position) through imgtrain's resumable
sampler (``num_groups x processes per group x batch_size`` samples per global micro-batch). Which of them a
group trains is decided after the quorum, by :func:`step_share`: under ``redistribute`` the groups present
split the whole set (the global batch is kept), under ``drop`` each present group trains its own slice and
the slices of the missing groups are skipped and counted; :func:`process_share` splits a group's share over
its processes. A step that does not commit is redone from the same samples.
docs/fault_tolerance.md ("Replicated mode") states the guarantees.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
import zlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from imgtrain.checkpoint import snapshot
from imgtrain.config import Config, ConfigError, bare_host
from imgtrain.data.sampler import ShardedBatchSampler, split_evenly
from imgtrain.distributed.process_group import DistInfo, barrier
from imgtrain.distributed.rendezvous import is_wildcard, tcp_store_on
from imgtrain.errors import ImgtrainError, QuorumError

log = logging.getLogger(__name__)


def step_share(
    gbatch: list[int], policy: str, num_groups: int, group_id: int, members: tuple[int, ...], rank: int
) -> list[int]:
    """This group's samples of one global micro-batch, given the quorum's ``members`` (replica group ids)
    and this group's ``rank`` among them. ``redistribute``: the members split the whole batch evenly;
    ``drop``: each group trains the slice it would train with every group present."""
    if policy == "redistribute":
        return split_evenly(gbatch, len(members))[rank]
    return split_evenly(gbatch, num_groups)[group_id]


def process_share(
    gbatch: list[int],
    policy: str,
    num_groups: int,
    group_id: int,
    members: tuple[int, ...],
    rank: int,
    process: int,
    processes: int,
) -> list[int]:
    """This process's samples of one global micro-batch: its group's :func:`step_share`, split evenly
    over the group's ``processes`` (``process`` is this one's rank in the group). With every group present
    and a full batch, group g's process p trains exactly what rank g x processes + p would train in one job
    of num_groups x processes ranks."""
    return split_evenly(step_share(gbatch, policy, num_groups, group_id, members, rank), processes)[process]


def trained_count(size: int, policy: str, num_groups: int, members: tuple[int, ...]) -> int:
    """Samples of a global micro-batch of ``size`` that the members train (the gradient's denominator)."""
    if policy == "redistribute":
        return size
    q, r = divmod(size, num_groups)
    return sum(q + (1 if g < r else 0) for g in members)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def state_digest(obj: Any) -> str:
    """A short checksum of a state dict's contents (every tensor's dtype, shape and bytes, every other
    value's repr): equal on the process that served a state and the one that healed from it. CRC-32, not a
    cryptographic hash, and only with ``fault_tolerance.replicated.state_digest``: it runs on the serving
    group's step (about 30 ms per 100 MB)."""
    return f"{_crc(obj, 0):08x}"


def _crc(obj: Any, crc: int) -> int:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"{t.dtype}{tuple(obj.shape)}".encode(), crc)
        return zlib.crc32(t.view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            crc = _crc(obj[k], zlib.crc32(repr(k).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):  # a tuple may come back as a list
        for v in obj:
            crc = _crc(v, zlib.crc32(b",", crc))
        return zlib.crc32(b"]", crc)
    return zlib.crc32(repr(obj).encode(), crc)


def _is_loopback(host: str) -> bool:
    """``torchrun --standalone`` gives its workers MASTER_ADDR=localhost, which no peer can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_address(
    bind: str | None,
    lighthouse: str,
    advertised: str | None = None,
    key: str = "fault_tolerance.replicated.bind",
) -> str:
    """The IP address a group's own servers listen on: ``bind``, else the address that the name the group
    advertises (``advertise_address``, by default the host name) resolves to: where the other groups connect.
    Either may be an IPv6 address in [brackets] (validated by the config: :func:`bare_host`)."""
    name = bind or advertised or socket.gethostname()
    name = bare_host(name) or name
    try:
        addr = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)[0][4][0]
    except OSError as e:
        raise ConfigError(key, bind, f"an address of this machine ({name} does not resolve: {e})") from None
    if bind is None and _is_loopback(addr):
        try:
            lh = socket.getaddrinfo(urlsplit(lighthouse).hostname, None, type=socket.SOCK_STREAM)[0][4][0]
        except OSError:  # left to the quorum request, whose error names the lighthouse
            lh = addr
        if not _is_loopback(lh):
            raise ConfigError(
                key,
                None,
                f"an address of this machine that the other replica groups reach: its name {name} "
                f"resolves to {addr} (loopback) and the lighthouse {lighthouse} is on another machine",
            )
    # A typo'd or foreign address would otherwise fail later, inside the store, torchft's Rust server or the
    # HTTP server, each with its own traceback.
    refused = _cannot_listen_on(addr)
    if refused:
        raise ConfigError(
            key, bind, f"an address of this machine ({name} is {addr}, which it cannot listen on: {refused})"
        )
    return addr


def _cannot_listen_on(addr: str) -> str | None:
    """Why this host cannot listen on the IP address ``addr`` (not one of its interfaces'), or None."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((addr, 0))
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_one_node(world_size: int, environ=os.environ) -> None:
    """A replica group is the processes of one node. Across nodes, its rank 0 would hand the other groups
    the store address of its own node, and ranks elsewhere would look for the group's store at their own
    advertised address: neither holds torchrun's store. Refused rather than left to hang."""
    local = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    if local != world_size:
        raise ConfigError(
            "fault_tolerance.mode",
            "replicated",
            f"one node per replica group (this group has {world_size} processes, {local} on this node): "
            "start one imgtrain launch / torchrun per node, each its own replica group",
        )


def _import_torchft() -> None:
    """torchft's Rust half reads RUST_LOG once, when torchft is first imported, and by default logs every
    quorum and every commit (a line per step and group): imported under RUST_LOG=warn unless the user set
    one, which is then removed again, so that no child process inherits it."""
    if "RUST_LOG" in os.environ:
        import torchft  # noqa: F401

        return
    os.environ["RUST_LOG"] = "warn"
    try:
        import torchft  # noqa: F401
    finally:
        del os.environ["RUST_LOG"]


def _gloo_address(advertised: str | None, environ=os.environ) -> str | None:
    """The IP address the gradient group's Gloo device listens on and hands its peers (MembersGloo): the
    advertised one, which must be an address of this host; None, Gloo's own default (the interface
    GLOO_SOCKET_IFNAME names, else whatever the host name resolves to, often 127.0.0.1), without one or when
    the user set GLOO_SOCKET_IFNAME, which wins."""
    if not advertised or environ.get("GLOO_SOCKET_IFNAME"):
        return None
    key = "fault_tolerance.replicated.advertise_address"
    try:
        found = socket.getaddrinfo(bare_host(advertised) or advertised, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(key, advertised, f"an address of this host (it does not resolve: {e})") from None
    for addr in (a[4][0] for a in found):
        if _cannot_listen_on(addr) is None:
            return addr
    raise ConfigError(
        key,
        advertised,
        "an address of one of this host's interfaces (or set GLOO_SOCKET_IFNAME to the one to use)",
    )


def _without_traceback(record: logging.LogRecord) -> bool:
    """A log filter: the record's message stays, its traceback goes (a traceback means a bug here)."""
    record.exc_info, record.exc_text = None, None
    return True


class Replicas:
    """The torchft side of one replica group, composed by the Trainer through narrow hooks:
    :meth:`wrap` (instead of DDP), :meth:`attach` (the sampler's share), :meth:`plan_holds` (before each
    step), :attr:`participants` (the gradient's divisor), :meth:`should_commit` (the optimizer step's gate)."""

    def __init__(
        self,
        cfg: Config,
        info: DistInfo,
        state_dict: Callable[[], dict[str, Any]],
        load_state_dict: Callable[[dict[str, Any]], None],
        emit: Callable[[dict[str, Any]], None],
    ):
        rc = cfg.fault_tolerance.replicated
        lighthouse, self.group_id = rc.resolved()
        _import_torchft()
        from imgtrain.internals.torchft import MembersGloo, WeightsOnlyHTTPTransport, manager_on, replica_id

        self.lighthouse, self.quorum_retries = lighthouse, rc.quorum_retries
        check_one_node(info.world_size)
        self.info, self.dist_cfg = info, cfg.distributed
        self.policy = rc.missing_group_policy
        self.num_groups = rc.num_groups
        self.digests = rc.state_digest
        self._state_dict, self._load_state_dict, self._emit = state_dict, load_state_dict, emit
        # The quorum hands this group's store address to its peers (they build the gradient process group
        # on it), and torchft its manager's and checkpoint server's: each must be one they reach.
        host = (rc.advertise_address and bare_host(rc.advertise_address)) or socket.gethostname()
        gloo = _gloo_address(rc.advertise_address)
        self.bind = bind_address(rc.bind, lighthouse, host)
        if is_wildcard(self.bind):
            log.warning("replica group %d listens on every interface (%s)", self.group_id, rc.bind)
        if "MASTER_ADDR" in os.environ:  # under torchrun: the agent's store (listening on every interface)
            addr = os.environ["MASTER_ADDR"]
            store_kw = {
                "store_addr": host if rc.advertise_address or _is_loopback(addr) else addr,
                "store_port": int(os.environ["MASTER_PORT"]),
            }
            _forget_dead_manager(info)
        else:  # a plain process: a store of its own
            self._store, _ = tcp_store_on(self.bind, 0, timeout=timedelta(seconds=rc.timeout))
            store_kw = {"store_addr": host, "store_port": self._store.port}
        # torchft logs every quorum and every commit at INFO, in Python and in Rust: a line per step.
        for name in ("torchft", "torchft_quorums", "torchft_commits"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # ... and a peer's failure, which it handles (the step is voted down), with a full traceback.
        for name in ("torchft.manager", "torchft.process_group", "torchft.checkpointing.http_transport"):
            logging.getLogger(name).addFilter(_without_traceback)
        self.pg = MembersGloo(timeout=timedelta(seconds=rc.collective_timeout), address=gloo)
        self.manager = manager_on(
            self.bind,
            pg=self.pg,
            load_state_dict=self._heal,
            state_dict=self._serve_state,
            min_replica_size=rc.min_replicas,
            # The quorum (and a heal) completes before the step's data is chosen: the share depends on
            # who is present, and a healed group must start the step from the peer's data position.
            use_async_quorum=False,
            timeout=timedelta(seconds=rc.timeout),
            quorum_timeout=timedelta(seconds=rc.quorum_timeout),
            connect_timeout=timedelta(seconds=rc.connect_timeout),
            quorum_retries=rc.quorum_retries,
            rank=info.rank,
            world_size=info.world_size,
            lighthouse_addr=lighthouse,
            replica_id=replica_id(self.group_id, info.world_size),  # decoded by MembersGloo
            heartbeat_interval=timedelta(seconds=rc.heartbeat_interval),
            hostname=f"[{host}]" if ":" in host else host,  # torchft's Rust writes http://{hostname}:{port}
            checkpoint_transport=WeightsOnlyHTTPTransport(
                timeout=timedelta(seconds=rc.timeout), num_chunks=0, host=self.bind, advertise=host
            ),
            **store_kw,
        )
        # The current quorum, all from the one list torchft hands the gradient group (MembersGloo): the
        # members' group ids in torchft's order (one per member group), this group's position among them.
        self.members: tuple[int, ...] = ()
        self.rank = 0
        self.quorum_id = -1
        self.committed = True
        self._first_commit_quorum: int | None = None  # the quorum of this process's first committed step
        self._healed_into = -1  # the quorum this process last healed to join
        self.heals = 0
        self.steps_dropped = 0
        self.samples_dropped = 0
        self._joined = False  # this step's quorum is done (reset by should_commit)
        self._stale = True  # the batches planned so far are not this step's any more
        self._healed_bytes: int | None = None
        self._healed_digest: str | None = None
        self._served: tuple[int, str | None] | None = None  # (step, digest) of the state served last
        log.info(
            "replicated mode: replica group %d of %d (%d processes), lighthouse %s, min replicas %d, "
            "missing groups: %s",
            self.group_id,
            self.num_groups,
            info.world_size,
            lighthouse,
            rc.min_replicas,
            self.policy,
        )

    # ------------------------------------------------------------------ composition hooks

    def wrap(self, model: nn.Module) -> nn.Module:
        from imgtrain.internals.torchft import FaultTolerantDDP, GroupFaultTolerantDDP

        if self.info.world_size == 1:
            return FaultTolerantDDP(self.manager, model)
        return GroupFaultTolerantDDP(
            self.manager,
            model,
            torch.distributed.group.WORLD,  # the group's own processes (its torchrun job)
            device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
            bucket_cap_mb=self.dist_cfg.bucket_cap_mb,
            gradient_as_bucket_view=self.dist_cfg.gradient_as_bucket_view,
        )

    def attach(self, sampler: ShardedBatchSampler) -> None:
        """The sampler cuts global micro-batches of num_groups x processes per group x batch_size and keeps
        this process's share."""
        sampler.world_size = self.num_groups * self.info.world_size
        sampler.rank = self.group_id * self.info.world_size + self.info.rank
        sampler.share = self._share

    def resume_at(self, step: int) -> None:
        """After resuming from a checkpoint: the Manager's step is the trainer's, so that the quorum
        heals the groups that are behind from the one that is furthest."""
        self.manager.load_state_dict({"step": step, "batches_committed": step})

    @property
    def participants(self) -> int:
        """Replica groups whose gradients the all-reduce averages in this step (each group's gradient is
        the sum over its processes): torchft's divisor, the length of the same list as :attr:`members`."""
        return max(1, len(self.members))

    def plan_holds(self) -> bool:
        """Joins this step's quorum (once per step; a group behind its peers heals here). True while the
        batches planned since :meth:`start_plan` are still this step's: no heal, no redone step, the same
        members."""
        self._join()
        return not self._stale

    def start_plan(self) -> None:
        """Called where the trainer plans its batches from the sampler's position."""
        self._join()
        self._stale = False

    def trained_sizes(self, sizes: list[int]) -> list[int]:
        return [trained_count(n, self.policy, self.num_groups, self.members) for n in sizes]

    def should_commit(self) -> bool:
        """The commit vote after the backward pass: False when a peer died or froze inside the step, or
        too few groups are present. Then the optimizer must not step; the step is redone."""
        self.committed = self.manager.should_commit()
        self._joined = False
        if self.committed:
            if self._first_commit_quorum is None:
                self._first_commit_quorum = self.quorum_id
            self._check_one_group_per_id()
        else:
            if self.manager.errored() is not None:
                # A peer may still wait inside this step's all-reduce for data from this group rather
                # than from the one that failed: closing the gradient group's connections fails that
                # wait now instead of after collective_timeout. The lighthouse gives the next quorum a
                # new id after a failed vote, so the Manager builds a new group there.
                self.pg.abort(errored=False)
            self._stale = True
            self.steps_dropped += 1
            self._emit(
                {
                    "event": "step_dropped",
                    "step": self.manager.current_step(),
                    "replica_group": self.group_id,
                    "quorum_id": self.quorum_id,
                    "steps_dropped": self.steps_dropped,
                }
            )
            log.warning(
                "replica group %d: step %d not committed (a peer failed inside it, or fewer than "
                "min_replicas): redone on the next quorum from the same samples",
                self.group_id,
                self.manager.current_step() + 1,
            )
        return self.committed

    def count_dropped(self, sizes: list[int]) -> None:
        """After a committed step under ``drop``: the samples of missing groups that it skipped."""
        dropped = sum(sizes) - sum(self.trained_sizes(sizes))
        if dropped:
            self.samples_dropped += dropped
            self._emit(
                {
                    "event": "samples_dropped",
                    "step": self.manager.current_step(),
                    "replica_group": self.group_id,
                    "samples": dropped,
                    "samples_dropped": self.samples_dropped,
                }
            )

    def close(self) -> None:
        self.manager.shutdown(wait=False)
        # The Manager's shutdown leaves the group to us: torchft's ProcessGroupGloo.shutdown() drops the torch
        # Gloo group it wraps, whose worker threads then end now, while the interpreter runs (left to
        # interpreter exit, one releasing a tensor aborts the process: docs/fault_tolerance.md).
        self.pg.shutdown()

    # ------------------------------------------------------------------ internals

    def _share(self, gbatch: list[int]) -> list[int]:
        return process_share(
            gbatch,
            self.policy,
            self.num_groups,
            self.group_id,
            self.members,
            self.rank,
            self.info.rank,
            self.info.world_size,
        )

    def _join(self) -> None:
        if self._joined:
            return
        t0 = time.perf_counter()
        self._healed_bytes = None
        try:
            self.manager.start_quorum()
        except ImgtrainError:  # a peer's state that does not fit this group (another model, other data)
            raise
        except Exception as e:  # the Rust client's errors are plain exceptions
            raise QuorumError(
                f"replica group {self.group_id}: no quorum from the lighthouse {self.lighthouse} after "
                f"{self.quorum_retries} retries ({type(e).__name__}: {e}); the last checkpoint of this group "
                "is where its restart resumes (or heals from a live peer)"
            ) from None
        healed = self._healed_bytes is not None
        if self._served is not None:
            step, digest = self._served
            self._served = None
            self._emit(
                {"event": "heal_served", "step": step, "replica_group": self.group_id}
                | ({"state_digest": digest} if digest is not None else {})
            )
        quorum = self.pg.quorum
        members, rank = quorum.groups or (self.group_id,), quorum.rank if quorum.groups else 0
        torchft_says = (self.manager.num_participants(), self.manager.participating_rank())
        if torchft_says != (len(members), rank):
            # torchft divides the gradient by its num_participants() but configures its process group (and
            # so the members here) only when the quorum id changes, and a restarted lighthouse counts ids
            # from 1 again: a quorum of other members can come under the id of the last one. Its step is
            # voted down and redone; the failed vote gives the next quorum a new id, configured afresh.
            self.manager.report_error(
                RuntimeError(
                    f"quorum {quorum.quorum_id} of {torchft_says[0]} groups (this one at {torchft_says[1]}) "
                    f"came with the process group of groups {list(members)} (this one at {rank})"
                )
            )
            log.warning(
                "replica group %d: quorum %d has other members than its process group (a restarted "
                "lighthouse reused the id): this step is dropped and the group set up again",
                self.group_id,
                quorum.quorum_id,
            )
        self._joined = True
        if members != self.members:
            self._stale = True
        self.members, self.rank = members, rank
        self._check_sizes(quorum.sizes)
        if healed:
            self._stale = True
            self._healed_into = quorum.quorum_id
            self.heals += 1
            seconds = time.perf_counter() - t0
            self._emit(
                {
                    "event": "heal",
                    "step": self.manager.current_step(),
                    "replica_group": self.group_id,
                    "heal_seconds": seconds,
                    "heal_bytes": self._healed_bytes,
                    "heals": self.heals,
                }
                | ({"state_digest": self._healed_digest} if self._healed_digest is not None else {})
            )
            log.warning(
                "replica group %d healed from a live peer: step %d, %.2f s, %d bytes",
                self.group_id,
                self.manager.current_step(),
                seconds,
                self._healed_bytes,
            )
        if quorum.quorum_id != self.quorum_id:
            self._on_new_quorum(quorum.quorum_id)

    def _on_new_quorum(self, quorum_id: int) -> None:
        self.quorum_id = quorum_id
        missing = sorted(set(range(self.num_groups)) - set(self.members))
        record = {
            "event": "quorum",
            "step": self.manager.current_step(),
            "replica_group": self.group_id,
            "quorum_id": self.quorum_id,
            "quorum_size": len(self.members),
            "members": list(self.members),
            "missing": missing,
            "policy": self.policy,
        }
        self._emit(record)
        if missing:
            log.warning(
                "replica group %d: quorum %d of groups %s, missing %s: %s",
                self.group_id,
                self.quorum_id,
                list(self.members),
                missing,
                "their shares of each step are trained by the groups present (global batch kept)"
                if self.policy == "redistribute"
                else "their shares of each step are dropped (counted as samples_dropped)",
            )
        else:
            log.info(
                "replica group %d: quorum %d of all %d groups",
                self.group_id,
                self.quorum_id,
                len(self.members),
            )

    def _serve_state(self) -> dict[str, Any]:
        # A copy on the same device that a peer can fetch while this group trains on: forward passes update
        # BatchNorm buffers in place, and the healed group must get the state of the step boundary it is told
        # about.
        state = snapshot(self._state_dict(), device=None)
        self._served = (self.manager.current_step(), state_digest(state) if self.digests else None)
        return state

    def _heal(self, state: dict[str, Any]) -> None:
        # Groups of different sizes cannot train together (the global batch counts every group's processes,
        # and rank r pairs with rank r): the group that joins, which heals, is the one refused.
        peer = (state.get("run") or {}).get("world_size")
        if peer is not None and int(peer) != self.info.world_size:
            raise ConfigError(
                "--nproc-per-node",
                self.info.world_size,
                f"{peer} (replica group {self.group_id} heals from a live group of {peer} processes): every "
                "replica group of a job runs the same number of processes",
            )
        self._load_state_dict(state)
        self._healed_bytes = _nbytes(state)
        self._healed_digest = state_digest(state) if self.digests else None

    def _check_sizes(self, sizes: tuple[int, ...]) -> None:
        """Every member's process count comes with the quorum (:func:`imgtrain.internals.torchft.replica_id`):
        a group that has not committed a step yet refuses a quorum with groups of another size, so groups
        started together are compared too, and not only a group that heals. A group already training goes
        on: the newcomer refuses itself."""
        other = next((n for n in sizes if n != self.info.world_size), None)
        if other is None or self._first_commit_quorum is not None:
            return
        raise ConfigError(
            "--nproc-per-node",
            self.info.world_size,
            f"{other} (replica group {self.group_id} is in a quorum with groups of "
            f"{sorted(set(sizes))} processes): every replica group of a job runs the same number of processes",
        )

    def _check_one_group_per_id(self) -> None:
        """After a committed step: another live group under this group's id. (A group that just died can
        still be in a quorum under the same id, as torchft's replica ids differ per start, but no step with
        it commits.) The group that joined in this quorum (its first committed step, or a heal) stops; one
        that was training goes on."""
        twins = self.members.count(self.group_id)
        if twins < 2 or self.quorum_id not in (self._first_commit_quorum, self._healed_into):
            return
        raise ConfigError(
            "fault_tolerance.replicated.group_id",
            self.group_id,
            f"an id no other live replica group of the job uses ({twins} live groups run as replica group "
            f"{self.group_id}; the key, or REPLICA_GROUP_ID when it is unset, must differ per group)",
        )


def _forget_dead_manager(info: DistInfo) -> None:
    """torchrun keeps one store for the whole job and hands it, unprefixed, to a restarted worker group:
    torchft's keys naming the group's manager server are still there from the processes it just killed, and
    a rank other than 0 would read that dead address instead of waiting for the new one. Rank 0 removes them
    before any rank builds its Manager (process_group.py has the same problem with torch's own keys)."""
    if info.world_size == 1:
        return  # rank 0 writes the keys before it reads them
    if info.rank == 0:
        from imgtrain.internals.torchft import forget_manager_address

        forget_manager_address(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    barrier(info)
