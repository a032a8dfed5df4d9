"""The metrics processor: the window it keeps between records, should_log, the record it publishes to every
sink, and the fresh window after it. Its reduction over two Gloo ranks: tests/integration/test_metrics_reduction.py."""

from __future__ import annotations

import math

import pytest
import torch

from imgtrain.distributed.process_group import DistInfo
from imgtrain.monitoring.processor import MetricsProcessor
from imgtrain.monitoring.sinks import MetricsSink


class Recorder(MetricsSink):
    def __init__(self) -> None:
        self.records: list[dict] = []
        self.closed = False

    def log(self, record: dict) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def single_process() -> DistInfo:
    return DistInfo(0, 0, 1, torch.device("cpu"), None, "node-a", 0)


def sums(loss: float, correct: float, count: float, bad: float = 0) -> torch.Tensor:
    return torch.tensor([loss, correct, count, bad], dtype=torch.float64)


def test_should_log_every_log_interval_steps():
    p = MetricsProcessor(single_process(), 3, [])
    assert [s for s in range(1, 10) if p.should_log(s)] == [3, 6, 9]


def test_window_becomes_one_record_for_every_sink_and_starts_over():
    a, b = Recorder(), Recorder()
    p = MetricsProcessor(single_process(), 2, [a, b])
    p.on_step(1, sums(6.0, 3, 4), t_data=0.5, t_step=2.0, images=4, lr=0.1)
    p.on_step(2, sums(2.0, 1, 4, bad=1), t_data=0.1, t_step=2.0, images=4, lr=0.1)
    totals = p.reduce_window()
    assert (totals.loss, totals.top1, totals.bad) == (1.0, 50.0, 1)
    assert p.last_loss == 1.0  # what the progress bar shows from now on
    record = p.log_window(totals, step=2, epoch=0, lr=0.1)
    assert a.records == b.records == [record]
    assert record == {
        "event": "train",
        "epoch": 1,
        "step": 2,
        "loss": 1.0,
        "train_top1": 50.0,
        "lr": 0.1,
        "images_per_s": 2.0,  # 8 images in 4 s of steps
        "data_wait_s": pytest.approx(0.3),
        "step_s": 2.0,
        "bad_images": 1,
    }
    # The next window holds only the steps after the record.
    p.on_step(3, sums(9.0, 0, 3), t_data=0.0, t_step=1.0, images=3, lr=0.05)
    totals = p.reduce_window()
    assert (totals.loss, totals.count) == (3.0, 3)
    assert p.log_window(totals, step=3, epoch=0, lr=0.05)["images_per_s"] == 3.0
    p.close()
    assert a.closed and b.closed


def test_an_empty_window_reduces_to_nothing_and_a_nan_loss_is_kept():
    p = MetricsProcessor(single_process(), 1, [])
    totals = p.reduce_window()
    assert (totals.count, totals.bad, totals.top1) == (0, 0, 0)
    p.on_step(1, sums(math.nan, 0, 2), 0.0, 1.0, 2, 0.1)
    assert math.isnan(p.log_window(p.reduce_window(), 1, 0, 0.1)["loss"])
