"""The metrics processor: what the training loop hands its per-step numbers to.

It owns the window of steps since the last record (device-side sums of loss, correct and sample counts,
plus host timings), the cross-rank reduction of that window, ``should_log(step)`` (the gate that keeps the
all-reduce off most steps), the progress bar and the sinks every record goes to (metrics.jsonl, the
per-rank log, TensorBoard, Prometheus). The trainer decides what a reduced window means for the run (the
unreadable-file ceiling, divergence) and keeps the counters; this module only measures and publishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from imgtrain.distributed import process_group as D
from imgtrain.monitoring.sinks import MetricsSink, ProgressBar

if TYPE_CHECKING:
    from imgtrain.distributed.comm_hooks import Compression
    from imgtrain.monitoring.metrics import PrometheusMetrics


@dataclass
class TrainWindow:
    """The steps since the last train record, on this rank."""

    sums: torch.Tensor | None = None  # device tensor: loss sum, correct, count, unreadable files
    images: int = 0  # samples of all ranks (the global sizes of the steps' micro-batches)
    seconds: float = 0.0
    data_wait: float = 0.0
    steps: int = 0

    def add(self, sums: torch.Tensor, t_data: float, t_step: float, images: int) -> None:
        # Summed on the device: reading the sums here would wait for the GPU every step.
        self.sums = sums if self.sums is None else self.sums + sums
        self.images += images
        self.seconds += t_step
        self.data_wait += t_data
        self.steps += 1


@dataclass(frozen=True)
class WindowTotals:
    """A window's sums over all ranks."""

    loss_sum: float
    correct: float
    count: float  # weight 1 per real sample, 0 for padding and unreadable files
    bad: int  # unreadable training files

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1e-9)

    @property
    def top1(self) -> float:
        return 100 * self.correct / max(self.count, 1e-9)


class MetricsProcessor:
    def __init__(
        self,
        info: D.DistInfo,
        log_interval: int,
        sinks: list[MetricsSink],
        bar: ProgressBar | None = None,
        prometheus: PrometheusMetrics | None = None,
        compression: Compression | None = None,
    ):
        self.info = info
        self.log_interval = log_interval
        self.sinks = sinks
        self.bar = bar if bar is not None else ProgressBar(False)
        self.prometheus = prometheus  # also in ``sinks``; called per step for its gauges and straggler check
        self.compression = compression
        self.window = TrainWindow()
        self.last_loss = math.nan  # of the last reduced window, shown on the progress bar

    def should_log(self, step: int) -> bool:
        """Whether ``step`` ends a logging window (every ``training.log_interval`` steps). The loop also
        closes a window early (at a save, a stop or the end of an epoch)."""
        return step % self.log_interval == 0

    def start_epoch(self, epoch: int, epochs: int, total_steps: int, done_steps: int) -> None:
        self.bar.start_epoch(epoch, epochs, total_steps, done_steps)

    def end_epoch(self) -> None:
        self.bar.close()

    def on_step(
        self, step: int, sums: torch.Tensor, t_data: float, t_step: float, images: int, lr: float
    ) -> None:
        """After every optimizer step, on every rank (Prometheus's straggler check is collective)."""
        if self.prometheus is not None:
            self.prometheus.on_step(step, t_data)
        self.window.add(sums, t_data, t_step, images)
        shown = {"loss": f"{self.last_loss:.4f}"} if not math.isnan(self.last_loss) else {}
        self.bar.update(1, **shown, lr=f"{lr:.3g}", img_s=f"{images / max(t_step, 1e-9):.0f}")

    def reduce_window(self) -> WindowTotals:
        """The window's sums over all ranks. Collective: every rank must call it at the same step."""
        sums = self.window.sums if self.window.sums is not None else torch.zeros(4, dtype=torch.float64)
        t = sums.to(D.comm_device(self.info))
        D.all_reduce_sum(t, self.info)
        loss_sum, correct, count, bad = t.cpu().tolist()
        totals = WindowTotals(loss_sum, correct, count, int(bad))
        self.last_loss = totals.loss
        return totals

    def log_window(self, totals: WindowTotals, step: int, epoch: int, lr: float) -> dict[str, Any]:
        """Publishes the train record of the window (``totals`` from :meth:`reduce_window`) and starts a
        new window. Returns the record."""
        w = self.window
        record: dict[str, Any] = {
            "event": "train",
            "epoch": epoch + 1,
            "step": step,
            "loss": totals.loss,
            "train_top1": totals.top1,
            "lr": lr,
            "images_per_s": w.images / max(w.seconds, 1e-9),
            "data_wait_s": w.data_wait / max(w.steps, 1),
            "step_s": w.seconds / max(w.steps, 1),
            "bad_images": totals.bad,
        }
        if self.compression is not None and self.info.enabled:
            record["comm_bytes_per_step"], record["comm_wire_bytes_per_step"] = self.compression.take_bytes(
                w.steps
            )
        self.window = TrainWindow()
        self.log(record)
        return record

    def log(self, record: dict[str, Any]) -> None:
        """One record (train window, eval, checkpoint, start, ...) to every sink."""
        for s in self.sinks:
            s.log(record)

    def close(self) -> None:
        self.bar.close()
        for s in self.sinks:
            s.close()
