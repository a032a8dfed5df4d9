"""The checkpoint manager's public API: components register their state; save / maybe_save / load /
resolve / list / prune; each rank saves its own rank-local state beside the shared state; one retention
rule for training and `imgtrain checkpoints prune`."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import fsspec
import pytest
import torch
from torch import nn

from imgtrain.checkpoint import (
    MANIFEST,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    Component,
    read_checkpoint,
    verify,
)
from imgtrain.tools.run_ops import prune_checkpoints
from imgtrain.train.state import Progress

from conftest import Box, sync_cfg

WAIT = 120  # generous: the machine running the tests may be slow and busy


def _tiny(directory: Path, steps, keep: int = 100) -> None:
    mgr = CheckpointManager(sync_cfg(keep_last_n=keep), str(directory))
    box = Box()
    mgr.register("w", box)
    for s in steps:
        box.value = torch.full((2,), float(s))
        mgr.save(s)
    mgr.close()


def _truncate(step_dir: Path, name: str = STATE_FILE) -> None:
    with open(step_dir / name, "r+b") as f:
        f.truncate(10)


def test_registered_components_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    progress = Progress(epoch=1, step=7, images_seen=28)
    mine = Box(torch.arange(3.0))
    mgr = CheckpointManager(sync_cfg(async_save=True), str(tmp_path), run_id="r")
    mgr.register("model", model)
    mgr.register("optimizer", opt)
    mgr.register("progress", progress)
    mgr.register("config", Component(lambda: {"lr": 0.1}))  # saved for readers, not restored
    mgr.register("mine", mine, rank_local=True)
    report = mgr.save(progress.step)
    mgr.wait()
    assert report.path == str(tmp_path / "step_000000007")
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = opt.state_dict()["state"][0]["momentum_buffer"].clone()

    # Training goes on and changes everything; loading brings every component back.
    with torch.no_grad():
        model.weight.add_(1.0)
    opt.state_dict()["state"][0]["momentum_buffer"].zero_()
    progress.step, mine.value = 99, None
    loaded = mgr.load()
    mgr.close()
    assert (loaded.path, loaded.step, loaded.world_size) == (report.path, 7, 1)
    assert loaded.restored == ["model", "optimizer", "progress", "config", "mine"] and loaded.missing == []
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved_weights.items())
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], momentum)
    assert (progress.epoch, progress.step, progress.images_seen) == (1, 7, 28)
    assert torch.equal(mine.value, torch.arange(3.0))
    # The shared state and the rank's own file, each in the manifest with its sha256.
    step_dir = Path(report.path)
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["rank_0.pt", STATE_FILE] and all(len(f["sha256"]) == 64 for f in files.values())
    shared = torch.load(step_dir / STATE_FILE, weights_only=True)
    assert "mine" not in shared and shared["config"] == {"lr": 0.1}
    assert list(torch.load(step_dir / "rank_0.pt", weights_only=True)) == ["mine"]
    assert sorted(p.name for p in step_dir.iterdir()) == [MANIFEST, "rank_0.pt", STATE_FILE]


def test_a_component_that_does_not_fit_is_an_error_naming_the_checkpoint_and_the_component(tmp_path):
    mgr = CheckpointManager(sync_cfg(), str(tmp_path))
    mgr.register("model", nn.Linear(3, 2))
    path = mgr.save(1).path
    mgr.close()
    other = CheckpointManager(sync_cfg(), str(tmp_path))
    other.register("model", nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not fit the configured model: .*size"):
        other.load()
    other.register("scaler", Box())
    with pytest.raises(CheckpointError, match=f"checkpoint {path} has no scaler state"):
        other.load_state_dict({"model": nn.Linear(4, 2).state_dict()}, path)
    other.close()


def test_maybe_save_follows_the_due_rule(tmp_path):
    mgr = CheckpointManager(sync_cfg(save_every_steps=3), str(tmp_path))
    mgr.register("w", Box(torch.zeros(1)))
    saved = [s for s in range(1, 8) if mgr.maybe_save(s) is not None]
    assert saved == [3, 6]
    assert [c.step for c in mgr.list()] == [6, 3]
    mgr.close()


def test_resolve_takes_every_form_a_user_names_a_checkpoint_by(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _tiny(ckpts, [1, 2, 3])
    _truncate(ckpts / "step_000000003")  # the newest is corrupt: the newest good one is step 2
    good = str(ckpts / "step_000000002")
    torch.save({"model": {"w": torch.ones(1)}}, run / "model.pt")
    mgr = CheckpointManager(sync_cfg(), str(ckpts), is_writer=False)
    assert mgr.resolve("latest") == good
    assert mgr.resolve(str(run)) == good  # a run directory
    assert mgr.resolve(str(ckpts)) == good  # a checkpoints directory
    assert mgr.resolve(f"{ckpts}/latest") == good
    assert mgr.resolve(str(ckpts / "step_000000001")) == str(ckpts / "step_000000001")
    assert mgr.resolve(str(ckpts / "step_000000001" / STATE_FILE)) == str(ckpts / "step_000000001")
    assert mgr.resolve(str(run / "model.pt")) == str(run / "model.pt")
    mgr.close()
    # `imgtrain eval` reads through the same rule.
    assert torch.equal(read_checkpoint(f"{ckpts}/latest")["w"], torch.full((2,), 2.0))
    assert torch.equal(read_checkpoint(str(run / "model.pt"))["model"]["w"], torch.ones(1))
    with pytest.raises(
        CheckpointError, match=f"checkpoint {ckpts / 'step_000000003'}: state.pt is truncated"
    ):
        read_checkpoint(str(ckpts / "step_000000003"))
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no valid checkpoint at {tmp_path / 'empty'}"):
        read_checkpoint(str(tmp_path / "empty"))


def test_training_retention_and_prune_are_one_rule(tmp_path):
    """keep_last_n during training and `imgtrain checkpoints prune --keep` leave the same checkpoints: the
    newest `keep` that verify and anything newer. A corrupt checkpoint is not counted as kept."""
    a, b = tmp_path / "a", tmp_path / "b"
    _tiny(a, [1, 2, 3])
    _truncate(a / "step_000000003")
    shutil.copytree(a, b)

    _tiny(a, [4], keep=2)  # training: the save of step 4 applies checkpoint.keep_last_n=2
    _tiny(b, [4])
    report = prune_checkpoints(str(b), keep=2)  # the operator's prune
    names = sorted(p.name for p in a.glob("step_*"))
    assert names == sorted(p.name for p in b.glob("step_*"))
    assert names == ["step_000000002", "step_000000003", "step_000000004"]
    assert report.newest_valid == str(b / "step_000000004") and report.removed == [str(b / "step_000000001")]


class Bus:
    """`agree` for ranks played by threads: every rank gets rank 0's value (a broadcast)."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=WAIT)
        self.value = None

    def agree(self, rank: int):
        def agree(text):
            if rank == 0:
                self.value = text
            self.barrier.wait()
            out = self.value
            self.barrier.wait()
            return out

        return agree


