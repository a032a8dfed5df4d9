"""Shared test helpers: tiny ImageFolder datasets and running imgtrain as a user would."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Tiny, fast, deterministic settings for CLI runs in tests.
TINY = [
    "model.name=simple_cnn", "model.width=8", "data.image_size=16", "data.val_resize=16",
    "data.workers=0", "training.epochs=2", "training.batch_size=8", "training.warmup_epochs=0",
    "training.progress_bar=false", "training.log_interval=1", "training.deterministic=true",
]


def make_image_folder(root: Path, classes: int = 3, train_per_class: int = 12, val_per_class: int = 4,
                      size: int = 20, fmt: str = "JPEG", seed: int = 0) -> Path:
    """A small ImageFolder tree whose classes are separable (each class has its own mean colour)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.{fmt.lower()}", format=fmt)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A free port whose successor is free too (the metrics exporter listens on base + local rank)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_ADDR", None)
    return env


def run_cli(args: list[str], timeout: float = 300, check: bool = True, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m imgtrain ARGS` as a subprocess; returns the completed process (text output)."""
    proc = subprocess.run([sys.executable, "-m", "imgtrain", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"imgtrain {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", *(extra or []),
            "-m", "imgtrain", *args]


def run_torchrun(nproc: int, args: list[str], timeout: float = 300, check: bool = True,
                 extra: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(nproc, args, extra), capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_weights(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: two threads on two shared cores are many times
    slower than one for such small tensors."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
