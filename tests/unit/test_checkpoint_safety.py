"""Checkpoint directory safety: one writer at a time (a lease on object stores; the POSIX lock across
processes and the interrupted same-step re-save are tests/integration/test_checkpoint_processes.py), run
ids in manifests, streamed verification and memory-mapped loading."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import tracemalloc
from pathlib import Path

import fsspec
import pytest
import torch

from imgtrain import checkpoint as ckpt
from imgtrain.checkpoint import (
    MANIFEST,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    read_checkpoint,
    verify,
)

from conftest import Box, sync_cfg, wait_for

WAIT = 240  # generous: the machine running the tests may be slow and busy


def _box(mgr: CheckpointManager) -> Box:
    """The checkpoint's "w" component (registered on first use)."""
    if not hasattr(mgr, "box"):
        mgr.box = Box()
        mgr.register("w", mgr.box)
    return mgr.box


def _put(mgr: CheckpointManager, step: int, value: torch.Tensor) -> None:
    _box(mgr).value = value
    mgr.save(step)


def _load_latest(mgr: CheckpointManager) -> tuple[str, torch.Tensor]:
    """(path, "w") of the newest good checkpoint, restored through the manager."""
    box = _box(mgr)
    return mgr.load().path, box.value


def _save(directory, steps, run_id="run-a", value=None, **kw) -> CheckpointManager:
    mgr = CheckpointManager(sync_cfg(**kw), str(directory), run_id=run_id)
    for s in steps:
        _put(mgr, s, torch.full((4,), float(s if value is None else value)))
    return mgr


# ------------------------------------------------------------------------------------------- run ids


def test_manifest_records_the_run_id_and_another_run_is_refused(tmp_path):
    _save(tmp_path, [1, 2], run_id="run-a").close()
    assert json.loads((tmp_path / "step_000000002" / MANIFEST).read_text())["run_id"] == "run-a"
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(sync_cfg(), str(tmp_path), run_id="run-b")
    msg = str(err.value)
    assert "holds checkpoints of run 'run-a'" in msg and "this is run 'run-b'" in msg
    assert "monitoring.run_id=run-a" in msg and "--resume PATH" in msg
    verify(str(tmp_path / "step_000000001"))
    verify(str(tmp_path / "step_000000002"))
    # The same run (a restart) goes on; so does a reader of any run.
    _save(tmp_path, [3], run_id="run-a").close()
    assert CheckpointManager(sync_cfg(), str(tmp_path), is_writer=False).resolve("latest").endswith("3")


def test_checkpoints_without_a_run_id_are_resumed(tmp_path):
    _save(tmp_path, [1], run_id=None).close()
    assert "run_id" not in json.loads((tmp_path / "step_000000001" / MANIFEST).read_text())
    mgr = _save(tmp_path, [2], run_id="run-a", keep_last_n=1)
    assert [c.step for c in mgr.list()] == [2]  # and pruned as our own
    mgr.close()


def test_a_reader_with_a_run_id_skips_another_runs_newer_checkpoint(tmp_path):
    # Replicated mode reads every group's directory this way: a newer checkpoint of another run (a group
    # directory left from an earlier run) is not resumed from.
    _save(tmp_path / "mine", [4], run_id="run-b").close()
    _save(tmp_path / "other", [9], run_id="run-a").close()
    for directory, expected in (("mine", "step_000000004"), ("other", None)):
        reader = CheckpointManager(sync_cfg(), str(tmp_path / directory), is_writer=False, run_id="run-b")
        found = reader.resolve("latest")
        reader.close()
        assert (found and found.rsplit("/", 1)[-1]) == expected
    # Without a run id (`imgtrain checkpoints`, --resume PATH) a reader takes any run's.
    assert (
        CheckpointManager(sync_cfg(), str(tmp_path / "other"), is_writer=False)
        .resolve("latest")
        .endswith("9")
    )


def test_retention_never_removes_another_runs_checkpoint(tmp_path):
    mgr = _save(tmp_path, [1, 2], run_id="run-b", keep_last_n=2)
    # Another run's checkpoint appears beside ours (a file system without locks, a hand copy).
    foreign = tmp_path / "step_000000000"
    shutil.copytree(tmp_path / "step_000000001", foreign)
    manifest = json.loads((foreign / MANIFEST).read_text())
    (foreign / MANIFEST).write_text(json.dumps({**manifest, "run_id": "run-a"}))
    _put(mgr, 3, torch.zeros(4))
    _put(mgr, 4, torch.zeros(4))
    mgr.close()
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [
        "step_000000000",
        "step_000000003",
        "step_000000004",
    ]


