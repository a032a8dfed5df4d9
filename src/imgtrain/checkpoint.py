"""CheckpointManager: owns the state of a run and saves (async, atomic, verified), finds, loads and prunes
its checkpoints.

Components register their state (``register(name, obj)``: anything with ``state_dict()`` and
``load_state_dict()``: model, optimizer, grad scaler, EMA, sampler position, progress counters, RNG streams,
compression state). The manager then has ``save(step)``, ``maybe_save(step)``, ``load(which)``,
``resolve(path)``, ``list()`` and ``prune(keep)``; nobody else assembles or takes apart a checkpoint.

Layout, on a local disk or any fsspec store (``s3://``, ``gs://``)::

    <dir>/step_000001234/state.pt        the shared state (torch.save of plain data), written by rank 0
    <dir>/step_000001234/rank_R.pt       rank R's own state (RNG streams, compression error feedback),
                                         written by rank R itself: nothing rank-sized is gathered to rank 0
    <dir>/step_000001234/manifest.json   written last, by rank 0: sha256 and size of every file

A checkpoint exists only once its manifest does and every file matches it. On a local disk the directory
is written aside (``.tmp-*``: every rank puts its file there), fsynced and published by one rename once
every rank's file is in. On object stores, which have no rename, the manifest written last is the
publication. So a crash, ``kill -9`` or a full disk at any moment leaves either the complete new
checkpoint or nothing that resume would take. Loading uses ``torch.load(weights_only=True)``: a checkpoint
is data, never code. A checkpoint of another world size is loaded without its rank files (the caller
re-derives that state; :class:`Loaded` says which components were missing).

One retention rule, for training (``checkpoint.keep_last_n``), ``imgtrain checkpoints prune`` and
``scripts/cleanup.sh``: keep the ``keep`` newest checkpoints of this run that are complete and verify
(sha256 of every file against the manifest) and everything newer than the oldest of them (a save may be
in progress); remove this run's older ones, corrupt or not; with fewer than ``keep`` good ones remove
nothing. So the newest good checkpoint is never removed.

One writer per directory: the writer (rank 0) takes ``<dir>/writer.lock`` (a POSIX lock on a local or
network file system, a renewed lease object on object stores) for its lifetime, so a second writer (a
replacement pod starting while the evicted one still saves, or another run pointed at the same place)
waits for it or gives up with a CheckpointError naming the holder; it never deletes the holder's save in
progress. Every manifest records the run id of its writer, and a writer refuses a directory that holds
another run's checkpoints (it would resume from them, and overwrite or prune them).
"""

from __future__ import annotations

import builtins
import concurrent.futures
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
import torch

from imgtrain.config import CheckpointConfig, resolve_storage_options
from imgtrain.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
LOCK_FILE = "writer.lock"
FORMAT_VERSION = 1  # of the manifest
STATE_FORMAT = 2  # of state.pt: 1 held every rank's RNG streams and compression state (gathered to rank 0)
LEASE_TTL_S = 60.0  # an object-store lease not renewed for this long is taken over (a killed writer's)
_CHUNK = 1 << 20  # bytes per read while hashing: memory stays flat whatever the checkpoint's size
_STEP_DIR = re.compile(r"^step_(\d{9,})$")
_OLD_DIR = re.compile(r"^(step_\d{9,})\.old-[0-9a-f]+$")


def rank_file(rank: int) -> str:
    return f"rank_{rank}.pt"


def _rank_note(rank: int) -> str:
    """What rank R leaves beside its file for rank 0: the file's sha256 and size (or why it failed)."""
    return f"rank_{rank}.json"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def _ignore(_state: Any) -> None:
    pass


@dataclass
class Component:
    """A component made of two functions: what to save, and how to restore it (by default nothing: run
    metadata and the config are saved for the readers of a checkpoint, not restored)."""

    save: Callable[[], Any]
    load: Callable[[Any], None] = _ignore

    def state_dict(self) -> Any:
        return self.save()

    def load_state_dict(self, state: Any) -> None:
        self.load(state)


@dataclass
class _Registered:
    obj: Stateful
    rank_local: bool
    optional: bool


@dataclass
class SaveReport:
    step: int
    stall_s: float  # time the training loop was held: waiting for the previous save + copying state
    path: str


@dataclass
class CheckpointInfo:
    step: int
    path: str  # as the user would pass it to --resume
    problem: str | None = None  # why it does not verify (list(verify=True)); None: good or not checked


