"""Batch-size finder: the largest per-process batch that fits in memory, and the fastest one.

Each probe runs training steps at one batch size through the trainer's own ``Trainer.train_step``
(normalize and mix on the device, forward under AMP, loss, backward, clipping, optimizer step, EMA;
model, image size, channels_last and activation checkpointing exactly as configured) on synthetic uint8
images. The search doubles the batch until a probe fails, then bisects between the last batch that
fitted and the first that did not.

Where the limit comes from:

* GPU: the device's memory. A probe that overshoots raises ``torch.cuda.OutOfMemoryError``; it is
  caught, the probe's tensors are dropped and the cache emptied, and the search goes on in the same
  process. The caching allocator is capped with ``torch.cuda.set_per_process_memory_fraction`` at
  (1 - headroom) x the card's memory, or x ``--memory-limit`` (to size a batch for a smaller card).
* CPU: ``--memory-limit`` is enforced for real. Each probe runs in a child process (forked from this
  one after the imports, so that a probe costs no interpreter start-up) which first sets
  ``RLIMIT_DATA`` to the budget; an allocation beyond it fails inside torch's allocator ("can't
  allocate memory") and the probe counts as not fitting. Why RLIMIT_DATA and not a cgroup, see
  docs/batch_size.md: it counts the same memory in a forked probe and in a fresh ``imgtrain train``
  (everything the process has mapped privately, inherited or not), it works without root, and it never
  lets the kernel's OOM killer loose on other processes. ``RLIMIT_AS`` would also count ~2.4 GB of
  address space that CUDA builds of torch reserve without using.

The batch reported as fitting fitted under ``(1 - headroom) x budget``: the headroom is left for what a
real run adds to a probe (data loader, evaluation, the checkpoint's copy of the state).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import resource
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from imgtrain.config import Config
from imgtrain.optim import scaled_lr
from imgtrain.train.trainer import Trainer

log = logging.getLogger(__name__)


def format_size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@dataclass
class ProbeResult:
    batch: int
    fits: bool
    images_per_s: float | None = None
    peak_bytes: int | None = None
    """GPU: max memory allocated by torch; CPU: the probe process's peak resident set (VmHWM)."""
    error: str | None = None
    seconds: float = 0.0


@dataclass
class FinderResult:
    largest: int
    fastest: int
    probes: list[ProbeResult] = field(default_factory=list)
    device: str = "cpu"
    limit_bytes: int | None = None
    cap_method: str = "none"

    def probe(self, batch: int) -> ProbeResult:
        return next(p for p in self.probes if p.batch == batch)


class ProbeError(RuntimeError):
    """A probe failed for a reason other than memory (a bad model name, a shape error...)."""


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    if torch.cuda.is_available() and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    # oneDNN reports a failed scratch-buffer allocation as "could not create a primitive" (seen under
    # RLIMIT_DATA when a convolution's workspace no longer fits); std::bad_alloc surfaces as is.
    return isinstance(e, RuntimeError) and any(
        m in msg
        for m in ("can't allocate memory", "out of memory", "could not create a primitive", "bad_alloc")
    )


def num_classes_of(cfg: Config) -> int:
    """Classes of the configured dataset (the head's size), without building the loaders."""
    from imgtrain.data import resolve_data_root

    train = resolve_data_root(cfg.data) / "train"
    if not train.is_dir():
        from imgtrain.data import DataError

        raise DataError(f"{train} is not a directory (data.root needs train/ and val/)")
    return sum(1 for d in train.iterdir() if d.is_dir())


