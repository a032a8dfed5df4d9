"""imgtrain find-batch-size on CPU under a real memory cap: the batch it reports trains within the cap,
a clearly larger one does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imgtrain.tools.find_batch_size import limit_data

from conftest import run_cli, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A model whose memory grows fast with the batch (~0.5 MB per image) and whose steps are cheap.
MODEL = [
    "model.name=simple_cnn",
    "model.width=4",
    "data.image_size=96",
    "data.val_resize=96",
    "data.workers=0",
    "training.warmup_epochs=0",
    "training.progress_bar=false",
]


# How an allocation refused by RLIMIT_DATA surfaces: torch's allocator, or oneDNN failing to allocate
# a convolution's scratch buffer (seen on some CPUs), which imgtrain's finder also counts as not fitting.
ALLOCATION_FAILED = ("allocate memory", "could not create a primitive")


def _vm_data() -> int:
    """VmData of a fresh process that has imported what `imgtrain find-batch-size` imports before it forks
    its probes (not this test process's: under the whole suite it holds every test module's imports)."""
    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status VmData (not Linux)")
    code = (
        "import imgtrain.tools.find_batch_size, imgtrain.train.trainer\n"
        "for line in open('/proc/self/status'):\n"
        "    if line.startswith('VmData:'): print(int(line.split()[1]) * 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env(),
        check=True,
    )
    return int(out.stdout.strip())


def _train_capped(args: list[str], limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "imgtrain", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
        preexec_fn=lambda: limit_data(limit),
    )


def test_found_batch_trains_within_the_cap_and_a_larger_one_does_not(tmp_path: Path):
    # The cap sits a fixed amount above what a process holding torch and imgtrain already maps, so that
    # it binds at a batch of about a hundred: four
    # times that is still less than the 1,437 training images, so the large run really takes such a batch.
    cap = _vm_data() + 250 * 2**20
    recipe = tmp_path / "found.yaml"
    out = run_cli(
        [
            "find-batch-size",
            "--config",
            "smoke_cpu",
            *MODEL,
            f"--memory-limit={cap}",
            "--start=32",
            "--tolerance=0.5",
            "--steps=2",
            "--nnodes=2",
            "--nproc-per-node=2",
            "--out",
            str(recipe),
            "--json",
        ],
        timeout=300,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    largest = summary["largest_batch"]
    assert summary["cap_method"] == "rlimit-data"
    assert 32 <= largest <= 1437 // 4, out.stdout
    failed = [p for p in summary["probes"] if not p["fits"]]
    assert failed and all(any(m in p["error"] for m in ALLOCATION_FAILED) for p in failed), out.stdout
    assert min(p["batch"] for p in failed) > largest
    assert summary["fastest_batch"] in [p["batch"] for p in summary["probes"] if p["fits"]]
    chosen = summary["chosen_batch"]
    assert summary["global_batch"] == 4 * chosen
    assert summary["peak_lr"] == pytest.approx(0.4 * 4 * chosen / 256)  # smoke_cpu: base_lr 0.4 per 256
    assert f"largest per-process batch that fits: {largest}" in out.stdout

    # The written recipe trains (3 steps, then evaluation and a checkpoint) at the LARGEST batch under
    # the same cap; four times that batch fails at its first step.
    common = ["--config", str(recipe), "training.epochs=1", "training.max_steps=3"]
    ok = _train_capped([*common, f"training.batch_size={largest}", "--output-dir", str(tmp_path / "ok")], cap)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.strip().splitlines()[-1])["val_top1"] is not None
    big = _train_capped(
        [*common, f"training.batch_size={4 * largest}", "--output-dir", str(tmp_path / "big")], cap
    )
    assert big.returncode != 0
    assert any(m in big.stderr for m in ALLOCATION_FAILED), big.stderr[-3000:]