@dataclass
class Loaded:
    path: str
    step: int | None
    world_size: int | None  # of the job that saved it (None: written before it was recorded)
    restored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # registered, not in this checkpoint: re-derive them


@dataclass
class PruneReport:
    kept: list[str]
    removed: list[str]
    newest_valid: str | None
    dry_run: bool


def snapshot(obj: Any, device: str | torch.device | None = "cpu") -> Any:
    """Deep copy with every tensor detached and copied (to ``device``; None: where it is), so training
    may go on mutating the originals while the copy is serialized in the background or fetched by a
    healing peer."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device or obj.device, copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v, device)) for k, v in obj.items())
    if isinstance(obj, list):
        return [snapshot(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v, device) for v in obj)
    return obj


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


class CheckpointManager:
    """``is_writer``: this process publishes (rank 0: the lock, the shared state, the manifest, retention).
    Every rank writes its own rank-local state. ``agree`` gives every rank rank 0's value of a string (a
    broadcast; identity for one process): the checkpoint to load, the name of a save's temporary directory.
    ``rank_timeout``: how long rank 0 waits for the other ranks' files before giving up on a save."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        directory: str,
        is_writer: bool = True,
        run_id: str | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        agree: Callable[[str | None], str | None] | None = None,
        rank_timeout: float = 600.0,
    ):
        self.cfg = cfg
        self.directory = directory.rstrip("/")
        self.is_writer = is_writer
        self.run_id = run_id  # recorded in every manifest; None: checkpoints of any run are taken as ours
        self.rank, self.world_size = rank, world_size
        self._agree = agree or (lambda text: text)
        self.rank_timeout = rank_timeout
        self.storage_options = resolve_storage_options(cfg.storage_options, "checkpoint.storage_options")
        self.fs, self.root = fsspec.core.url_to_fs(self.directory, **self.storage_options)
        self.local = _is_local(self.fs)
        self._components: dict[str, _Registered] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self._pending: concurrent.futures.Future | None = None
        self._good: dict[str, Any] = {}  # name -> manifest creation time of checkpoints verified whole
        self.last_save_time = time.monotonic()
        self.last_published_step: int | None = None
        self.failures = 0
        self.last_write_seconds = 0.0  # of the last attempted write (monitoring)
        self._lock: _FileLock | _Lease | None = None
        if is_writer:
            self.fs.makedirs(self.root, exist_ok=True)
            self._lock = self._take_writer_lock()
            try:
                self._restore_interrupted_replacements()
                self._remove_stale_temporaries()
                self._refuse_other_runs()
            except BaseException:
                self._lock.release()
                raise

    # ---------------------------------------------------------------- the state

    def register(self, name: str, obj: Stateful, *, rank_local: bool = False, optional: bool = False) -> None:
        """Save ``obj.state_dict()`` under ``name`` and restore it with ``obj.load_state_dict``, in
        registration order. ``rank_local``: each rank's own (saved in its rank file, restored only at the
        same world size). ``optional``: a checkpoint without it loads (the component keeps its state)."""
        if name in self._components or name == "format":
            raise ValueError(f"checkpoint component '{name}' is registered twice or reserved")
        self._components[name] = _Registered(obj, rank_local, optional)

    def state_dict(self, shared: bool = True, rank_local: bool = True) -> dict[str, Any]:
        """The registered components' current state (live tensors, not copies), by name. Not collective:
        the rank-local entries are this rank's."""
        out: dict[str, Any] = {"format": STATE_FORMAT} if shared else {}
        for name, reg in self._components.items():
            if rank_local if reg.rank_local else shared:
                out[name] = reg.obj.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any], source: str = "state") -> Loaded:
        """Restore every registered component from ``state`` (as :meth:`state_dict` returns it). A component
        that does not fit is a CheckpointError naming ``source`` and the component."""
        loaded = Loaded(source, None, None)
        for name, reg in self._components.items():
            if state.get(name) is None:
                if not (reg.rank_local or reg.optional):
                    raise CheckpointError(
                        f"checkpoint {source} has no {name} state (not a training checkpoint)"
                    )
                loaded.missing.append(name)
                continue
            try:
                reg.obj.load_state_dict(state[name])
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint {source}: {e}") from None
            except Exception as e:  # noqa: BLE001 - torch's own checks: shapes, parameter groups
                # torch's message spans lines (one per mismatched tensor): the error stays one line.
                why = " ".join(str(e).split())
                raise CheckpointError(
                    f"checkpoint {source} does not fit the configured {name}: {why}"
                ) from None
            loaded.restored.append(name)
        return loaded

    # ---------------------------------------------------------------- public API

    def url(self, name: str) -> str:
        """A checkpoint's full location as the user would pass it to --resume."""
        if self.local:
            return os.path.join(self.root, name)
        return f"{self.directory}/{name}"

    def due(self, step: int, now: float | None = None) -> bool:
        """Whether the step- or time-based policy asks for a save after ``step`` (this rank's clock)."""
        if self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0:
            return True
        if self.cfg.save_interval is not None:
            now = time.monotonic() if now is None else now
            return now - self.last_save_time >= self.cfg.save_interval
        return False

    def maybe_save(self, step: int, now: float | None = None) -> SaveReport | None:
        """Save if :meth:`due`. Collective: every rank takes rank 0's decision (the time-based rule runs out
        at slightly different moments on each rank's clock)."""
        if self._agree("save" if self.due(step, now) else "") != "save":
            return None
        return self.save(step)

    def save(self, step: int, blocking: bool | None = None) -> SaveReport:
        """Publish the registered state as the checkpoint of ``step``. Collective: every rank calls it.

        With async saves only the previous save's completion (if it is still running) and the copy off the
        device are paid here; the files are written and published in the background.
        """
        t0 = time.perf_counter()
        self.last_save_time = time.monotonic()
        self.wait()
        # Names the temporary directory every rank writes into, so that a killed save's files are never
        # taken for this one's.
        nonce = self._agree(uuid.uuid4().hex[:8]) or ""
        shared = snapshot(self.state_dict(rank_local=False)) if self.is_writer else None
        local = snapshot(self.state_dict(shared=False)) if self._has_rank_local() else None
        stall = time.perf_counter() - t0
        blocking = (not self.cfg.async_save) if blocking is None else blocking
        if shared is not None or local is not None:
            if blocking:
                self._write(step, nonce, shared, local)
                stall = time.perf_counter() - t0
            else:
                self._pending = self._pool.submit(self._write, step, nonce, shared, local)
        return SaveReport(step, stall, self.url(step_dir_name(step)))

    def load(
        self,
        which: str = "latest",
        before_restore: Callable[[dict[str, Any], str], None] | None = None,
    ) -> Loaded | None:
        """Restore every registered component from ``which`` (``latest``: the newest checkpoint that
        verifies; else anything :meth:`resolve` takes). Collective: rank 0 picks the checkpoint and every
        rank loads the same one. None when ``latest`` finds nothing. ``before_restore(state, path)`` may
        refuse a checkpoint (a CheckpointError) or bring an older format up to date, in place."""
        outcome, source = None, None
        if self.rank == 0:
            try:
                path, source = self._find(which, fetch=True)
                outcome = "" if path is None else "+" + path
            except CheckpointError as e:
                outcome = "!" + str(e)
        outcome = self._agree(outcome) or ""
        if outcome.startswith("!"):
            raise CheckpointError(outcome[1:])
        if not outcome:
            return None
        path = outcome[1:]
        if source is None:
            source = _fetch_checked(path, self.storage_options)
        state = load_plain(source, f"checkpoint {path}")
        manifest = _read_manifest(*fsspec.core.url_to_fs(path, **self.storage_options)) or {}
        saved_world = manifest.get("world_size")
        mine = rank_file(self.rank)
        if self._has_rank_local() and mine in manifest.get("files", {}):
            if saved_world == self.world_size:
                state.update(
                    load_plain(_fetch_checked(path, self.storage_options, mine), f"checkpoint {path}")
                )
            elif self.rank == 0:
                log.warning(
                    "checkpoint %s: the rank-local state (%s) of its %s ranks is not restored: the job has %d",
                    path,
                    ", ".join(n for n, r in self._components.items() if r.rank_local),
                    saved_world,
                    self.world_size,
                )
        if before_restore is not None:
            before_restore(state, path)
        loaded = self.load_state_dict(state, path)
        loaded.step, loaded.world_size = manifest.get("step"), saved_world
        return loaded

    def resolve(self, which: str = "latest") -> str | None:
        """Where ``which`` points: ``latest`` (the newest checkpoint in this directory that verifies; None if
        there is none), or any form :func:`resolve_checkpoint` takes."""
        return self._find(which, fetch=False)[0]

    def list(self, verify: bool = False) -> list[CheckpointInfo]:
        """Every published-looking checkpoint directory, newest first; ``verify``: with why it is not good."""
        out = []
        for step, name in self._step_dirs():
            info = CheckpointInfo(step, self.url(name))
            if verify:
                try:
                    self._verify_whole(name)
                except CheckpointError as e:
                    info.problem = str(e)
            out.append(info)
        return out

    def prune(self, keep: int, dry_run: bool = False) -> PruneReport:
        """The retention rule (module docstring): keep the ``keep`` newest good checkpoints of this run and
        anything newer; remove this run's older ones. Another run's checkpoints are never counted or removed."""
        if keep < 1:
            raise ValueError("keep must be >= 1: the newest good checkpoint is never removed")
        ours: list[tuple[int, str]] = []
        for step, name in self._step_dirs():
            manifest = _read_manifest(self.fs, self._fs_path(name))
            if manifest is None or self._owns(manifest):
                ours.append((step, name))
        good: list[str] = []
        for _, name in ours:
            if len(good) == keep:
                break
            try:
                self._verify_whole(name)
                good.append(name)
            except CheckpointError:
                continue
        newest = self.url(good[0]) if good else None
        if len(good) < keep:
            return PruneReport([self.url(n) for _, n in ours], [], newest, dry_run)
        oldest_kept = next(s for s, n in ours if n == good[-1])
        doomed = [n for s, n in ours if s < oldest_kept]
        for name in doomed if not dry_run else ():
            log.info("retention: removing %s (keep %d)", self.url(name), keep)
            try:
                self.fs.rm(self._fs_path(name), recursive=True)
            except FileNotFoundError:
                pass  # already gone (`imgtrain checkpoints prune` run beside us)
            self._good.pop(name, None)
        return PruneReport(
            [self.url(n) for s, n in ours if s >= oldest_kept], [self.url(n) for n in doomed], newest, dry_run
        )

    def wait(self) -> None:
        """Block until the background save (if any) has finished."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # errors are logged in the worker; result() only re-raises bugs

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---------------------------------------------------------------- internals: finding

    def _step_dirs(self) -> builtins.list[tuple[int, str]]:
        """(step, name) of every step directory, newest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_DIR.match(name)
            if m:
                found.append((int(m.group(1)), name))
        return sorted(found, reverse=True)

    def _find(self, which: str, fetch: bool) -> tuple[str | None, str | io.BytesIO | None]:
        if which == "latest":
            return self._newest_good(fetch) or (None, None)
        return resolve_checkpoint(which, self.storage_options, fetch=fetch)

    def _newest_good(self, fetch: bool) -> tuple[str, str | io.BytesIO | None] | None:
        """The newest checkpoint whose state.pt verifies and whose rank files are all there, its state.pt
        hashed while it is read (object stores) or streamed before a memory-mapped load (local files): one
        read. Each rank checks the hash of its own rank file as it loads it. Bad ones, and another run's (when
        this manager has a run id), are logged and skipped."""
        for _, name in self._step_dirs():
            path = self.url(name)
            manifest = _read_manifest(self.fs, self._fs_path(name))
            if manifest is not None and not self._owns(manifest):
                log.warning(
                    "skipping checkpoint %s: of run '%s', this is run '%s'",
                    path,
                    manifest["run_id"],
                    self.run_id,
                )
                continue
            try:
                source = _fetch_verified(path, self.storage_options, keep=fetch)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path, e)
                continue
            return path, source if fetch else None
        return None

    def _verify_whole(self, name: str) -> None:
        """Every file of checkpoint ``name`` against its manifest; remembered, so that retention after each
        save reads only what it has not verified before (the checkpoint it just wrote is known good)."""
        manifest = _read_manifest(self.fs, self._fs_path(name))
        stamp = manifest.get("created_unix") if manifest else None
        if stamp is not None and self._good.get(name) == stamp:
            return
        verify(self.url(name), self.storage_options)
        self._good[name] = stamp

    def _has_rank_local(self) -> bool:
        return any(r.rank_local for r in self._components.values())

    # ---------------------------------------------------------------- internals: writing

    def _write(self, step: int, nonce: str, shared: dict | None, local: dict | None) -> None:
        name = step_dir_name(step)
        t0 = time.perf_counter()
        staging = None
        try:
            if self._lock is not None:
                self._lock.check()
            staging = self._staging(name, nonce)
            if local is not None:
                self._write_rank_file(staging, nonce, local)
            if shared is not None:
                self._publish(step, name, staging, nonce, shared)
        except Exception as e:  # noqa: BLE001 - a failed save must not kill a healthy run
            self.failures += 1
            log.error(
                "checkpoint save of step %d failed (%s: %s); the previous checkpoints are intact",
                step,
                type(e).__name__,
                e,
            )
            if staging is not None and not self.is_writer:
                self._tell_rank0(staging, nonce, e)
            elif staging is not None and self.local:
                _rmtree(staging)
        finally:
            self.last_write_seconds = time.perf_counter() - t0

    def _tell_rank0(self, staging: str, nonce: str, error: Exception) -> None:
        """Rank 0 waits for this rank's file: say now that it will not come, rather than at its timeout."""
        try:
            self._put(
                f"{staging}/{_rank_note(self.rank)}",
                {"nonce": nonce, "error": f"{type(error).__name__}: {error}"},
            )
        except Exception as e:  # noqa: BLE001 - rank 0 then gives up at rank_timeout
            log.warning("could not tell rank 0 that this rank's save failed: %s: %s", type(e).__name__, e)

    def _staging(self, name: str, nonce: str) -> str:
        """Where this save's files go: a temporary directory beside the published ones (local), or the step
        directory itself (object stores: the manifest written last publishes it)."""
        if self.local:
            path = os.path.join(self.root, f".tmp-{name}-{nonce}")
            os.makedirs(path, exist_ok=True)  # every rank: whichever comes first creates it
            return path
        path = f"{self.root}/{name}"
        self.fs.makedirs(path, exist_ok=True)  # a no-op on object stores; needed by file-like backends
        return path

    def _put(self, path: str, content: bytes | memoryview | dict) -> None:
        data = json.dumps(content, indent=1).encode() if isinstance(content, dict) else content
        if self.local:
            _write_fsync(path, data)
        else:
            with self.fs.open(path, "wb") as f:
                f.write(bytes(data))

    def _write_rank_file(self, staging: str, nonce: str, local: dict) -> None:
        data = _serialize(local)
        self._put(f"{staging}/{rank_file(self.rank)}", data)
        self._put(f"{staging}/{_rank_note(self.rank)}", {"nonce": nonce, **_entry(data)})

    def _publish(self, step: int, name: str, staging: str, nonce: str, shared: dict) -> None:
        data = _serialize(shared)
        if not self.local and self.fs.exists(f"{staging}/{MANIFEST}"):
            # Same step saved again: unpublish before overwriting. (The other ranks may already have
            # replaced their files: the old manifest then fails verification, which resume skips.)
            self.fs.rm(f"{staging}/{MANIFEST}")
        self._put(f"{staging}/{STATE_FILE}", data)
        files = {STATE_FILE: _entry(data)}
        if self._has_rank_local():
            files.update(self._rank_entries(staging, nonce))
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "created_unix": time.time(),
            "world_size": self.world_size,
            "files": files,
        }
        if self.run_id is not None:
            manifest["run_id"] = self.run_id
        if self.local:
            self._put(os.path.join(staging, MANIFEST), manifest)
            _fsync_dir(staging)
            self._rename_into_place(name, staging)
        else:
            self._put(f"{staging}/{MANIFEST}", manifest)
        self.last_published_step = step
        self._good[name] = manifest["created_unix"]  # hashed as it was written
        size = sum(f["bytes"] for f in files.values())
        log.info("checkpoint saved: %s (%.1f MB)", self.url(name), size / 1e6)
        self.prune(self.cfg.keep_last_n)

    def _rank_entries(self, staging: str, nonce: str) -> dict[str, dict]:
        """Waits until every rank has written its file of this save (its note says so) and returns their
        manifest entries; the notes are removed."""
        deadline = time.monotonic() + self.rank_timeout
        entries: dict[str, dict] = {}
        waiting = set(range(self.world_size))
        while waiting:
            if not self.local:  # the notes come from other processes: never answer from a cached listing
                self.fs.invalidate_cache(staging)
            for r in sorted(waiting):
                try:
                    with self.fs.open(f"{staging}/{_rank_note(r)}", "rb") as f:
                        note = json.loads(f.read())
                except (FileNotFoundError, ValueError):
                    continue  # not written yet (or being written)
                if note.get("nonce") != nonce:
                    continue  # an earlier save's
                if "error" in note:
                    raise CheckpointError(f"rank {r} could not write its {rank_file(r)}: {note['error']}")
                entries[rank_file(r)] = {"sha256": note["sha256"], "bytes": note["bytes"]}
                waiting.discard(r)
            if not waiting:
                break
            if time.monotonic() >= deadline:
                raise CheckpointError(
                    f"ranks {sorted(waiting)} did not write their rank_R.pt within "
                    f"{self.rank_timeout:.0f}s (distributed.init_timeout)"
                )
            time.sleep(0.05 if self.local else 0.5)
        for r in range(self.world_size):
            self.fs.rm(f"{staging}/{_rank_note(r)}")
        return entries

    def _rename_into_place(self, name: str, tmp: str) -> None:
        final = os.path.join(self.root, name)
        if os.path.exists(final):
            # Same step saved twice (epoch end, then preemption): the older copy gives way. A crash
            # between the two renames leaves only `old`: the next writer renames it back.
            old = f"{final}.old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            _rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)

    def _fs_path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _owns(self, manifest: dict) -> bool:
        owner = manifest.get("run_id")
        # Checkpoints written before run ids were recorded belong to whoever resumes them.
        return self.run_id is None or owner is None or owner == self.run_id

    def _take_writer_lock(self) -> _FileLock | _Lease:
        holder = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since_unix": round(time.time(), 3),
        }
        if self.local:
            lock: _FileLock | _Lease = _FileLock(os.path.join(self.root, LOCK_FILE), holder)
        else:
            lock = _Lease(self.fs, self._fs_path(LOCK_FILE), holder, LEASE_TTL_S)
        timeout = self.cfg.lock_timeout
        deadline = time.monotonic() + timeout
        other = lock.try_acquire()
        if other is not None:
            log.warning(
                "checkpoint.dir %s is locked by another writer (%s); waiting up to %.0fs "
                "(checkpoint.lock_timeout) for it to finish",
                self.directory,
                _describe(other),
                timeout,
            )
        while other is not None:
            if time.monotonic() >= deadline:
                lock.release()
                raise CheckpointError(
                    f"checkpoint.dir {self.directory} is locked by another writer ({_describe(other)}); waited "
                    f"{timeout:.0f}s (checkpoint.lock_timeout): stop that run, or give this run its own "
                    f"checkpoint.dir"
                )
            time.sleep(min(lock.poll_s, max(deadline - time.monotonic(), 0.0)))
            other = lock.try_acquire()
        return lock

    def _restore_interrupted_replacements(self) -> None:
        """A crash between the two renames of a same-step re-save leaves ``step_X.old-*`` (the published
        copy) and ``.tmp-step_X-*`` but no ``step_X``: put the published copy back before the temporaries
        are cleaned up."""
        if not self.local:
            return
        for e in os.scandir(self.root):
            m = _OLD_DIR.match(e.name)
            final = os.path.join(self.root, m.group(1)) if m else None
            if final and not os.path.exists(final) and os.path.exists(os.path.join(e.path, MANIFEST)):
                os.rename(e.path, final)
                _fsync_dir(self.root)
                log.warning(
                    "restored %s from %s: a save of the same step was interrupted between its two renames",
                    final,
                    e.name,
                )

    def _remove_stale_temporaries(self) -> None:
        if not self.local:
            return
        for e in os.scandir(self.root):
            if e.name.startswith(".tmp-step_") or ".old-" in e.name:
                _rmtree(e.path)

    def _refuse_other_runs(self) -> None:
        """One directory, one run: another run's checkpoints here would be resumed from, and overwritten
        (same step names) or pruned by this one."""
        for _, name in self._step_dirs():
            manifest = _read_manifest(self.fs, self._fs_path(name))
            if manifest is not None and not self._owns(manifest):
                raise CheckpointError(
                    f"checkpoint.dir {self.directory} holds checkpoints of run '{manifest['run_id']}' "
                    f"({self.url(name)}), this is run '{self.run_id}': give this run its own checkpoint.dir "
                    f"(--resume PATH still starts from one of them), or set monitoring.run_id="
                    f"{manifest['run_id']} if it is that run"
                )