class _Step:
    """Configured training steps on synthetic data: the trainer's own ``train_step``."""

    def __init__(self, cfg: Config, num_classes: int, device: torch.device):
        self.device = device
        self.trainer = Trainer(cfg).setup_step(num_classes, device)
        self.image_size = cfg.data.image_size
        self.num_classes = num_classes

    def run(self, batch: int, steps: int) -> float:
        """``steps`` optimizer steps; images/s of all but the first (allocations, kernel choice)."""
        g = torch.Generator().manual_seed(0)
        images = torch.randint(
            0, 256, (batch, 3, self.image_size, self.image_size), dtype=torch.uint8, generator=g
        ).to(self.device)
        labels = torch.randint(0, self.num_classes, (batch,), generator=g).to(self.device)
        # As the loader yields a batch: uint8 images, labels, per-sample weights, unreadable paths.
        micro_batch = (images, labels, torch.ones(batch, device=self.device), [])
        t0 = time.perf_counter()
        for i in range(steps):
            if i == 1:
                self._sync()
                t0 = time.perf_counter()
            self.trainer.train_step([micro_batch], [batch])
        self._sync()
        timed = max(1, steps - 1)
        return batch * timed / max(time.perf_counter() - t0, 1e-9)

    def reset(self) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)
        self.trainer.optimizer.state.clear()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_child(
    conn, cfg: Config, num_classes: int, batch: int, steps: int, limit: int | None, threads: int | None
) -> None:
    """Body of a forked CPU probe: cap, build, train, report through ``conn``; never returns."""
    code = 0
    try:
        if limit is not None:
            limit_data(limit)
        if threads:
            torch.set_num_threads(threads)
        try:
            step = _Step(cfg, num_classes, torch.device("cpu"))
            ips = step.run(batch, steps)
            conn.send({"fits": True, "images_per_s": ips, "peak_bytes": _peak_rss()})
        except BaseException as e:  # noqa: BLE001 - the parent decides what a failure means
            if _is_oom(e):
                conn.send(
                    {
                        "fits": False,
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        "peak_bytes": _peak_rss(),
                    }
                )
            else:
                conn.send({"fits": None, "error": traceback.format_exc()})
    except BaseException:  # noqa: BLE001 - even sending failed (out of memory): the parent sees EOF
        code = 3
    finally:
        conn.close()
        os._exit(code)  # no atexit handlers or finalizers of the parent's objects in the fork


def _probe_cpu(
    cfg: Config,
    num_classes: int,
    batch: int,
    steps: int,
    limit: int | None,
    threads: int | None,
    timeout: float,
) -> ProbeResult:
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(
        target=_cpu_child, args=(send, cfg, num_classes, batch, steps, limit, threads), daemon=True
    )
    proc.start()
    send.close()
    msg = None
    try:
        if recv.poll(timeout):
            msg = recv.recv()
    except EOFError:
        msg = None
    finally:
        recv.close()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    secs = time.perf_counter() - t0
    if msg is None:
        why = (
            f"probe did not finish within {timeout:.0f}s"
            if secs >= timeout
            else f"probe process died (exit code {proc.exitcode}), e.g. out of memory while reporting"
        )
        return ProbeResult(batch, False, error=why, seconds=secs)
    if msg["fits"] is None:
        raise ProbeError(
            f"training step at batch {batch} failed for a reason other than memory:\n{msg['error']}"
        )
    return ProbeResult(
        batch, msg["fits"], msg.get("images_per_s"), msg.get("peak_bytes"), msg.get("error"), secs
    )


class _GpuProber:
    def __init__(self, cfg: Config, num_classes: int, device: torch.device, limit: int | None):
        if limit is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
        self.step = _Step(cfg, num_classes, device)
        self.device = device

    def __call__(self, batch: int, steps: int) -> ProbeResult:
        t0 = time.perf_counter()
        self.step.reset()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            ips = self.step.run(batch, steps)
            return ProbeResult(
                batch,
                True,
                ips,
                torch.cuda.max_memory_allocated(self.device),
                seconds=time.perf_counter() - t0,
            )
        except torch.cuda.OutOfMemoryError as e:
            err = f"OutOfMemoryError: {str(e).splitlines()[0][:200]}"
        # Out of the except block: the exception's traceback no longer pins the probe's tensors.
        self.step.reset()
        gc.collect()
        torch.cuda.empty_cache()
        return ProbeResult(batch, False, error=err, seconds=time.perf_counter() - t0)


