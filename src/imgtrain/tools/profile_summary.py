"""``imgtrain profile-summary RUN_DIR``: the profiler's Chrome traces (plain JSON, never unpickled) reduced
to the top operators per rank and, across ranks, where the step time differs."""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

_TRACE = re.compile(r"^rank(\d+)\..*\.json$")
_STEP = re.compile(r"^ProfilerStep#\d+$")
_NESTING_CATS = ("cpu_op", "user_annotation")
_GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class RankProfile:
    rank: int
    traces: list[Path] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    self_cpu_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gpu_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def steps(self) -> int:
        return max(len(self.step_ms), 1)

    def per_step_ms(self, op: str) -> float:
        return self.self_cpu_us.get(op, 0.0) / 1000 / self.steps


def load_trace_events(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict)]


def _add_trace(prof: RankProfile, events: list[dict[str, Any]]) -> None:
    # Self time = duration minus the time of the events directly nested in it on the same thread.
    threads: dict[tuple, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat = e.get("cat")
        if cat in _NESTING_CATS:
            threads[(e.get("pid"), e.get("tid"))].append(e)
        elif cat in _GPU_CATS:
            prof.gpu_us[e.get("name", "?")] += float(e["dur"])
        if cat == "user_annotation" and _STEP.match(str(e.get("name", ""))):
            prof.step_ms.append(float(e["dur"]) / 1000)
    for evs in threads.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[list] = []  # [event, end time, children's time]
        for e in [*evs, None]:
            ts = float(e["ts"]) if e is not None else float("inf")
            while stack and stack[-1][1] <= ts:
                ev, _, children = stack.pop()
                if ev.get("cat") == "cpu_op":
                    prof.self_cpu_us[ev["name"]] += max(float(ev["dur"]) - children, 0.0)
                    prof.calls[ev["name"]] += 1
            if e is None:
                break
            if stack:
                stack[-1][2] += float(e["dur"])
            stack.append([e, ts + float(e["dur"]), 0.0])


def load_profiles(run_dir: Path) -> dict[int, RankProfile]:
    profiles: dict[int, RankProfile] = {}
    for p in sorted((Path(run_dir) / "profiler").glob("rank*.json")):
        m = _TRACE.match(p.name)
        if not m:
            continue
        rank = int(m.group(1))
        prof = profiles.setdefault(rank, RankProfile(rank))
        prof.traces.append(p)
        _add_trace(prof, load_trace_events(p))
    return dict(sorted(profiles.items()))


def _table(rows: list[list[str]], out: TextIO, indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        print(indent + "  ".join(cells).rstrip(), file=out)


def _short(name: str, n: int = 60) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def print_summary(run_dir: Path, top: int = 15, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    profiles = load_profiles(run_dir)
    if not profiles:
        print(
            f"imgtrain: no profiler traces in {Path(run_dir) / 'profiler'} (set profiler.enabled=true)",
            file=sys.stderr,
        )
        return 1
    for prof in profiles.values():
        total = sum(prof.self_cpu_us.values()) or 1.0
        steps = prof.step_ms
        step_txt = (
            f"{len(steps)} profiled steps, step time mean {statistics.mean(steps):.1f} ms "
            f"(min {min(steps):.1f}, max {max(steps):.1f})"
            if steps
            else "no ProfilerStep marks"
        )
        print(f"rank {prof.rank}: {len(prof.traces)} trace(s), {step_txt}", file=out)
        rows = [["operator (top by self CPU time)", "calls", "self CPU ms", "%", "ms/step"]]
        for op, us in sorted(prof.self_cpu_us.items(), key=lambda kv: -kv[1])[:top]:
            rows.append(
                [
                    _short(op),
                    str(prof.calls[op]),
                    f"{us / 1000:.2f}",
                    f"{100 * us / total:.1f}",
                    f"{prof.per_step_ms(op):.2f}",
                ]
            )
        _table(rows, out)
        if prof.gpu_us:
            rows = [["GPU kernel / copy (top by time)", "CUDA ms", "ms/step"]]
            for name, us in sorted(prof.gpu_us.items(), key=lambda kv: -kv[1])[:top]:
                rows.append([_short(name), f"{us / 1000:.2f}", f"{us / 1000 / prof.steps:.2f}"])
            _table(rows, out)
        print(file=out)
    if len(profiles) > 1:
        _print_across_ranks(profiles, top, out)
    return 0


def _print_across_ranks(profiles: dict[int, RankProfile], top: int, out: TextIO) -> None:
    print("across ranks", file=out)
    means = {r: statistics.mean(p.step_ms) for r, p in profiles.items() if p.step_ms}
    if len(means) > 1:
        slow, fast = max(means, key=means.get), min(means, key=means.get)
        print(
            "  step time per rank: " + ", ".join(f"rank {r} {m:.1f} ms" for r, m in means.items()), file=out
        )
        print(
            f"  slowest rank {slow} is {100 * (means[slow] / means[fast] - 1):.0f}% slower than the fastest "
            f"(rank {fast})",
            file=out,
        )
    ops = set().union(*(p.self_cpu_us for p in profiles.values()))
    spread = []
    for op in ops:
        per = {r: p.per_step_ms(op) for r, p in profiles.items()}
        spread.append((max(per.values()) - min(per.values()), op, per))
    spread.sort(key=lambda t: -t[0])
    ranks = list(profiles)
    rows = [
        [
            "operator (largest difference between ranks)",
            *(f"rank {r} ms/step" for r in ranks),
            "spread ms",
            "slowest",
        ]
    ]
    for diff, op, per in spread[:top]:
        rows.append(
            [_short(op), *(f"{per[r]:.2f}" for r in ranks), f"{diff:.2f}", f"rank {max(per, key=per.get)}"]
        )
    _table(rows, out)
