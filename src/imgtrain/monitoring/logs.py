"""Structured logs: one JSON object per line and per rank, for Filebeat / Fluent Bit -> Elasticsearch / Loki.

Every rank writes ``<run dir>/logs/rank<R>.jsonl``; the console keeps the human-readable format unless
``monitoring.log_format: json``. Each line carries time, level, run id, rank, step, logger, message and
the record's structured ``fields`` (``log.info(..., extra={"fields": {...}})``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imgtrain.monitoring.sinks import MetricsSink

METRICS_LOGGER = "imgtrain.metrics"


def resolve_run_id(configured: str | None, output_dir: str | Path) -> str:
    """The configured id, else torchrun's --rdzv-id (stable across restarts), else the run directory's name."""
    if configured:
        return configured
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none":
        return elastic
    return Path(output_dir).resolve().name


class _Context(logging.Filter):
    """Stamps every record with the run id, rank and the trainer's current step."""

    def __init__(self, run_id: str | None, rank: int, step_fn: Callable[[], int | None]):
        super().__init__()
        self.run_id, self.rank, self.step_fn = run_id, rank, step_fn

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = self.run_id
        record.rank = self.rank
        if getattr(record, "step", None) is None:
            record.step = self.step_fn()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "run_id": getattr(record, "run_id", None),
            "rank": getattr(record, "rank", None),
            "step": getattr(record, "step", None),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out["fields"] = _json_safe(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _json_safe(v: Any) -> Any:
    # NaN/inf are not JSON: a shipper would reject the whole line (a diverged loss is exactly the line
    # that matters). Their names as strings keep the information.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


class _ConsoleFilter(logging.Filter):
    """The text console shows metrics through the progress bar, not as log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != METRICS_LOGGER


class _RankFileHandler(logging.FileHandler):
    """Opened at the first record, creating the directory then: a run that fails before logging anything
    (e.g. a wrong data.root) leaves no half-made run directory behind."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # not opened yet (delay=True): FileHandler.emit opens it now
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        super().emit(record)


def rank_log_path(output_dir: str | Path, rank: int) -> Path:
    return Path(output_dir) / "logs" / f"rank{rank}.jsonl"


def configure_logging(
    rank: int | None = None,
    is_main: bool = True,
    run_id: str | None = None,
    output_dir: str | Path | None = None,
    console_format: str = "text",
    step_fn: Callable[[], int | None] = lambda: None,
) -> None:
    """The logging of every imgtrain command: the console on stderr (INFO on the main rank, WARNING on the
    others), tagged ``[rank R]`` in a distributed command; plus, given ``output_dir``, this rank's JSON-lines
    file (INFO). Replaces whatever handlers were installed before."""
    context = _Context(run_id, 0 if rank is None else rank, step_fn)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    if console_format == "json":
        console.setFormatter(JsonFormatter())
    else:
        tag = "" if rank is None else f"[rank {rank}] "
        console.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(levelname)s %(name)s: %(message)s"))
        console.addFilter(_ConsoleFilter())
    handlers: list[logging.Handler] = [console]
    if output_dir is not None:
        file = _RankFileHandler(rank_log_path(output_dir, 0 if rank is None else rank))
        file.setLevel(logging.INFO)
        file.setFormatter(JsonFormatter())
        handlers.append(file)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.INFO)
    for h in handlers:
        h.addFilter(context)
        root.addHandler(h)


class LogSink(MetricsSink):
    """Every metrics record (train window, eval, checkpoint, start, ...) as a structured log line on this
    rank. Step times, data wait and checkpoint stalls are this rank's own, so the rank files hold the
    per-rank view that metrics.jsonl (rank 0, global numbers) does not."""

    def __init__(self, rank: int):
        self.rank = rank
        self.logger = logging.getLogger(METRICS_LOGGER)

    def log(self, record: dict[str, Any]) -> None:
        event = record.get("event", "record")
        shown = " ".join(
            f"{k}={_short(v)}"
            for k, v in record.items()
            if k not in ("event", "timeline") and isinstance(v, int | float | str)
        )
        self.logger.info(
            "%s: %s",
            event,
            shown,
            extra={"fields": {**record, "rank": self.rank}, "step": record.get("step")},
        )


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
