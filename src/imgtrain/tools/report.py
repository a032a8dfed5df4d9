"""``imgtrain report RUN_DIR``: one self-contained HTML page (inline SVG plots, no scripts, no network)
with loss, accuracy, LR, throughput and step time per rank, the step-time breakdown, checkpoint stalls
and restarts, from the files the run wrote."""

from __future__ import annotations

import datetime
import html
import io
import math
import statistics
from pathlib import Path
from typing import Any

import pygal

from imgtrain.tools.profile_summary import print_summary
from imgtrain.tools.rundata import RunData, time_fields

_MAX_POINTS = 1500  # per series: keeps a week-long run's page small; plots stay faithful at this width


def _points(records: list[dict[str, Any]], key: str, x: str = "step") -> list[tuple[float, float]]:
    pts = [
        (float(r[x]), float(r[key]))
        for r in records
        if isinstance(r.get(key), int | float)
        and isinstance(r.get(x), int | float)
        and math.isfinite(float(r[key]))
    ]
    stride = max(1, math.ceil(len(pts) / _MAX_POINTS))
    return pts[::stride] if stride > 1 else pts


def _chart(cls: type, title: str, x_title: str = "step", y_title: str = "", **kw: Any):
    # js=[]: pygal would otherwise reference its tooltip script on a CDN; the page must work offline.
    return cls(
        js=[],
        title=title,
        x_title=x_title,
        y_title=y_title,
        width=900,
        height=360,
        show_dots=False,
        stroke_style={"width": 2},
        legend_at_bottom=True,
        truncate_legend=40,
        explicit_size=True,
        **kw,
    )


def _svg(chart) -> str:
    return chart.render(is_unicode=True, disable_xml_declaration=True)


