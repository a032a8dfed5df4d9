"""Helpers shared by the benchmark scripts: machine info, statistics, result files, a JPEG ImageFolder
and an imgtrain Trainer set up from a few overrides.

Every benchmark runs its variants side by side in one process, alternating them in rounds so that drift
of a shared machine hits all of them alike, and reports medians and the ratio against the baseline
measured in the same run. Absolute numbers from different runs are not comparable on a shared machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgtrain.config import load_config
from imgtrain.internals.dataloader import shutdown_workers
from imgtrain.train.trainer import Trainer

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "hostname": platform.node(),
    }


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def stats(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the checkout the benchmark runs from; ("unknown", True) outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            != ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True
    return commit, dirty


ROW_ID_KEYS = (
    "name",
    "model",
    "nodes",
    "link_mbit",
    "method",
    "precision",
    "decode",
    "variant",
    "fault",
    "settings",
)


def _is_headline_key(key: str) -> bool:
    return any(w in key for w in ("ratio", "error", "per_s")) or key in ("val_top1", "step_s", "total_s")


def headline(result: Any, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Every median, ratio, rate, error and top-1 accuracy of a result, by dotted path: the one-line
    summary of a run that history.jsonl keeps, whatever the shape of the benchmark's own result. Rows
    in lists are named by their identifying fields (name, model, method, ...)."""
    out: dict[str, float] = {}
    if depth > 4:
        return out
    if isinstance(result, list):
        items = [
            (".".join(str(r[k]) for k in ROW_ID_KEYS if isinstance(r.get(k), (str, int, float))) or str(i), r)
            for i, r in enumerate(result)
            if isinstance(r, dict)
        ]
    else:
        items = result.items() if isinstance(result, dict) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            if isinstance(value.get("median"), (int, float)):
                out[path] = value["median"]
            else:
                out.update(headline(value, path + ".", depth + 1))
        elif isinstance(value, list):
            out.update(headline(value, path + ".", depth + 1))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and _is_headline_key(str(key)):
            out[path] = value
    return out


def envelope(name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The one shape every benchmark result has (shared/DESIGN.md, "Benchmarks"): what ran, where,
    from which commit, then the benchmark's own samples, medians and same-run ratios."""
    commit, dirty = git_state()
    env = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "dirty": dirty,
        "machine": result.get("machine") or machine_info(),
        "command": result.get("command") or command_line(),
        "settings": result.get("settings", {}),
    }
    env.update({k: v for k, v in result.items() if k not in env})
    env["headline"] = headline(result)
    return env


def record(name: str, result: dict[str, Any], out: Path | None = None, final: bool = True) -> Path:
    """Write a run's envelope. By default it becomes the record: ``results/<name>/latest.json``, plus
    one summary line appended to ``results/<name>/history.jsonl`` (``final=False``, a partial write of
    a long run, updates latest.json only). With ``out`` the envelope goes there alone: an ad-hoc
    variant that must not replace the record."""
    env = envelope(name, result)
    target = Path(out) if out is not None else RESULTS_DIR / name / "latest.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(env, indent=2) + "\n")
    if out is None and final:
        summary = {k: env[k] for k in ("benchmark", "date", "commit", "dirty", "command")}
        summary["cpu_model"] = env["machine"].get("cpu_model")
        summary["headline"] = env["headline"]
        with open(target.parent / "history.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
    print(f"\nwrote {target}")
    return target


def print_table(title: str, unit: str, rows: list[tuple[str, dict[str, Any], str]]) -> None:
    """rows: (label, stats(), extra text such as a ratio)."""
    print(f"\n{title}")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'variant':<{width}}{'median':>10}{'min':>10}{'max':>10}  {unit:<10}{'n':>3}  vs baseline")
    for label, s, extra in rows:
        print(
            f"{label:<{width}}{s['median']:>10.4g}{s['min']:>10.4g}{s['max']:>10.4g}  {'':<10}"
            f"{s['n']:>3}  {extra}"
        )