def resolve_checkpoint(
    path: str, storage_options: dict | None = None, fetch: bool = False
) -> tuple[str, str | io.BytesIO | None]:
    """The one rule for naming a checkpoint (``--resume``, ``imgtrain eval --checkpoint``): a step directory
    or its state.pt (that checkpoint, verified when ``fetch``), a checkpoints directory or ``<it>/latest``
    (its newest checkpoint that verifies), a run directory (the same in its ``checkpoints/``), or another
    file (``model.pt``: itself). Returns (location, what torch.load reads when ``fetch``)."""
    so = storage_options or {}
    p = path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(p, **so)
    if p.endswith("/latest") and not fs.exists(root):
        return _newest_in(p[: -len("/latest")], so, fetch, path)
    if not fs.exists(root):
        raise CheckpointError(f"checkpoint {path}: not found")
    if fs.isfile(root):
        if root.rsplit("/", 1)[-1] == STATE_FILE:
            p = p[: -len(STATE_FILE) - 1]
        elif not fetch:
            return p, None
        elif _is_local(fs):
            return p, root
        else:
            with fs.open(root, "rb") as f:
                return p, io.BytesIO(f.read())
    elif not fs.exists(f"{root}/{MANIFEST}") and not _STEP_DIR.match(root.rsplit("/", 1)[-1]):
        if fs.isdir(f"{root}/checkpoints"):
            p = f"{p}/checkpoints"
        return _newest_in(p, so, fetch, path)
    return p, (_fetch_checked(p, so) if fetch else None)


