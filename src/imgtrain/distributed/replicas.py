"""Replicated mode (``fault_tolerance.mode: replicated``): replica groups under torchft.

Each replica group (one ``imgtrain launch``/torchrun, one process) runs a torchft ``Manager``. Before
every step the Manager asks the lighthouse for a quorum of the live groups; the gradient all-reduce runs
over a reconfigurable Gloo group of exactly those; after the backward pass the groups vote whether the
step commits (no peer died or froze inside it). A dead group's peers go on without restarting; a group
that comes back (or was frozen and fell behind) fetches the live state from a peer before its first step:
the Trainer's own ``state_dict()``, so model, optimizer, schedule, scaler, EMA, counters and the data
position arrive together.

Exact data: a step's global sample set is a function of (epoch, position) through imgtrain's resumable
sampler (``num_groups x batch_size`` samples per global micro-batch). Which of them a group trains is
decided after the quorum, by :func:`step_share`: under ``redistribute`` the groups present split the whole
set (the global batch is kept), under ``drop`` each present group trains its own slice and the slices of
the missing groups are skipped and counted. A step that does not commit is redone from the same samples.
docs/fault_tolerance.md ("Replicated mode") states the guarantees.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from imgtrain.checkpoint import snapshot
from imgtrain.config import Config, ConfigError
from imgtrain.data.sampler import ShardedBatchSampler, split_evenly
from imgtrain.distributed.process_group import DistInfo
from imgtrain.errors import ImgtrainError, QuorumError

# torchft's Rust half reads RUST_LOG once, when torchft is first imported, and by default logs every
# quorum and every commit (a line per step and group). A RUST_LOG the user sets wins.
os.environ.setdefault("RUST_LOG", "warn")

from torchft import Manager  # noqa: E402

from imgtrain.internals.torchft import FaultTolerantDDP, MembersGloo, WeightsOnlyHTTPTransport  # noqa: E402

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


def _is_loopback(host: str) -> bool:
    """``torchrun --standalone`` gives its workers MASTER_ADDR=localhost, which no peer can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
        self.lighthouse, self.quorum_retries = lighthouse, rc.quorum_retries
        if info.world_size != 1:
            raise ConfigError(
                "fault_tolerance.mode",
                "replicated",
                f"one process per replica group (this group has {info.world_size}): start one "
                "imgtrain launch / torchrun with --nproc-per-node=1 per replica group",
            )
        self.policy = rc.missing_group_policy
        self.num_groups = rc.num_groups
        self._state_dict, self._load_state_dict, self._emit = state_dict, load_state_dict, emit
        # The quorum hands this group's store address to its peers (they build the gradient process group
        # on it): it must be one they reach. torchft advertises its own servers under the host name too.
        host = socket.gethostname()
        if "MASTER_ADDR" in os.environ:  # under torchrun: the agent's store (listening on every interface)
            addr = os.environ["MASTER_ADDR"]
            store_kw = {
                "store_addr": host if _is_loopback(addr) else addr,
                "store_port": int(os.environ["MASTER_PORT"]),
            }
        else:  # a plain process: a store of its own
            self._store = torch.distributed.TCPStore(host, 0, is_master=True, wait_for_workers=False)
            store_kw = {"store_addr": host, "store_port": self._store.port}
        # torchft logs every quorum and every commit at INFO, in Python and in Rust: a line per step.
        for name in ("torchft", "torchft_quorums", "torchft_commits"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # ... and a peer's failure, which it handles (the step is voted down), with a full traceback.
        for name in ("torchft.manager", "torchft.process_group", "torchft.checkpointing.http_transport"):
            logging.getLogger(name).addFilter(_without_traceback)
        self.pg = MembersGloo(timeout=timedelta(seconds=rc.collective_timeout))
        self.manager = Manager(
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
            rank=0,
            world_size=1,
            lighthouse_addr=lighthouse,
            replica_id=f"imgtrain_g{self.group_id}",  # the trailing digits are the group id (MembersGloo)
            heartbeat_interval=timedelta(seconds=rc.heartbeat_interval),
            checkpoint_transport=WeightsOnlyHTTPTransport(
                timeout=timedelta(seconds=rc.timeout), num_chunks=0
            ),
            **store_kw,
        )
        self.members: tuple[int, ...] = ()
        self.rank = 0
        self.quorum_id = -1
        self.committed = True
        self.heals = 0
        self.steps_dropped = 0
        self.samples_dropped = 0
        self._joined = False  # this step's quorum is done (reset by should_commit)
        self._stale = True  # the batches planned so far are not this step's any more
        self._healed_bytes: int | None = None
        log.info(
            "replicated mode: replica group %d of %d, lighthouse %s, min replicas %d, missing groups: %s",
            self.group_id,
            self.num_groups,
            lighthouse,
            rc.min_replicas,
            self.policy,
        )

    # ------------------------------------------------------------------ composition hooks

    def wrap(self, model: nn.Module) -> nn.Module:
        return FaultTolerantDDP(self.manager, model)

    def attach(self, sampler: ShardedBatchSampler) -> None:
        """The sampler cuts global micro-batches of num_groups x batch_size and keeps this group's share."""
        sampler.world_size = self.num_groups
        sampler.rank = self.group_id
        sampler.share = self._share

    def resume_at(self, step: int) -> None:
        """After resuming from a checkpoint: the Manager's step is the trainer's, so that the quorum
        heals the groups that are behind from the one that is furthest."""
        self.manager.load_state_dict({"step": step, "batches_committed": step})

    @property
    def participants(self) -> int:
        """Replica groups whose gradients the all-reduce averages in this step."""
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
        if not self.committed:
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

    # ------------------------------------------------------------------ internals

    def _share(self, gbatch: list[int]) -> list[int]:
        return step_share(gbatch, self.policy, self.num_groups, self.group_id, self.members, self.rank)

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
        members = self.pg.members or (self.group_id,)
        self._joined = True
        if members != self.members:
            self._stale = True
        self.members = members
        self.rank = self.manager.participating_rank() or 0
        if healed:
            self._stale = True
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
            )
            log.warning(
                "replica group %d healed from a live peer: step %d, %.2f s, %d bytes",
                self.group_id,
                self.manager.current_step(),
                seconds,
                self._healed_bytes,
            )
        if self.pg.quorum_id != self.quorum_id:
            self._on_new_quorum()

    def _on_new_quorum(self) -> None:
        self.quorum_id = self.pg.quorum_id
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
        return snapshot(self._state_dict(), device=None)

    def _heal(self, state: dict[str, Any]) -> None:
        self._load_state_dict(state)
        self._healed_bytes = _nbytes(state)