def _line(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    y_title: str = "",
    dots: bool = False,
    logarithmic: bool = False,
) -> str | None:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    chart = _chart(pygal.XY, title, y_title=y_title, logarithmic=logarithmic)
    for name, pts in series.items():
        chart.add(name, pts, show_dots=dots or len(pts) <= 3, dots_size=3)
    return _svg(chart)


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _when(t: Any) -> str:
    if not isinstance(t, int | float):
        return ""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def build_report(run_dir: Path) -> str:
    data = RunData(run_dir).refresh()
    train, evals = data.events("train"), data.events("eval")
    per_rank_train = data.per_rank("train")
    sections: list[tuple[str, str]] = []

    # Summary.
    s = data.summary or {}
    rows = [
        ["status", data.status],
        ["model", data.cfg("model.name", "")],
        ["epochs", f"{s.get('epochs', '')} of {data.cfg('training.epochs', '?')}"],
        ["steps", s.get("steps", train[-1]["step"] if train else "")],
        [
            "world size",
            s.get("world_size", (data.lifecycle[-1] if data.lifecycle else {}).get("world_size", "")),
        ],
        ["global batch", s.get("global_batch", "")],
        [
            "val top-1 / top-5",
            f"{_fmt(s.get('val_top1', evals[-1]['val_top1'] if evals else None))} / "
            f"{_fmt(s.get('val_top5', evals[-1]['val_top5'] if evals else None))}",
        ],
        ["mean train images/s", _fmt(s.get("mean_train_images_per_s"))],
        ["wall seconds", _fmt(s.get("wall_seconds"))],
        ["restarts", sum(1 for e in data.lifecycle if e.get("event") == "start" and e.get("resumed_from"))],
    ]
    sections.append(("Summary", _table(["", ""], [[k, _fmt(v)] for k, v in rows])))

    plots = [
        (
            "Loss",
            _line(
                "Loss",
                {"train loss": _points(train, "loss"), "val loss": _points(evals, "val_loss")},
                dots=True,
            ),
        ),
        (
            "Accuracy",
            _line(
                "Accuracy (%)",
                {
                    "train top-1": _points(train, "train_top1"),
                    "val top-1": _points(evals, "val_top1"),
                    "val top-5": _points(evals, "val_top5"),
                },
                dots=True,
            ),
        ),
        ("Learning rate", _line("Learning rate", {"lr": _points(train, "lr")})),
    ]
    sections += [(t, svg) for t, svg in plots if svg]

    # Throughput and step time, per rank where the rank logs (or per-rank metrics) exist.
    if per_rank_train:
        note = (
            f"<p>Per rank, from {len(per_rank_train)} rank(s)' records: each rank's own step time; images/s "
            f"is the global batch over that rank's step time.</p>"
        )
        series = {f"rank {r}": _points(recs, "images_per_s") for r, recs in per_rank_train.items()}
        step_series = {f"rank {r}": _points(recs, "step_s") for r, recs in per_rank_train.items()}
    else:
        note = (
            "<p>No per-rank data in this run directory (no logs/rank*.jsonl): global numbers from rank 0.</p>"
        )
        series = {"global": _points(train, "images_per_s")}
        step_series = {"rank 0": _points(train, "step_s")}
    body = note + "".join(x for x in (_line("Images/s", series), _line("Step time (s)", step_series)) if x)
    sections.append(("Throughput and step time", body))

    fields = time_fields(train)
    if fields:
        parts = [
            _line(
                "Step-time breakdown, rank 0 (s per step)",
                {f: _points(train, f) for f in [*fields, "step_s"]},
            )
        ]
        if per_rank_train:
            bar = _chart(pygal.StackedBar, "Mean step-time breakdown per rank (s per step)", x_title="rank")
            ranks = list(per_rank_train)
            bar.x_labels = [str(r) for r in ranks]
            rank_fields = time_fields([r for recs in per_rank_train.values() for r in recs])
            for f in rank_fields:
                bar.add(f, [_mean([x.get(f) for x in per_rank_train[r]]) for r in ranks])
            rest = [
                _mean([x.get("step_s") for x in per_rank_train[r]])
                - sum(_mean([x.get(f) for x in per_rank_train[r]]) for f in rank_fields)
                for r in ranks
            ]
            bar.add("rest of the step", [max(v, 0.0) for v in rest])
            parts.append(_svg(bar))
        sections.append(("Step-time breakdown", "".join(p for p in parts if p)))

    ckpt_rank = data.per_rank("checkpoint") or (
        {0: data.events("checkpoint")} if data.events("checkpoint") else {}
    )
    if ckpt_rank:
        svg = _line(
            "Checkpoint stall of the training loop (s)",
            {f"rank {r}": _points(recs, "stall_s") for r, recs in ckpt_rank.items()},
            dots=True,
        )
        last = data.events("checkpoint")[-1] if data.events("checkpoint") else None
        text = f"<p>Last checkpoint: step {last['step']}, {_esc(last.get('path'))}</p>" if last else ""
        sections.append(("Checkpoints", text + (svg or "")))

    rows = []
    for e in data.lifecycle:
        what = e.get("event")
        detail = e.get("resumed_from") or e.get("error") or ""
        if what == "start":
            what = "resumed" if e.get("resumed_from") else "started"
        rows.append([_when(e.get("time")), what, e.get("step", ""), e.get("world_size", ""), detail])
    if rows:
        sections.append(
            ("Starts, restarts and failures", _table(["time", "event", "step", "world size", "detail"], rows))
        )

    if any((Path(run_dir) / "profiler").glob("rank*.json")):
        text = io.StringIO()
        print_summary(Path(run_dir), top=10, out=text)
        sections.append(("Profiler (imgtrain profile-summary)", f"<pre>{_esc(text.getvalue())}</pre>"))

    title = f"imgtrain report: {Path(run_dir).resolve().name}"
    body = "".join(f"<section><h2>{_esc(t)}</h2>{c}</section>" for t, c in sections)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title><style>"
        "body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "svg{display:block;margin:1em 0}pre{font-size:12px;overflow-x:auto}</style></head><body>"
        f"<h1>{_esc(title)}</h1><p>{_esc(Path(run_dir).resolve())}, generated "
        f"{_when(datetime.datetime.now().timestamp())}</p>{body}</body></html>\n"
    )


def _mean(values: list[Any]) -> float:
    nums = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(float(v))]
    return statistics.mean(nums) if nums else 0.0


def write_report(run_dir: Path, output: Path | None = None) -> Path:
    output = output or Path(run_dir) / "report.html"
    output.write_text(build_report(Path(run_dir)), encoding="utf-8")
    return output