def _newest_in(directory: str, storage_options: dict, fetch: bool, named: str) -> tuple[str, Any]:
    reader = CheckpointManager(CheckpointConfig(storage_options=storage_options), directory, is_writer=False)
    try:
        found = reader._newest_good(fetch)
    finally:
        reader.close()
    if found is None:
        raise CheckpointError(f"no valid checkpoint at {named}")
    return found


def read_checkpoint(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The shared state (or a ``model.pt``) that ``path`` names (:func:`resolve_checkpoint`), as plain data."""
    where, source = resolve_checkpoint(path, storage_options, fetch=True)
    return load_plain(source, f"checkpoint {where}")


# ---------------------------------------------------------------------------------------------------
# The writer lock


def _describe(holder: dict) -> str:
    since = holder.get("since_unix")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else ""
    return f"run '{holder.get('run_id')}', host {holder.get('host')}, pid {holder.get('pid')}{when}"


class _FileLock:
    """``fcntl.lockf`` on the lock file, held for the writer's lifetime. A POSIX record lock belongs to the
    process: it goes away however the writer dies (kill -9 included), and the DataLoader workers forked
    from the writer do not inherit it (with flock they would hold it until they noticed their parent's
    death). NFS supports it. The file holds the holder's run id, host and pid for the message of the
    writer that has to wait."""

    poll_s = 0.2

    def __init__(self, path: str, holder: dict):
        self.path, self.holder = path, holder
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> dict | None:
        """None once the lock is ours; else what the holder wrote (possibly nothing yet)."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                try:
                    return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
                except ValueError:
                    return {}
            # A file system without locks (some FUSE mounts): going on unlocked beats refusing to train.
            log.warning(
                "checkpoint lock %s: %s; a second writer on this directory would not be detected",
                self.path,
                e,
            )
            return None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.holder).encode(), 0)
        return None

    def check(self) -> None:
        pass  # held until the process ends or releases it

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the stale holder text is only read while locked
            self.fd = None