def _ranks(
    directory: str | Path, world_size: int, **kw
) -> tuple[list[CheckpointManager], list[Box], list[Box]]:
    bus = Bus(world_size)
    mgrs, shared, mine = [], [], []
    for r in range(world_size):
        m = CheckpointManager(
            sync_cfg(**kw),
            str(directory),
            is_writer=r == 0,
            rank=r,
            world_size=world_size,
            agree=bus.agree(r),
            rank_timeout=WAIT,
        )
        shared.append(Box(torch.ones(2)))
        mine.append(Box(torch.full((1000,), float(r))))  # e.g. this rank's error feedback
        m.register("model", shared[-1])
        m.register("feedback", mine[-1], rank_local=True)
        mgrs.append(m)
    return mgrs, shared, mine


def _on_every_rank(mgrs, fn) -> list:
    out: list = [None] * len(mgrs)
    errors: list = []

    def run(r):
        try:
            out[r] = fn(r, mgrs[r])
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(mgrs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    if errors:
        raise errors[0]
    return out


def test_each_rank_saves_its_own_state_and_the_step_is_published_once_all_are_in(tmp_path):
    mgrs, shared, mine = _ranks(tmp_path, 2, async_save=True)
    # Rank 1 is slow to write its file: rank 0 has written state.pt but must not publish before it.
    go = threading.Event()
    real = mgrs[1]._write_rank_file  # noqa: SLF001

    def slow(*args):
        assert go.wait(WAIT)
        real(*args)

    mgrs[1]._write_rank_file = slow  # noqa: SLF001
    _on_every_rank(mgrs, lambda r, m: m.save(5))
    deadline = time.monotonic() + WAIT
    while not list(tmp_path.glob(f".tmp-step_000000005-*/{STATE_FILE}")) and time.monotonic() < deadline:
        time.sleep(0.02)
    tmp = list(tmp_path.glob(".tmp-step_000000005-*"))
    assert tmp and (tmp[0] / STATE_FILE).exists() and (tmp[0] / "rank_0.pt").exists()
    assert not (tmp_path / "step_000000005").exists()
    go.set()
    _on_every_rank(mgrs, lambda r, m: m.wait())
    step_dir = tmp_path / "step_000000005"
    verify(str(step_dir))
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["world_size"] == 2 and sorted(manifest["files"]) == ["rank_0.pt", "rank_1.pt", STATE_FILE]
    # Nothing rank-sized went to rank 0: state.pt holds the shared state only; each rank file its own.
    assert set(torch.load(step_dir / STATE_FILE, weights_only=True)) == {"format", "model"}
    for r in (0, 1):
        own = torch.load(step_dir / f"rank_{r}.pt", weights_only=True)
        assert torch.equal(own["feedback"], torch.full((1000,), float(r)))
    assert sorted(p.name for p in step_dir.iterdir()) == [MANIFEST, "rank_0.pt", "rank_1.pt", STATE_FILE]

    # Every rank restores its own state at the same world size.
    for b in mine:
        b.value = None
    loaded = _on_every_rank(mgrs, lambda r, m: m.load())
    assert all(x.path == str(step_dir) and x.missing == [] for x in loaded)
    assert [int(b.value[0]) for b in mine] == [0, 1]
    _on_every_rank(mgrs, lambda r, m: m.close())

    # At another world size the shared state loads; the rank-local state is reported missing (re-derived).
    single = CheckpointManager(sync_cfg(), str(tmp_path), run_id=None)
    model, feedback = Box(), Box("untouched")
    single.register("model", model)
    single.register("feedback", feedback, rank_local=True)
    loaded = single.load()
    single.close()
    assert loaded.world_size == 2 and loaded.restored == ["model"] and loaded.missing == ["feedback"]
    assert torch.equal(model.value, torch.ones(2)) and feedback.value == "untouched"


def test_a_rank_whose_write_fails_fails_the_save_and_nothing_is_published(tmp_path, caplog):
    _tiny(tmp_path, [1])
    mgrs, _, _ = _ranks(tmp_path, 2)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    mgrs[1]._write_rank_file = disk_full  # noqa: SLF001
    _on_every_rank(mgrs, lambda r, m: m.save(2))
    _on_every_rank(mgrs, lambda r, m: m.close())
    assert [m.failures for m in mgrs] == [1, 1]
    assert "rank 1 could not write its rank_1.pt: OSError" in caplog.text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("step_", ".tmp"))] == ["step_000000001"]


