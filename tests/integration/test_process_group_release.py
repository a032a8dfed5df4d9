"""A closed trainer leaves nothing of its process group behind: no Gloo worker or transport thread, no
store connection, and nothing global keeps the trainer (its model, its DDP reducer) alive.

Left alive into interpreter exit, those threads raced the interpreter's teardown: a rank of a finished
run could die with SIGABRT ("terminate called without an active exception"), which torchrun reports as a
failed job (seen in CI on tests/integration/test_slow_checkpoint.py). Three things held the group: torch's
``torch.distributed.nn.functional``, imported by DDP's constructor after ``init_process_group``, binds the
default group into its functions' default arguments; the compression object (DDP's hook state) held the
DDP module, a cycle through C++; and the root logger's filter held the trainer.

Each case trains in a fresh interpreter, as a torchrun worker does (a module imported earlier by this test
process would hide the first cause): one process in a real Gloo process group, the model wrapped in DDP."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TINY, free_port, subprocess_env

pytestmark = pytest.mark.integration

_CHECK = textwrap.dedent(
    """
    import gc, json, os, sys, weakref

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
    ref = weakref.ref(trainer)
    del trainer
    gc.collect()
    print(json.dumps({"ddp": ddp, "during": during, "after": group_threads(before), "kept": ref() is not None}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="threads are listed from Linux's /proc")
@pytest.mark.parametrize("compression", ["none", "powersgd"])
def test_a_closed_trainer_leaves_no_process_group_thread(tmp_path, image_folder, compression):
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"data.root={image_folder}",
        *TINY,
        "training.batch_size=4",
        "training.epochs=1",
        "training.max_steps=2",
        "distributed.backend=gloo",
        f"distributed.compression={compression}",
    ]
    env = subprocess_env()
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ddp"] == "DistributedDataParallel"
    assert "pt_gloo_runloop" in seen["during"]  # the check sees the group's threads while it lives
    assert seen["after"] == [], f"process-group threads left after close(): {seen['after']}"
    assert not seen["kept"], "something global still holds the closed trainer"
