"""A closed trainer leaves nothing of its process group behind: no Gloo worker or transport thread, no
store connection, and nothing global keeps the trainer (its model, its DDP reducer) alive.

Left alive into interpreter exit, those threads raced the interpreter's teardown: a rank of a finished
run could die with SIGABRT ("terminate called without an active exception"), which torchrun reports as a
failed job (seen in CI on tests/integration/test_slow_checkpoint.py). What held the group: the root
logger's filter held the trainer; the compression object (DDP's hook state) held the DDP module, a cycle
through C++; in replicated mode, torchft's ProcessGroupGloo held the torch group until its ``shutdown()``.

Each case trains in a fresh interpreter, as a torchrun worker does: one process in a real Gloo process
group, the model wrapped in DDP (or torchft's wrapper)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TINY, free_port, subprocess_env, wait_for

pytestmark = pytest.mark.integration

_CHECK = textwrap.dedent(
    """
    import gc, json, os, sys, time, weakref

    def group_threads(before):
        names = []
        for t in set(os.listdir("/proc/self/task")) - before:
            try:
                name = open(f"/proc/self/task/{t}/comm").read().strip()
            except FileNotFoundError:  # ended meanwhile
                continue
            if "gloo" in name or "tcpstore" in name:  # torch's names: Gloo's workers and loop, the store
                names.append(name)
        return sorted(names)

    from imgtrain.config import load_config
    from imgtrain.train.trainer import Trainer

    before = set(os.listdir("/proc/self/task"))
    trainer = Trainer(load_config(None, json.loads(sys.argv[1])))
    try:
        trainer.setup()
        trainer.train()
        during = group_threads(before)
        ddp = type(trainer.model).__name__
    finally:
        trainer.close()
    # close() itself ends them, while the trainer object still exists (a joined thread's /proc entry may
    # linger a moment: a few seconds' grace)
    deadline = time.monotonic() + 5
    while (after := group_threads(before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    print(json.dumps({"ddp": ddp, "during": during, "after": after, "kept": ref() is not None}))
    """
)


def _check(overrides: list[str], env: dict[str, str], wrapper: str = "DistributedDataParallel") -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ddp"] == wrapper  # the model was wrapped as it is under torchrun / in replicated mode
    # the check sees the group's threads while it lives: Gloo's workers and its transport loop
    assert {"pt_gloo_runloop", "gloo_tcp_loop"} <= set(seen["during"])
    return seen


def _run_overrides(tmp_path: Path, image_folder: Path) -> list[str]:
    return [
        f"output_dir={tmp_path / 'run'}",
        f"data.root={image_folder}",
        *TINY,
        "training.batch_size=4",
        "training.epochs=1",
        "training.max_steps=2",
    ]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are listed from Linux's /proc")
@pytest.mark.parametrize("compression", ["none", "powersgd"])
def test_a_closed_trainer_leaves_no_process_group_thread(tmp_path, image_folder, compression):
    env = subprocess_env()
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    seen = _check(
        [
            *_run_overrides(tmp_path, image_folder),
            "distributed.backend=gloo",
            f"distributed.compression={compression}",
        ],
        env,
    )
    assert (
        "pt_tcpstore_uv" in seen["during"]
    )  # rank 0 hosts the group's store here (torchrun's agent does there)
    assert seen["after"] == [], f"process-group threads left after close(): {seen['after']}"
    assert not seen["kept"], "something global still holds the closed trainer"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are listed from Linux's /proc")
def test_a_closed_replicated_trainer_leaves_no_gloo_thread(tmp_path, image_folder):
    """Replicated mode: torchft's gradient group across replica groups (one group here, with a lighthouse)."""
    port = free_port()
    lighthouse = subprocess.Popen(
        [sys.executable, "-m", "imgtrain", "lighthouse", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _accepts(port), 60, "the lighthouse to listen", poll=0.05)
        seen = _check(
            [
                *_run_overrides(tmp_path, image_folder),
                "fault_tolerance.mode=replicated",
                f"fault_tolerance.replicated.lighthouse=http://127.0.0.1:{port}",
                "fault_tolerance.replicated.group_id=0",
                "fault_tolerance.replicated.num_groups=1",
            ],
            subprocess_env(),
            wrapper="FaultTolerantDDP",
        )
    finally:
        lighthouse.kill()
        lighthouse.wait(timeout=30)
    # torchft's manager keeps its store and its own (Rust) threads; Gloo's, which release tensors, are gone.
    assert [n for n in seen["after"] if "gloo" in n] == [], (
        f"Gloo threads left after close(): {seen['after']}"
    )
    assert not seen["kept"], "something global still holds the closed trainer"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
