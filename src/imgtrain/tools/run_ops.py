"""Operations on a run from outside it, for scripts/monitor.sh and scripts/cleanup.sh: its status from the
run directory (metrics.jsonl, summary.json, checkpoints) or a Prometheus endpoint, and pruning old
checkpoints by the checkpoint manager's retention rule (never the newest one that verifies)."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtrain.config import CheckpointConfig

if TYPE_CHECKING:
    from imgtrain.checkpoint import PruneReport

# A running job appends to metrics.jsonl at least every training.log_interval steps; this long without a
# record means it is stopped, hung or between restarts.
STALE_AFTER_S = 300.0


def prune_checkpoints(
    directory: str, keep: int, dry_run: bool = False, storage_options: dict | None = None
) -> PruneReport:
    """The checkpoint manager's retention rule (``CheckpointManager.prune``) applied to ``directory`` from
    outside the run: the ``keep`` newest checkpoints that verify and anything newer stay."""
    from imgtrain.checkpoint import CheckpointManager  # torch: not needed for run_status

    mgr = CheckpointManager(
        CheckpointConfig(storage_options=storage_options or {}), directory, is_writer=False
    )
    try:
        return mgr.prune(keep, dry_run=dry_run)
    finally:
        mgr.close()


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return out


# The records that end a process of the run; a later "start" (a restart) makes it running again.
_ENDING_EVENTS = ("finished", "failed", "diverged", "preempted")


def run_status(run_dir: str, now: float | None = None) -> dict[str, Any]:
    """State (not started / running / stalled / finished / failed / diverged / preempted, with the exit
    code of the last three), step, epoch, world size, throughput and the newest checkpoint of a run directory, as the
    trainer wrote them."""
    now = time.time() if now is None else now
    root = Path(run_dir)
    metrics = root / "metrics.jsonl"
    status: dict[str, Any] = {"run_dir": str(root), "state": "not started"}
    records = _records(metrics) if metrics.exists() else []
    if records:
        last = records[-1]
        age = now - float(last.get("time", metrics.stat().st_mtime))
        status["state"] = "running" if age < STALE_AFTER_S else "stalled"
        status["last_record_age_s"] = round(age, 1)
        starts = [r for r in records if r.get("event") == "start"]
        if starts:
            status.update(world_size=starts[-1].get("world_size"), restarts=len(starts) - 1)
        trains = [r for r in records if r.get("event") == "train"]
        if trains:
            t = trains[-1]
            status.update(
                step=t.get("step"),
                epoch=t.get("epoch"),
                loss=t.get("loss"),
                images_per_s=t.get("images_per_s"),
            )
        evals = [r for r in records if r.get("event") == "eval"]
        if evals:
            status["val_top1"] = evals[-1].get("val_top1")
        ckpts = [r for r in records if r.get("event") == "checkpoint"]
        if ckpts:
            status["last_checkpoint"] = ckpts[-1].get("path")
            status["last_checkpoint_step"] = ckpts[-1].get("step")
        ends = [r for r in records if r.get("event") in (*_ENDING_EVENTS, "start")]
        end = ends[-1] if ends else {}
        if end.get("event") in ("failed", "diverged", "preempted"):
            status["state"] = end["event"]
            status["exit_code"] = end.get("exit_code")
            status["error"] = end.get("error")
        elif end.get("event") == "finished" or _written_after(root / "summary.json", end.get("time", 0.0)):
            status["state"] = "finished"  # summary.json is written just before the "finished" record
    return status


def _written_after(path: Path, t: float) -> bool:
    """``path`` exists and was written after time ``t`` (a summary.json of an earlier run does not count)."""
    try:
        return path.stat().st_mtime >= float(t)
    except OSError:
        return False


def endpoint_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """The imgtrain_* samples a Prometheus exporter serves (step, throughput, checkpoint metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - a URL the user gave
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("imgtrain_"):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return {"endpoint": url, "state": "running" if samples else "no imgtrain metrics", "metrics": samples}


def prune_report_dict(report: PruneReport) -> dict[str, Any]:
    return asdict(report)