class _Lease:
    """Object stores have no locks: a lease object ``{run id, host, pid, token, expires_unix}`` that its
    holder renews every ttl/3 from a thread. Another writer waits until it expires (a killed holder's
    lease lapses after ``ttl``), or takes it at once when the holder is a dead process on this very host.
    Without compare-and-swap, two writers taking an expired lease together both write it: each reads it
    back after a pause and the one whose write did not stick backs off. A holder that finds its lease
    taken (it was stopped for longer than ttl) stops saving."""

    def __init__(self, fs, path: str, holder: dict, ttl: float):
        self.fs, self.path, self.ttl = fs, path, ttl
        self.holder = {**holder, "token": uuid.uuid4().hex}
        self.poll_s = min(1.0, ttl / 10)
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign content: treated as an expired lease

    def _write(self) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write(json.dumps({**self.holder, "expires_unix": time.time() + self.ttl}).encode())

    def _ours(self, lease: dict | None) -> bool:
        return lease is not None and lease.get("token") == self.holder["token"]

    def try_acquire(self) -> dict | None:
        cur = self._read()
        if cur and not self._ours(cur) and cur.get("expires_unix", 0) > time.time() and not _dead_here(cur):
            return cur
        self._write()
        time.sleep(self.poll_s)
        cur = self._read()
        if not self._ours(cur):
            return cur or {}
        self._renewer = threading.Thread(target=self._renew, name="ckpt-lease", daemon=True)
        self._renewer.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                cur = self._read()
                if not self._ours(cur):
                    self.lost = cur or {}
                    log.error(
                        "checkpoint lease %s was taken over by %s: this writer saves no more",
                        self.path,
                        _describe(self.lost),
                    )
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next renewal may succeed
                log.warning("checkpoint lease %s: renewal failed (%s: %s)", self.path, type(e).__name__, e)

    def check(self) -> None:
        if self.lost is not None:
            raise CheckpointError(
                f"the writer lease on this checkpoint.dir was taken over by {_describe(self.lost)}"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is None:
            return
        self._renewer.join()
        self._renewer = None
        try:
            if self._ours(self._read()):
                self.fs.rm(self.path)
        except Exception as e:  # noqa: BLE001 - it lapses by itself after ttl
            log.warning("checkpoint lease %s: not removed (%s: %s)", self.path, type(e).__name__, e)


def _dead_here(lease: dict) -> bool:
    """Whether the lease names a process of this host that no longer exists (a killed predecessor)."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---------------------------------------------------------------------------------------------------
# Files


def _read_manifest(fs, path: str) -> dict | None:
    """The manifest of checkpoint directory ``path``; None if it has none or it is unreadable."""
    try:
        with fs.open(f"{path}/{MANIFEST}", "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError):  # OSError: also a file (model.pt) named where a directory was expected
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_fsync(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _serialize(state: dict) -> memoryview:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getbuffer()


def _entry(data: memoryview) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _manifest_files(fs, root: str) -> dict[str, dict]:
    """The ``files`` of checkpoint directory ``root``'s manifest; CheckpointError if it has none."""
    mpath = f"{root}/{MANIFEST}"
    if not fs.exists(mpath):
        raise CheckpointError(f"no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        with fs.open(mpath, "rb") as f:
            files = json.loads(f.read())["files"]
        return {str(k): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])} for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"unreadable {MANIFEST}: {e}") from None


