"""torch.profiler around the training steps of the configured ranks: one Chrome trace per rank and cycle
in ``<run dir>/profiler/rank<R>.<time_ns>.pt.trace.json`` (also readable by TensorBoard's profiler
plugin, Perfetto and chrome://tracing)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from imgtrain.config import ProfilerConfig

log = logging.getLogger(__name__)


def profiler_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "profiler"


class StepProfiler:
    """``start(rank)`` when training starts, ``step()`` after every optimizer step, ``stop()`` when training
    ends (also on errors). Does nothing on ranks that are not profiled, or before ``start``."""

    def __init__(self, cfg: ProfilerConfig, output_dir: str | Path):
        self.cfg, self.output_dir = cfg, output_dir
        self.prof: profile | None = None

    def start(self, rank: int) -> None:
        cfg = self.cfg
        if not cfg.enabled or (cfg.ranks is not None and rank not in cfg.ranks):
            return
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        out = profiler_dir(self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.prof = profile(
            activities=activities,
            schedule=schedule(
                skip_first=cfg.skip_first,
                wait=cfg.wait,
                warmup=cfg.warmup,
                active=cfg.active,
                repeat=cfg.repeat,
            ),
            on_trace_ready=tensorboard_trace_handler(str(out), worker_name=f"rank{rank}"),
            record_shapes=cfg.record_shapes,
            profile_memory=cfg.profile_memory,
            with_stack=cfg.with_stack,
        )
        self.prof.start()
        log.info(
            "profiler on rank %d: skip %d, then %d x (wait %d, warmup %d, active %d) steps -> %s",
            rank,
            cfg.skip_first,
            cfg.repeat,
            cfg.wait,
            cfg.warmup,
            cfg.active,
            out,
        )

    def step(self) -> None:
        if self.prof is not None:
            self.prof.step()

    def stop(self) -> None:
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.stop()
