"""Checkpoint directory safety across processes: one writer at a time (a POSIX lock held by another
process, a lease left by a dead one) and a same-step re-save killed between its two renames put back."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import pytest
import torch

from imgtrain import checkpoint as ckpt
from imgtrain.checkpoint import CheckpointError, CheckpointManager, verify
from imgtrain.config import CheckpointConfig

from conftest import WAIT, subprocess_env, wait_for


def _cfg(**kw) -> CheckpointConfig:
    return CheckpointConfig(async_save=False, **kw)


def _load_latest(mgr: CheckpointManager) -> tuple[str, torch.Tensor]:
    """(path, "w") of the newest good checkpoint, restored through the manager."""
    box: dict = {"w": None}
    mgr.register("w", ckpt.Component(lambda: box["w"], lambda value: box.update(w=value)))
    return mgr.load().path, box["w"]


def _helper(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, what: str, proc: subprocess.Popen | None = None):
    """conftest.wait_for, failing at once with the helper's stderr if it exits first."""

    def helper_output() -> str:
        if proc.poll() is None:  # reading its pipe would wait for it to exit
            return "the helper is still running"
        return f"helper exited ({proc.returncode}): {proc.stderr.read()}"

    return wait_for(
        cond,
        WAIT,
        what,
        poll=0.02,
        ended=None if proc is None else lambda: proc.poll() is not None,
        context=None if proc is None else helper_output,
    )


# A writer in another process whose save of step 5 stops after writing state.pt into its temporary
# directory, until the test creates <ctl>/go; it then holds the lock until <ctl>/release exists.
SLOW_WRITER = """
    import os, sys, time
    from pathlib import Path
    import torch
    from imgtrain import checkpoint
    from imgtrain.config import CheckpointConfig

    directory, ctl = sys.argv[1], Path(sys.argv[2])
    real_write = checkpoint._write_fsync

    def wait(name):
        while not (ctl / name).exists():
            time.sleep(0.01)

    def slow_write(path, data):
        real_write(path, data)
        if path.endswith(checkpoint.STATE_FILE):
            (ctl / "saving").touch()
            wait("go")

    checkpoint._write_fsync = slow_write
    mgr = checkpoint.CheckpointManager(CheckpointConfig(async_save=False), directory, run_id="run-a")
    mgr.register("w", checkpoint.Component(lambda: torch.ones(4)))
    mgr.save(5)
    (ctl / "saved").touch()
    wait("release")
    mgr.close()
"""


def test_second_writer_is_refused_naming_the_holder_and_leaves_its_save_alone(tmp_path, caplog):
    directory, ctl = tmp_path / "ckpt", tmp_path / "ctl"
    ctl.mkdir()
    proc = _helper(SLOW_WRITER, str(directory), str(ctl))
    try:
        _wait_for(lambda: (ctl / "saving").exists(), "the first writer's save to start", proc)
        in_progress = list(directory.glob(".tmp-step_000000005-*"))
        assert in_progress

        # Another run pointed at the same directory: refused after checkpoint.lock_timeout, naming the holder.
        with pytest.raises(CheckpointError) as err:
            CheckpointManager(_cfg(lock_timeout=0.5), str(directory), run_id="run-b")
        msg = str(err.value)
        assert "is locked by another writer" in msg and "checkpoint.lock_timeout" in msg and "\n" not in msg
        assert f"run 'run-a', host {socket.gethostname()}, pid {proc.pid}" in msg
        assert all(p.exists() for p in in_progress), "the second writer deleted the save in progress"

        (ctl / "go").touch()
        _wait_for(lambda: (ctl / "saved").exists(), "the first writer's save to finish", proc)
        verify(str(directory / "step_000000005"))

        # A replacement of the same run waits for the lock instead (an evicted pod still saving).
        got: dict = {}

        def replacement():
            got["mgr"] = CheckpointManager(_cfg(lock_timeout=WAIT), str(directory), run_id="run-a")
            got["at"] = time.monotonic()

        caplog.set_level(logging.WARNING, logger="imgtrain.checkpoint")
        t = threading.Thread(target=replacement)
        t.start()
        _wait_for(lambda: "waiting up to" in caplog.text, "the replacement to wait for the lock")
        released = time.monotonic()
        (ctl / "release").touch()
        t.join(WAIT)
        assert "mgr" in got and got["at"] > released
        assert proc.wait(WAIT) == 0, proc.stderr.read()
        path, w = _load_latest(got["mgr"])
        assert path == str(directory / "step_000000005") and torch.equal(w, torch.ones(4))
        got["mgr"].close()
    finally:
        for name in ("go", "release"):
            (ctl / name).touch()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


CRASH_BETWEEN_RENAMES = """
    import os, sys
    import torch
    from imgtrain.checkpoint import CheckpointManager, Component
    from imgtrain.config import CheckpointConfig

    mgr = CheckpointManager(CheckpointConfig(async_save=False), sys.argv[1], run_id="run-a")
    w = {"value": torch.ones(4)}
    mgr.register("w", Component(lambda: w["value"]))
    mgr.save(5)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # step_5 -> step_5.old-* is done; tmp -> step_5 never happens
            os._exit(9)
        real_rename(src, dst)

    os.rename = rename
    w["value"] = torch.full((4,), 2.0)
    mgr.save(5)
"""


def test_crash_between_the_renames_of_a_same_step_resave_restores_the_published_copy(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    proc = _helper(CRASH_BETWEEN_RENAMES, str(directory))
    assert proc.wait(WAIT) == 9, proc.stderr.read()
    assert not (directory / "step_000000005").exists()
    assert list(directory.glob("step_000000005.old-*")) and list(directory.glob(".tmp-step_000000005-*"))

    caplog.set_level(logging.WARNING, logger="imgtrain.checkpoint")
    mgr = CheckpointManager(_cfg(), str(directory), run_id="run-a")
    assert "restored" in caplog.text and "interrupted between its two renames" in caplog.text
    assert sorted(p.name for p in directory.iterdir()) == ["step_000000005", ckpt.LOCK_FILE]
    path, w = _load_latest(mgr)
    assert path == str(directory / "step_000000005") and torch.equal(w, torch.ones(4))
    mgr.close()


# ------------------------------------------------------------------------------------------- run ids


def test_a_lease_left_by_a_dead_process_of_this_host_is_taken_at_once(memdir):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    fs = fsspec.filesystem("memory")
    fs.makedirs(memdir, exist_ok=True)
    fs.pipe(
        f"{memdir}/{ckpt.LOCK_FILE}",
        json.dumps(
            {
                "run_id": "run-a",
                "host": socket.gethostname(),
                "pid": int(dead.stdout),
                "token": "x",
                "expires_unix": time.time() + 3600,
            }
        ).encode(),
    )
    CheckpointManager(_cfg(lock_timeout=0), memdir, run_id="run-a").close()
