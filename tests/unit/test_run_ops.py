"""`imgtrain checkpoints prune/list` and `imgtrain status`: what scripts/cleanup.sh and monitor.sh use."""

from __future__ import annotations

import json
import time

import pytest
import torch

from imgtrain.checkpoint import LOCK_FILE, CheckpointManager, Component
from imgtrain.cli import main
from imgtrain.config import CheckpointConfig
from imgtrain.tools.run_ops import prune_checkpoints, run_status


def _checkpoints(directory, steps) -> list[str]:
    mgr = CheckpointManager(CheckpointConfig(keep_last_n=100, async_save=False), str(directory))
    step = Component(lambda: torch.full((4,), float(mgr.last_save_time)))
    mgr.register("w", step)
    paths = [mgr.save(s).path for s in steps]
    mgr.close()
    return paths


def _corrupt(path: str) -> None:
    with open(f"{path}/state.pt", "r+b") as f:
        f.truncate(10)


def test_prune_keeps_the_newest_good_ones_and_anything_newer(tmp_path, capsys):
    p = _checkpoints(tmp_path, [10, 20, 30, 40])
    _corrupt(p[3])  # the newest is corrupt: the newest good one is step 30
    assert main(["checkpoints", "prune", str(tmp_path), "--keep", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {p[0]}" in out and f"would remove {p[1]}" in out and f"keep {p[2]}" in out
    assert all((tmp_path / f"step_{s:09d}").exists() for s in (10, 20, 30, 40))  # dry run: nothing gone

    report = prune_checkpoints(str(tmp_path), keep=1)
    assert report.newest_valid == p[2] and report.removed == [p[1], p[0]]
    # The writer's lock file stays (a POSIX lock file is never deleted: see checkpoint._FileLock).
    assert sorted(x.name for x in tmp_path.iterdir() if x.name != LOCK_FILE) == [
        "step_000000030",
        "step_000000040",
    ]
    assert main(["checkpoints", "list", str(tmp_path)]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["step"], r["state"][:3]) for r in listed] == [(40, "bad"), (30, "ok")]


def test_prune_removes_nothing_without_enough_good_checkpoints(tmp_path, capsys):
    p = _checkpoints(tmp_path, [1, 2])
    _corrupt(p[0])
    _corrupt(p[1])
    assert prune_checkpoints(str(tmp_path), keep=1).removed == []
    assert main(["checkpoints", "prune", str(tmp_path), "--keep", "1"]) == 0
    assert "nothing removed" in capsys.readouterr().err
    assert len(list(tmp_path.glob("step_*"))) == 2
    assert main(["checkpoints", "prune", str(tmp_path), "--keep", "0"]) == 2
    with pytest.raises(ValueError):
        prune_checkpoints(str(tmp_path), keep=0)


def test_status_reads_the_run_directory(tmp_path):
    assert run_status(str(tmp_path))["state"] == "not started"
    now = time.time()
    records = [
        {"event": "start", "time": now - 50, "world_size": 2, "step": 0},
        {"event": "train", "time": now - 40, "step": 7, "epoch": 1, "loss": 1.5, "images_per_s": 123.0},
        {"event": "checkpoint", "time": now - 30, "step": 7, "path": "/c/step_000000007"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"event": "tr')
    s = run_status(str(tmp_path), now=now)
    assert (s["state"], s["step"], s["images_per_s"], s["world_size"]) == ("running", 7, 123.0, 2)
    assert s["last_checkpoint"] == "/c/step_000000007"
    assert run_status(str(tmp_path), now=now + 3600)["state"] == "stalled"
    (tmp_path / "summary.json").write_text("{}")
    assert run_status(str(tmp_path), now=now + 3600)["state"] == "finished"


@pytest.mark.parametrize(("event", "code"), [("failed", 1), ("diverged", 5), ("failed", 3)])
def test_status_of_a_failed_or_diverged_run_says_so_with_the_exit_code(event, code, tmp_path):
    now = time.time()
    records = [
        {"event": "start", "time": now - 50, "world_size": 1, "step": 0},
        {"event": "train", "time": now - 40, "step": 7, "epoch": 1, "loss": 1.5, "images_per_s": 123.0},
        {"event": event, "time": now - 30, "step": 7, "exit_code": code, "error": "DataError: boom"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for t in (now, now + 3600):  # neither running nor, later, stalled
        s = run_status(str(tmp_path), now=t)
        assert (s["state"], s["exit_code"], s["error"]) == (event, code, "DataError: boom")
    # An elastic restart logs a new start: running again.
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "start", "time": now - 10, "world_size": 1, "step": 7}) + "\n")
    assert run_status(str(tmp_path), now=now)["state"] == "running"


def test_status_ignores_the_summary_of_an_earlier_run_in_the_same_directory(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    now = time.time() + 100  # the rerun started after that summary was written
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "start", "time": now - 5, "step": 0}) + "\n")
    assert run_status(str(tmp_path), now=now)["state"] == "running"
