"""Reads a run directory as the trainer leaves it, for the report and the terminal dashboard.

metrics.jsonl holds rank 0's records (global loss/accuracy/throughput, evaluations, checkpoints, starts,
the end); logs/rank<R>.jsonl holds every rank's structured log, whose ``imgtrain.metrics`` lines carry
that rank's own records (its step time, data wait, checkpoint stall). Files are followed incrementally,
so that a dashboard refreshing a week-long run reads only what was appended.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict, deque
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from imgtrain.monitoring.logs import METRICS_LOGGER

TERMINAL_EVENTS = ("finished", "failed", "diverged", "preempted")
LIFECYCLE_EVENTS = ("start", *TERMINAL_EVENTS)
_RANK_FILE = re.compile(r"rank(\d+)\.jsonl$")


class JsonlFollower:
    """Complete lines appended to a JSON-lines file since the last call (a torn last line waits)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                obj = json.loads(line)
            except ValueError:  # a line cut by a crash elsewhere in the file; the rest stays readable
                continue
            if isinstance(obj, dict):
                out.append(obj)
        return out


class RunData:
    """What the run directory says so far. ``tail`` bounds the train/eval/checkpoint history kept in memory
    (the dashboard needs only recent records; the report keeps everything)."""

    def __init__(self, run_dir: Path, tail: int | None = None):
        self.run_dir = Path(run_dir)
        self.tail = tail
        self._metrics = JsonlFollower(self.run_dir / "metrics.jsonl")
        self._rank_files: dict[int, JsonlFollower] = {}
        self.records: dict[str, deque] = defaultdict(self._new_list)  # metrics.jsonl by event
        self.rank_records: dict[int, dict[str, deque]] = defaultdict(lambda: defaultdict(self._new_list))
        self.lifecycle: list[dict[str, Any]] = []  # start / finished / failed / diverged, in order
        self.summary: dict[str, Any] | None = None
        self.config: dict[str, Any] = {}

    def _new_list(self) -> deque:
        return deque(maxlen=self.tail)

    def refresh(self) -> RunData:
        for rec in self._metrics.read_new():
            self._add(rec, self.records)
            if rec.get("event") in LIFECYCLE_EVENTS:
                self.lifecycle.append(rec)
        logs = self.run_dir / "logs"
        if logs.is_dir():
            for p in sorted(logs.glob("rank*.jsonl")):
                m = _RANK_FILE.search(p.name)
                if m:
                    self._rank_files.setdefault(int(m.group(1)), JsonlFollower(p))
        for rank, follower in self._rank_files.items():
            for line in follower.read_new():
                fields = line.get("fields")
                if line.get("logger") == METRICS_LOGGER and isinstance(fields, dict):
                    if "time" not in fields:
                        fields["time"] = _epoch(line.get("time"))
                    self._add(fields, self.rank_records[rank])
        for name, attr in (("summary.json", "summary"), ("config.yaml", "config")):
            p = self.run_dir / name
            if p.is_file():
                try:
                    text = p.read_text()
                    setattr(
                        self, attr, json.loads(text) if name.endswith(".json") else yaml.safe_load(text) or {}
                    )
                except (ValueError, yaml.YAMLError):
                    pass  # being rewritten right now; the next refresh reads it
        return self

    @staticmethod
    def _add(rec: dict[str, Any], into: dict[str, deque]) -> None:
        into[str(rec.get("event", "record"))].append(rec)

    # ------------------------------------------------------------------ views

    def events(self, name: str) -> list[dict[str, Any]]:
        return list(self.records.get(name, ()))

    def per_rank(self, name: str) -> dict[int, list[dict[str, Any]]]:
        """This event's records per rank: from metrics.jsonl records that carry a ``rank`` field, else
        from the rank log files. Empty when neither has per-rank data."""
        from_metrics: dict[int, list] = defaultdict(list)
        for r in self.records.get(name, ()):
            if isinstance(r.get("rank"), int):
                from_metrics[r["rank"]].append(r)
        if from_metrics:
            return dict(sorted(from_metrics.items()))
        return {rank: list(ev[name]) for rank, ev in sorted(self.rank_records.items()) if ev.get(name)}

    @property
    def status(self) -> str:
        """not started, running, or the last terminal event (a restart after a failure is running again)."""
        if not self.lifecycle:
            return "finished" if self.summary else "not started"
        last = self.lifecycle[-1].get("event")
        return "running" if last == "start" else str(last)

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL_EVENTS

    def cfg(self, dotted: str, default: Any = None) -> Any:
        cur: Any = self.config
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur


def _epoch(iso: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def time_fields(records: list[dict[str, Any]]) -> list[str]:
    """Step-time breakdown fields present in train records: numeric ``*_s`` fields other than the total
    ``step_s``, in first-seen order (data_wait_s, and whatever finer breakdown the trainer logs)."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if (
                k.endswith("_s")
                and not k.endswith("_per_s")
                and k != "step_s"
                and isinstance(v, int | float)
                and not isinstance(v, bool)
            ):
                seen.setdefault(k, None)
    return list(seen)
