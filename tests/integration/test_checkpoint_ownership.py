"""What a user sees when runs share a checkpoint directory, when a config holds secrets, and what
`imgtrain eval` takes from a checkpoint (real `imgtrain` processes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imgtrain.checkpoint import MANIFEST
from imgtrain.cli import EXIT_CHECKPOINT, EXIT_CONFIG

from conftest import TINY, make_image_folder, run_cli, subprocess_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT = 240


def train(data: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_cli(
        ["train", "--output-dir", str(out), f"data.root={data}", *TINY, "training.max_steps=3", *extra],
        check=check,
        timeout=WAIT,
    )


def no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, text[-4000:]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("own") / "data")  # 3 classes, 36 + 12 images


@pytest.fixture(scope="module")
def run_a(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own") / "a"
    train(data, out)
    return out


def test_another_run_is_refused_a_directory_and_may_still_start_from_its_checkpoint(data, run_a, tmp_path):
    a_ckpts = run_a / "checkpoints"
    before = sorted(p.name for p in a_ckpts.glob("step_*"))
    assert json.loads((a_ckpts / before[-1] / MANIFEST).read_text())["run_id"] == "a"

    shared = train(data, tmp_path / "b", f"checkpoint.dir={a_ckpts}", check=False)
    assert shared.returncode == EXIT_CHECKPOINT, shared.stderr[-3000:]
    assert (
        f"checkpoint error: checkpoint.dir {a_ckpts} holds checkpoints of run 'a' "
        f"({a_ckpts / before[-1]}), this is run 'b'"
    ) in shared.stderr
    no_traceback(shared.stderr)
    assert sorted(p.name for p in a_ckpts.glob("step_*")) == before  # nothing of run a touched

    # Starting from run a's checkpoint into a directory of its own is an explicit choice that works.
    fork = train(data, tmp_path / "b", "--resume", str(a_ckpts / before[-1]), "training.max_steps=5")
    assert f"resumed from {a_ckpts / before[-1]}" in fork.stderr
    assert sorted(p.name for p in a_ckpts.glob("step_*")) == before
    manifest = json.loads((tmp_path / "b" / "checkpoints" / "step_000000005" / MANIFEST).read_text())
    assert manifest["run_id"] == "b"


HOLDER = """
import sys, time
from pathlib import Path
from imgtrain.checkpoint import CheckpointManager
from imgtrain.config import CheckpointConfig
mgr = CheckpointManager(CheckpointConfig(), sys.argv[1], run_id="a")
Path(sys.argv[2]).touch()
while not Path(sys.argv[3]).exists():
    time.sleep(0.05)
mgr.close()
"""


def test_a_second_writer_exits_4_naming_the_lock_holder(data, run_a, tmp_path):
    held, done = tmp_path / "held", tmp_path / "done"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_a / "checkpoints"), str(held), str(done)],
        env=subprocess_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            held.exists,
            WAIT,
            "the holder to take the lock",
            poll=0.05,
            ended=lambda: holder.poll() is not None,
            context=lambda: (
                holder.stderr.read() if holder.poll() is not None else "the holder is still running"
            ),
        )
        before = sorted(p.name for p in (run_a / "checkpoints").iterdir())
        config_before = (run_a / "config.yaml").read_text()
        second = train(data, run_a, "checkpoint.lock_timeout=1", check=False)
        assert second.returncode == EXIT_CHECKPOINT, second.stderr[-3000:]
        line = [ln for ln in second.stderr.splitlines() if ln.startswith("imgtrain: checkpoint error:")]
        assert len(line) == 1 and "is locked by another writer" in line[0], second.stderr[-3000:]
        assert f"run 'a', host {socket.gethostname()}, pid {holder.pid}" in line[0]
        no_traceback(second.stderr)
        assert sorted(p.name for p in (run_a / "checkpoints").iterdir()) == before
        assert (run_a / "config.yaml").read_text() == config_before  # refused before writing anything
    finally:
        done.touch()
        holder.wait(WAIT)


SECRET, PASSWORD = "s3cr3t-literal-value", "hunter2-literal"


def test_secrets_stay_out_of_the_run_directory(data, tmp_path):
    out = tmp_path / "run"
    proc = train(
        data,
        out,
        "training.epochs=1",
        "training.max_steps=null",
        f"checkpoint.storage_options={{key: AKIAEXAMPLE, secret: {SECRET}}}",
        f"monitoring.notify.urls=['json://ops:{PASSWORD}@127.0.0.1:9/hook']",
    )
    assert (out / "model.pt").exists() and list((out / "checkpoints").glob("step_*/state.pt"))
    for key in (
        "checkpoint.storage_options.key",
        "checkpoint.storage_options.secret",
        "monitoring.notify.urls[0]",
    ):
        assert f"{key} is a literal credential" in proc.stderr
    for f in out.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            for secret in (SECRET, PASSWORD, "AKIAEXAMPLE"):
                assert secret.encode() not in blob, f"{secret} written to {f}"


def test_eval_takes_the_data_location_from_the_user_not_the_checkpoint(data, run_a, tmp_path):
    no_root = run_cli(["eval", "--checkpoint", str(run_a / "checkpoints")], check=False, timeout=WAIT)
    assert no_root.returncode == EXIT_CONFIG, no_root.stderr[-3000:]
    assert "config key 'data.root'" in no_root.stderr and "checkpoint's own data location" in no_root.stderr
    no_traceback(no_root.stderr)

    ok = run_cli(["eval", "--checkpoint", str(run_a / "model.pt"), f"data.root={data}"], timeout=WAIT)
    assert json.loads(ok.stdout.strip().splitlines()[-1])["val_images"] == 12

    renamed = tmp_path / "renamed"
    make_image_folder(renamed, train_per_class=1)
    for split in ("train", "val"):
        for i, d in enumerate(sorted((renamed / split).iterdir())):
            d.rename(d.with_name(f"kind_{i}"))
    other = run_cli(
        ["eval", "--checkpoint", str(run_a / "model.pt"), f"data.root={renamed}"], check=False, timeout=WAIT
    )
    assert other.returncode == EXIT_CHECKPOINT, other.stderr[-3000:]
    assert "was trained on classes class_0, class_1, class_2" in other.stderr and "kind_0" in other.stderr
    no_traceback(other.stderr)