def add_run_args(p, name: str) -> None:
    """The options every fault benchmark (recovery, ft_*) takes: worker threads, where the runs go, where
    the result goes."""
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each worker")
    p.add_argument("--dir", default=None, help="keep the runs and their logs here (default: a temp dir)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"write the result here instead of the record (results/{name}/latest.json + history.jsonl)",
    )


def add_model_args(p, model: str, batch: int, image_size: int) -> None:
    """The model/batch/threads options every training benchmark takes."""
    p.add_argument("--model", default=model, help="imgtrain model.name")
    p.add_argument("--small-input", action="store_true", help="model.small_input (CIFAR-style ResNet stem)")
    p.add_argument("--width", type=int, default=64, help="model.width (imgtrain's small models only)")
    p.add_argument("--batch", type=int, default=batch, help="per-process batch size of the training steps")
    p.add_argument("--image-size", type=int, default=image_size, help="training image size (data.image_size)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def make_jpeg_folder(
    root: Path, images: int, classes: int = 8, size: int = 96, val_per_class: int = 2, seed: int = 0
) -> Path:
    """An ImageFolder tree of ``images`` training JPEGs (plus a small val split), as tests/conftest.py's
    make_image_folder writes them: each class has its own mean colour plus noise, so that JPEG decoding
    works on realistic, not constant, pixels."""
    rng = np.random.default_rng(seed)
    per_class = [images // classes + (1 if c < images % classes else 0) for c in range(classes)]
    for split, counts in (("train", per_class), ("val", [val_per_class] * classes)):
        for c, n in enumerate(counts):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            base[(c // 3) % 3] += 40
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:05d}.jpeg", format="JPEG", quality=90)
    return root


def trainer_overrides(args, root: Path, output_dir: Path) -> list[str]:
    """The overrides every single-process training benchmark starts from: the model options of
    ``add_model_args``, the generated data (no loader workers), no LR warm-up and a fixed base LR, so
    that variants differ only in what each script appends (later overrides win)."""
    return [
        f"model.name={args.model}",
        f"model.small_input={str(args.small_input).lower()}",
        f"model.width={args.width}",
        f"data.root={root}",
        f"data.image_size={args.image_size}",
        "data.workers=0",
        f"training.batch_size={args.batch}",
        "training.warmup_epochs=0",
        "training.epochs=1000",
        "training.base_lr=0.01",
        f"output_dir={output_dir}",
    ]


def make_trainer(overrides: list[str], verbose: bool = False) -> Trainer:
    """An imgtrain Trainer, set up as `imgtrain train` would set it up, for a single process."""
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "LOCAL_RANK"):
        if var in os.environ:
            raise SystemExit(f"run the benchmarks as a single process ({var} is set)")
    cfg = load_config(None, ["training.progress_bar=false", "checkpoint.resume=never", *overrides])
    trainer = Trainer(cfg).setup()
    if not verbose:
        logging.getLogger().setLevel(logging.WARNING)
    return trainer


def shutdown_loader_workers(trainer: Trainer) -> None:
    """Stop the persistent DataLoader workers now (they would otherwise prefetch on, from a data
    directory about to be deleted, until garbage collection)."""
    data = getattr(trainer, "data", None)
    for loader in (data.train_loader, data.val_loader) if data is not None else ():
        shutdown_workers(loader)


def synthetic_batches(
    count: int, batch: int, image_size: int, num_classes: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]]:
    """In-memory batches shaped exactly as imgtrain's loader yields them: (uint8 NCHW images, labels,
    weights, bad paths)."""
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8, generator=g),
            torch.randint(0, num_classes, (batch,), generator=g),
            torch.ones(batch),
            [],
        )
        for _ in range(count)
    ]


class Clock:
    """perf_counter intervals, so that scripts read as 'with clock: ...; clock.seconds'."""

    def __enter__(self) -> Clock:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