def test_rank_files_on_an_object_store(tmp_path):
    """No rename there: each rank writes into the step directory and rank 0's manifest, written last once
    both rank files are in, publishes it."""
    url = f"memory://ckpt-{tmp_path.name}"
    mgrs, _, mine = _ranks(url, 2)
    try:
        _on_every_rank(mgrs, lambda r, m: m.save(3))
        fs = fsspec.filesystem("memory")
        files = json.loads(fs.cat(f"{url}/step_000000003/{MANIFEST}"))["files"]
        assert sorted(files) == ["rank_0.pt", "rank_1.pt", STATE_FILE]
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url}/step_000000003", detail=False)) == [
            MANIFEST,
            "rank_0.pt",
            "rank_1.pt",
            STATE_FILE,
        ]
        verify(f"{url}/step_000000003")
        for b in mine:
            b.value = None
        _on_every_rank(mgrs, lambda r, m: m.load())
        assert [int(b.value[0]) for b in mine] == [0, 1]
    finally:
        _on_every_rank(mgrs, lambda r, m: m.close())
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_a_format1_checkpoint_gives_each_rank_its_own_part():
    """Before rank files, state.pt held every rank's RNG streams and compression state: each rank takes its
    own at the same world size, none at another (re-derived, as for a checkpoint of today's format)."""
    from imgtrain.train.trainer import _upgrade_format1

    def old():
        return {
            "format": 1,
            "world_size": 2,
            "reference_world_size": 4,
            "rng": [{"torch": torch.zeros(1)}, {"torch": torch.ones(1)}],
            "compression": {"method": "onebit", "world_size": 2, "ranks": [{"step": 0}, {"step": 1}]},
        }

    sd = old()
    _upgrade_format1(sd, rank=1, world_size=2)
    assert sd["run"] == {"world_size": 2, "reference_world_size": 4, "compression": "onebit"}
    assert torch.equal(sd["rng"]["torch"], torch.ones(1))
    assert sd["compression"] == {"method": "onebit", "state": {"step": 1}}
    sd = old()
    _upgrade_format1(sd, rank=0, world_size=1)
    assert "rng" not in sd and "compression" not in sd and sd["run"]["world_size"] == 2
