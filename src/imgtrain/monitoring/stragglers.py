"""Load imbalance across ranks: who is slow, and for how long.

In synchronous data parallelism every rank's wall-clock step time is the same (the fast ranks wait in
the gradient all-reduce for the slow one), so the time compared here is a rank's *own* time per step:
data wait + forward/backward compute + optimizer, without the exposed all-reduce. Every
``straggler_interval`` steps each rank contributes its mean own time since the last check through one
all-gather of a single number (on the Gloo control group when the job runs on NCCL). A rank whose time
exceeds the median by more than ``threshold`` for ``patience`` consecutive checks is named.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class StragglerVerdict:
    times: list[float]
    median: float
    max_over_median: float
    straggler: int | None  # rank, or None


@dataclass
class StragglerDetector:
    threshold: float
    patience: int
    slow_streak: dict[int, int] = field(default_factory=dict)
    straggler: int | None = None

    def update(self, times: list[float]) -> StragglerVerdict:
        """One check over every rank's mean own step time (index = rank)."""
        median = statistics.median(times)
        ratio = max(times) / median if median > 0 else 1.0
        for r, t in enumerate(times):
            slow = median > 0 and t > median * (1 + self.threshold)
            self.slow_streak[r] = self.slow_streak.get(r, 0) + 1 if slow else 0
        candidates = [r for r, n in self.slow_streak.items() if n >= self.patience]
        previous = self.straggler
        # The slowest of the persistently slow ranks is named.
        self.straggler = max(candidates, key=lambda r: times[r]) if candidates else None
        if self.straggler is not None and self.straggler != previous:
            log.warning(
                "straggler: rank %d has been more than %.0f%% slower than the median rank for %d "
                "consecutive checks (%.4fs per step vs median %.4fs)",
                self.straggler,
                100 * self.threshold,
                self.slow_streak[self.straggler],
                times[self.straggler],
                median,
            )
        elif self.straggler is None and previous is not None:
            log.warning(
                "straggler: rank %d is back within %.0f%% of the median", previous, 100 * self.threshold
            )
        return StragglerVerdict(times, median, ratio, self.straggler)


def gather_step_times(own_seconds: float, world_size: int, group=None) -> list[float]:
    """Every rank's value, in rank order (one all-gather of a single float64 on CPU)."""
    mine = torch.tensor([own_seconds], dtype=torch.float64)
    out = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(out, mine, group=group)
    return [t.item() for t in out]
