"""Where metrics go. Each sink gets the same namespaced dicts; the trainer only talks to this interface."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsSink:
    def log(self, record: dict[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class JsonlSink(MetricsSink):
    """metrics.jsonl: one JSON object per logged step or epoch, appended (a resumed run continues it)."""

    def __init__(self, path: Path):
        _drop_torn_last_line(path)
        self.f = open(path, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        self.f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        self.f.close()


def _drop_torn_last_line(path: Path) -> None:
    """A process killed mid-write leaves a partial last record: cut it so every line stays valid JSON."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


class ProgressBar:
    """Live epoch progress on the main rank: step, loss, LR, images/s; tqdm supplies the ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None

    def start_epoch(self, epoch: int, epochs: int, total: int, initial: int = 0) -> None:
        if not self.enabled:
            return
        self.close()
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            dynamic_ncols=True,
            leave=True,
            file=sys.stderr,
            mininterval=0.2 if interactive else 10.0,
        )

    def update(self, n: int, **fields: Any) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(fields, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