def search(probe, start: int, max_batch: int, tolerance: float, on_probe=None) -> tuple[int, list]:
    """Double from ``start`` until a probe fails (or ``max_batch``), then bisect until the gap between
    the largest fit and the smallest failure is at most ``max(1, tolerance x largest)``.
    Returns (largest batch that fitted, all probes). 0 if not even batch 1 fits."""
    probes: list[ProbeResult] = []

    def run(b: int) -> bool:
        r = probe(b)
        probes.append(r)
        if on_probe:
            on_probe(r)
        return r.fits

    lo, hi = 0, None
    b = max(1, min(start, max_batch))
    while True:
        if run(b):
            lo = b
            if b >= max_batch:
                break
            b = min(2 * b, max_batch)
        else:
            hi = b
            break
    if lo == 0:  # the start did not fit: halve down
        b = hi // 2
        while b >= 1:
            if run(b):
                lo = b
                break
            hi = b
            b //= 2
        if lo == 0:
            return 0, probes
    while hi is not None and hi - lo > max(1, int(tolerance * lo)):
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def find_batch_size(
    cfg: Config,
    memory_limit: int | None = None,
    start: int | None = None,
    max_batch: int = 4096,
    tolerance: float = 0.1,
    steps: int = 3,
    headroom: float = 0.1,
    threads: int | None = None,
    probe_timeout: float = 600.0,
    num_classes: int | None = None,
    on_probe=None,
) -> FinderResult:
    """Search the batch size for ``cfg`` on this machine's device (see the module docstring)."""
    if num_classes is None:
        num_classes = num_classes_of(cfg)
    start = start or cfg.training.batch_size
    budget = None if memory_limit is None else int(memory_limit * (1.0 - headroom))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        if budget is None:  # the card itself, less the same headroom as a given budget
            budget = int(torch.cuda.get_device_properties(device).total_memory * (1.0 - headroom))
        prober = _GpuProber(cfg, num_classes, device, budget)
        largest, probes = search(lambda b: prober(b, steps), start, max_batch, tolerance, on_probe)
        method = "cuda-oom (allocator capped at (1 - headroom) x budget)"
    else:
        if budget is None:
            raise ValueError("on CPU a memory budget is needed (--memory-limit, e.g. 4GiB)")
        largest, probes = search(
            lambda b: _probe_cpu(cfg, num_classes, b, steps, budget, threads, probe_timeout),
            start,
            max_batch,
            tolerance,
            on_probe,
        )
        device, method = torch.device("cpu"), "rlimit-data"
    fitting = [p for p in probes if p.fits and p.images_per_s]
    fastest = max(fitting, key=lambda p: p.images_per_s).batch if fitting else 0
    return FinderResult(largest, fastest, probes, str(device), memory_limit, method)


def recipe_with_batch(cfg: Config, batch: int) -> dict[str, Any]:
    """The full resolved config with ``training.batch_size`` replaced: pass it back with --config."""
    data = cfg.to_dict()
    data["training"]["batch_size"] = batch
    return data


def report(cfg: Config, result: FinderResult, world_size: int, pick: str, out: Path | None) -> dict:
    """Print the result and write the recipe; returns the same as a dict (for --json)."""
    chosen = result.fastest if pick == "fastest" else result.largest
    global_batch = chosen * world_size * cfg.optimization.accumulation_steps
    lr = scaled_lr(cfg.training, global_batch)
    summary = {
        "device": result.device,
        "memory_limit_bytes": result.limit_bytes,
        "cap_method": result.cap_method,
        "largest_batch": result.largest,
        "fastest_batch": result.fastest,
        "chosen_batch": chosen,
        "pick": pick,
        "world_size": world_size,
        "global_batch": global_batch,
        "peak_lr": lr,
        "base_lr": cfg.training.base_lr,
        "lr_reference_batch": cfg.training.lr_reference_batch,
        "probes": [vars(p) for p in result.probes],
        "recipe": str(out) if out else None,
    }
    fastest = result.probe(result.fastest) if result.fastest else None
    print(
        f"largest per-process batch that fits: {result.largest}"
        + (f" (under {format_size(result.limit_bytes)}, {result.cap_method})" if result.limit_bytes else "")
    )
    if fastest:
        print(
            f"fastest per-process batch: {result.fastest} ({fastest.images_per_s:.1f} images/s per process)"
        )
    print(
        f"chosen ({pick}): training.batch_size={chosen}; x {world_size} process(es)"
        + (
            f" x {cfg.optimization.accumulation_steps} accumulation steps"
            if cfg.optimization.accumulation_steps > 1
            else ""
        )
        + f" = global batch {global_batch}; linear scaling rule: peak LR = base_lr {cfg.training.base_lr:g}"
        f" x {global_batch} / {cfg.training.lr_reference_batch} = {lr:.4g} (the trainer applies it "
        f"itself: training.base_lr stays as it is)"
    )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Written by imgtrain find-batch-size: largest fitting batch {result.largest}, fastest "
            f"{result.fastest}, chosen {chosen} ({pick})\n"
            f"# on {result.device}"
            + (
                f" under {format_size(result.limit_bytes)} ({result.cap_method})"
                if result.limit_bytes
                else ""
            )
            + f". Global batch {global_batch} at {world_size} process(es): peak LR {lr:.4g}.\n"
            f"# Train with: imgtrain train --config {out}   (or the override "
            f"training.batch_size={chosen})\n"
        )
        out.write_text(header + yaml.safe_dump(recipe_with_batch(cfg, chosen), sort_keys=False))
        print(f"wrote {out}")
    return summary


def world_size_of(nnodes: int, nproc_per_node: int) -> int:
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError("--nnodes and --nproc-per-node must be >= 1")
    return nnodes * nproc_per_node


def limit_data(limit: int) -> None:
    """Cap this process's data segment (``RLIMIT_DATA``): use as ``preexec_fn`` to run a command,
    e.g. ``imgtrain train``, under the budget the finder was given (what ``prlimit --data`` does)."""
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
