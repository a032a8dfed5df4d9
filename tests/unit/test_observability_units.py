"""Pieces of the observability tools that a run does not exercise deterministically: self-time arithmetic
of the profile summary, straggler detection, run status across restarts, config errors."""

from __future__ import annotations

import io
import json

import pytest

from imgtrain.config import ConfigError, load_config
from imgtrain.tools.monitor import stragglers
from imgtrain.tools.profile_summary import load_profiles, print_summary
from imgtrain.tools.rundata import RunData


def _op(name, ts, dur, cat="cpu_op", tid=1):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur}


def _write_trace(path, conv_us):
    events = [
        _op("ProfilerStep#1", 0, 1000, cat="user_annotation"),
        _op("aten::linear", 0, 1000),  # its children: conv (conv_us) and relu (100)
        _op("aten::conv2d", 10, conv_us),
        _op("aten::relu", 10 + conv_us, 100),
        _op("aten::add", 2000, 50, tid=2),  # another thread
        {"ph": "X", "cat": "kernel", "name": "sgemm", "pid": 0, "tid": 7, "ts": 5, "dur": 300},
    ]
    path.write_text(json.dumps({"schemaVersion": 1, "traceEvents": events}))


def test_profile_summary_self_times_and_rank_differences(tmp_path):
    prof_dir = tmp_path / "profiler"
    prof_dir.mkdir()
    _write_trace(prof_dir / "rank0.1.pt.trace.json", conv_us=200)
    _write_trace(prof_dir / "rank1.1.pt.trace.json", conv_us=700)
    profiles = load_profiles(tmp_path)
    assert profiles[0].self_cpu_us["aten::linear"] == 1000 - 200 - 100
    assert profiles[1].self_cpu_us["aten::linear"] == 1000 - 700 - 100
    assert profiles[0].self_cpu_us["aten::add"] == 50 and profiles[0].step_ms == [1.0]
    assert profiles[0].gpu_us["sgemm"] == 300
    out = io.StringIO()
    assert print_summary(tmp_path, top=3, out=out) == 0
    text = out.getvalue()
    across = text.split("across ranks")[1]
    # conv2d and linear differ by 0.5 ms/step between the ranks; conv2d is slower on rank 1.
    first = across.strip().splitlines()[3]
    assert first.split()[0] in ("aten::conv2d", "aten::linear") and "0.50" in first
    assert "sgemm" in text


def test_profile_summary_without_traces_fails_clearly(tmp_path, capsys):
    assert print_summary(tmp_path) == 1
    assert "no profiler traces" in capsys.readouterr().err


def test_stragglers_named_against_the_median():
    latest = {0: {"step_s": 1.0}, 1: {"step_s": 1.05}, 2: {"step_s": 1.6}, 3: {"step_s": 0.98}}
    assert [(r, round(x, 2)) for r, x in stragglers(latest)] == [(2, 0.56)]
    assert stragglers({0: {"step_s": 1.0}}) == []


def test_status_follows_restarts(tmp_path):
    def write(*events):
        with open(tmp_path / "metrics.jsonl", "a") as f:
            for e in events:
                f.write(json.dumps({"event": e, "step": 1}) + "\n")

    data = RunData(tmp_path)
    assert data.refresh().status == "not started"
    write("start", "train")
    assert data.refresh().status == "running"
    write("failed")
    assert data.refresh().status == "failed" and data.ended
    write("start")  # torchrun restarted the workers
    assert data.refresh().status == "running" and not data.ended
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "fini')  # torn line: waits for the rest
    assert data.refresh().status == "running"
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('shed", "step": 9}\n')
    assert data.refresh().status == "finished"


@pytest.mark.parametrize(
    "override, key",
    [
        ("profiler.active=0", "profiler.active"),
        ("profiler.ranks=[-1]", "profiler.ranks"),
        ("monitoring.log_format=xml", "monitoring.log_format"),
        ("monitoring.notify.events=[started,started]", "monitoring.notify.events"),
        ("monitoring.notify.urls=slack://x", "monitoring.notify.urls"),
    ],
)
def test_bad_monitoring_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key
