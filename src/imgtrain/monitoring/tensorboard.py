"""TensorBoard event files (rank 0): every numeric field of the metrics records, by event, against the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgtrain.monitoring.sinks import MetricsSink

# Record fields that are positions or bookkeeping, not measurements.
_SKIP = {"step", "epoch", "time", "world_size", "bad_images"}
_TAGS = {"train": "train", "eval": "val", "checkpoint": "checkpoint"}


class TensorBoardSink(MetricsSink):
    """train -> train/<field> (loss, lr, train_top1, images_per_s, step-time fields, ...),
    eval -> val/<field>, checkpoint -> checkpoint/<field>. Fields other helpers add show up unchanged."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, record: dict[str, Any]) -> None:
        prefix = _TAGS.get(record.get("event", ""))
        step = record.get("step")
        if prefix is None or step is None:
            return
        for k, v in record.items():
            if k in _SKIP or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            name = k[4:] if prefix == "val" and k.startswith("val_") else k
            self.writer.add_scalar(f"{prefix}/{name}", v, global_step=step)

    def close(self) -> None:
        self.writer.close()