def _fetch_verified(
    path: str, storage_options: dict | None = None, keep: bool = True, name: str = STATE_FILE
) -> str | io.BytesIO:
    """Check file ``name`` of checkpoint ``path`` against the manifest; returns what torch.load should read:
    a local file by name (loaded memory-mapped), or the bytes of a remote one, hashed while they were
    downloaded (``keep``). The hash is streamed in chunks: nothing else holds the whole file. For state.pt,
    the other files (rank files) must be there with their sizes: each is hashed by the rank that loads it."""
    fs, root = fsspec.core.url_to_fs(path.rstrip("/"), **(storage_options or {}))
    files = _manifest_files(fs, root)
    if name not in files:
        raise CheckpointError(f"its {MANIFEST} lists no {name}")
    if name == STATE_FILE:
        for other, entry in files.items():
            if other != name and _size(fs, f"{root}/{other}") != entry["bytes"]:
                raise CheckpointError(f"{other} is missing or truncated")
    fpath = f"{root}/{name}"
    if not fs.exists(fpath):
        raise CheckpointError(f"{name} is missing")
    expected_bytes, expected_sha = files[name]["bytes"], files[name]["sha256"]
    sink = io.BytesIO() if keep and not _is_local(fs) else None
    digest, size = hashlib.sha256(), 0
    with fs.open(fpath, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
    if size != expected_bytes:
        raise CheckpointError(f"{name} is truncated or padded: {size} bytes, manifest says {expected_bytes}")
    if digest.hexdigest() != expected_sha:
        raise CheckpointError(
            f"{name} is corrupt: sha256 {digest.hexdigest()[:12]}... does not match the "
            f"manifest's {expected_sha[:12]}..."
        )
    if sink is None:
        return fpath
    sink.seek(0)
    return sink


def _size(fs, path: str) -> int | None:
    try:
        return int(fs.size(path))
    except (FileNotFoundError, TypeError):
        return None


def _fetch_checked(
    path: str, storage_options: dict | None = None, name: str = STATE_FILE
) -> str | io.BytesIO:
    """:func:`_fetch_verified`, its errors naming the checkpoint."""
    try:
        return _fetch_verified(path, storage_options, name=name)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path}: not found ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None


def load_plain(source: str | io.IOBase, what: str) -> dict[str, Any]:
    """torch.load as plain data (weights_only) of a local file by name (memory-mapped) or a file object."""
    try:
        # mmap: a local state.pt is paged in as the tensors are used, and ranks on one node share the
        # page cache instead of each holding its own copy of the file's bytes.
        return torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, str))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{what}: cannot be loaded as plain data: {e}") from None


def verify(path: str, storage_options: dict | None = None) -> None:
    """Raise CheckpointError unless the checkpoint at ``path`` is complete and every file matches its
    manifest (state.pt and every rank file)."""
    fs, root = fsspec.core.url_to_fs(path.rstrip("/"), **(storage_options or {}))
    for name in sorted(_manifest_files(fs, root), key=lambda n: n != STATE_FILE):
        _fetch_verified(path, storage_options, keep=False, name=name)