# ------------------------------------------------------------------------------- object-store lease


def test_lease_refuses_a_second_writer_until_released(memdir):
    first = _save(memdir, [1], run_id="run-a")
    lease = json.loads(fsspec.filesystem("memory").cat(f"{memdir}/{ckpt.LOCK_FILE}"))
    assert lease["run_id"] == "run-a" and lease["pid"] == os.getpid() and lease["expires_unix"] > time.time()
    with pytest.raises(CheckpointError, match=f"run 'run-a', host {socket.gethostname()}, pid {os.getpid()}"):
        CheckpointManager(sync_cfg(lock_timeout=0.3), memdir, run_id="run-a")
    first.close()
    assert not fsspec.filesystem("memory").exists(f"{memdir}/{ckpt.LOCK_FILE}")
    second = CheckpointManager(sync_cfg(lock_timeout=0.3), memdir, run_id="run-a")
    assert second.resolve("latest") == f"{memdir}/step_000000001"
    second.close()


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops_saving(memdir, monkeypatch, caplog):
    monkeypatch.setattr(ckpt, "LEASE_TTL_S", 0.6)
    stalled = _save(memdir, [1], run_id="run-a")

    def store_unreachable():
        raise OSError("store unreachable")

    stalled._lock._write = store_unreachable  # its renewals stop reaching the store: the lease lapses
    taker = CheckpointManager(sync_cfg(lock_timeout=WAIT), memdir, run_id="run-a")
    caplog.set_level(logging.ERROR, logger="imgtrain.checkpoint")
    wait_for(lambda: stalled._lock.lost is not None, WAIT, "the old holder to notice the takeover", poll=0.02)
    _put(stalled, 2, torch.zeros(4))
    assert stalled.failures == 1 and "taken over by run 'run-a'" in caplog.text
    assert [c.step for c in taker.list()] == [1]
    _put(taker, 2, torch.zeros(4))
    assert taker.failures == 0 and [c.step for c in taker.list()][0] == 2
    taker.close()
    stalled.close()


# ------------------------------------------------------------------------- streamed hash, mmap load


def _mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``t``'s data (Linux /proc/self/maps), if any."""
    ptr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= ptr < end:
            return fields[5] if len(fields) == 6 else None
    return None


def test_load_memory_maps_a_local_checkpoint(tmp_path):
    _save(tmp_path, [1]).close()
    state = str(tmp_path / "step_000000001" / STATE_FILE)
    sd = read_checkpoint(str(tmp_path / "step_000000001"))
    assert _mapped_file(sd["w"]) == state
    mgr = CheckpointManager(sync_cfg(), str(tmp_path), is_writer=False)
    assert _mapped_file(_load_latest(mgr)[1]) == state


def test_verification_streams_the_file(tmp_path):
    mgr = CheckpointManager(sync_cfg(), str(tmp_path), run_id="run-a")
    _put(mgr, 1, torch.zeros(12 << 20, dtype=torch.uint8))  # 12 MiB + the pickle
    mgr.close()
    tracemalloc.start()
    try:
        verify(str(tmp_path / "step_000000001"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20, f"verification held {peak / 2**20:.1f} MiB: the file was read whole"


def test_the_newest_checkpoint_is_read_once_to_verify_and_load(tmp_path, monkeypatch):
    _save(tmp_path, [1, 2]).close()
    fs = fsspec.filesystem("file")
    opened: list[str] = []
    real_open = type(fs)._open

    def counting_open(self, path, *args, **kwargs):
        opened.append(path)
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(type(fs), "_open", counting_open)
    real_load = torch.load
    loads: list = []
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loads.append(f) or real_load(f, *a, **k))
    path, w = _load_latest(CheckpointManager(sync_cfg(), str(tmp_path), is_writer=False))
    assert path == str(tmp_path / "step_000000002") and torch.equal(w, torch.full((4,), 2.0))
    reads = [p for p in opened if p.endswith(STATE_FILE)] + [f for f in loads if not isinstance(f, str)]
    assert reads == [str(tmp_path / "step_000000002" / STATE_FILE)]  # hashed once, then mmapped by name
