"""``imgtrain monitor RUN_DIR``: a live terminal dashboard (rich) of a run directory, refreshed until the
run ends: progress, loss, accuracy, images/s and step time per rank, the step-time breakdown, the last
checkpoint and any straggling rank. Reads the same files as the report; needs no server."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from imgtrain.tools.rundata import RunData, time_fields

STRAGGLER_FRACTION = 0.2
"""A rank whose latest step time is this fraction above the median of all ranks is shown as straggling."""


def _f(v: Any, fmt: str = ".4g") -> str:
    return format(v, fmt) if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def _age(t: Any, now: float) -> str:
    if not isinstance(t, int | float):
        return "-"
    s = max(now - t, 0)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}min ago" if s < 7200 else f"{s / 3600:.1f}h ago"


def stragglers(
    latest: dict[int, dict[str, Any]], fraction: float = STRAGGLER_FRACTION
) -> list[tuple[int, float]]:
    """(rank, fraction above the median step time) for each rank slower than the median by more than ``fraction``."""
    times = {r: rec["step_s"] for r, rec in latest.items() if isinstance(rec.get("step_s"), int | float)}
    if len(times) < 2:
        return []
    med = statistics.median(times.values())
    if med <= 0:
        return []
    return sorted(
        ((r, t / med - 1) for r, t in times.items() if t > med * (1 + fraction)), key=lambda x: -x[1]
    )


def render(data: RunData, now: float | None = None):
    now = time.time() if now is None else now
    train, evals = data.events("train"), data.events("eval")
    last = train[-1] if train else {}
    epochs = data.cfg("training.epochs")
    max_steps = data.cfg("training.max_steps")
    status = data.status
    colour = {"running": "green", "finished": "blue", "failed": "red", "diverged": "red"}.get(
        status, "yellow"
    )
    start = data.lifecycle[-1] if data.lifecycle else {}
    head = Text.assemble(
        ("imgtrain ", "bold"),
        (str(Path(data.run_dir).resolve().name), "bold cyan"),
        "  ",
        (status.upper(), f"bold {colour}"),
        f"  world size {start.get('world_size', '-')}  last record {_age(last.get('time'), now)}",
    )
    if status in ("failed", "diverged") and start.get("error"):
        head.append(f"\n{start['error']}", style="red")

    done_epochs = (
        (evals[-1]["epoch"] if evals else max(last.get("epoch", 1) - 1, 0)) if not data.summary else epochs
    )
    if max_steps:
        total, completed, label = max_steps, last.get("step", 0), f"step {last.get('step', 0)}/{max_steps}"
    else:
        total, completed = epochs or 1, done_epochs or 0
        label = f"epoch {last.get('epoch', '-')}/{epochs or '?'}  step {last.get('step', '-')}"
    progress = Table.grid(padding=(0, 2))
    progress.add_row(
        Text(label), ProgressBar(total=float(total), completed=float(min(completed, total)), width=40)
    )

    metrics = Table(title="training (all ranks)", expand=False)
    for col in ("loss", "train top-1", "val top-1", "val top-5", "lr", "images/s", "step s"):
        metrics.add_column(col, justify="right")
    ev = evals[-1] if evals else {}
    metrics.add_row(
        _f(last.get("loss")),
        _f(last.get("train_top1"), ".2f"),
        _f(ev.get("val_top1"), ".2f"),
        _f(ev.get("val_top5"), ".2f"),
        _f(last.get("lr"), ".3g"),
        _f(last.get("images_per_s"), ".1f"),
        _f(last.get("step_s"), ".3f"),
    )

    per_rank = data.per_rank("train")
    latest = {r: recs[-1] for r, recs in per_rank.items() if recs}
    fields = time_fields(list(latest.values()) or train[-1:])
    ranks = Table(title="per rank" if latest else "per rank: no per-rank data (logs/rank*.jsonl) yet")
    for col in ("rank", "step", "images/s", "step s", *fields, "updated"):
        ranks.add_column(col, justify="right")
    for r, rec in latest.items():
        ranks.add_row(
            str(r),
            _f(rec.get("step"), "d"),
            _f(rec.get("images_per_s"), ".1f"),
            _f(rec.get("step_s"), ".3f"),
            *(_f(rec.get(f), ".3f") for f in fields),
            _age(rec.get("time"), now),
        )

    breakdown = Table(title="step-time breakdown (rank 0, latest window)")
    breakdown.add_column("part")
    breakdown.add_column("s/step", justify="right")
    breakdown.add_column("% of step", justify="right")
    step_s = last.get("step_s")
    for f in time_fields(train[-1:]):
        share = 100 * last[f] / step_s if isinstance(step_s, int | float) and step_s > 0 else None
        breakdown.add_row(f, _f(last[f], ".4f"), _f(share, ".1f"))

    ck = data.events("checkpoint")
    ck_text = (
        f"last checkpoint: step {ck[-1].get('step')}, {_age(ck[-1].get('time'), now)}, loop stall "
        f"{_f(ck[-1].get('stall_s'), '.3f')} s, {ck[-1].get('path')}"
        if ck
        else "last checkpoint: none yet"
    )
    slow = stragglers(latest)
    logged = data.events("straggler")
    if slow:
        strag = Text(
            "straggler: "
            + ", ".join(f"rank {r} {100 * x:.0f}% slower than the median step" for r, x in slow),
            style="bold yellow",
        )
    elif logged:
        strag = Text(f"straggler (logged): {logged[-1]}", style="yellow")
    else:
        strag = Text(
            "stragglers: none" if len(latest) > 1 else "stragglers: needs per-rank data from 2+ ranks"
        )
    return Panel(
        Group(head, progress, metrics, ranks, breakdown, Text(ck_text), strag),
        title="imgtrain monitor",
        border_style=colour,
    )


def monitor(run_dir: Path, once: bool = False, interval: float = 2.0) -> int:
    """Returns 0 when the run finished (or for --once), 1 when it failed or diverged. A preempted run has
    not ended (its scheduler requeues it and it resumes): the dashboard waits for it."""
    data = RunData(run_dir, tail=1000)
    interactive = sys.stdout.isatty()
    console = Console(width=None if interactive else 140)
    if once:
        console.print(render(data.refresh()))
        return 0
    with Live(render(data.refresh()), console=console, refresh_per_second=4, auto_refresh=False) as live:
        while not data.ended or data.status == "preempted":
            time.sleep(interval)
            live.update(render(data.refresh()), refresh=True)
    return 0 if data.status == "finished" else 1
