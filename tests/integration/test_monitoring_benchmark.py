"""Smoke test of benchmarks/monitoring_overhead.py: the three variants (off, metrics, profiler) run, the metrics endpoint is scraped,
the result JSON has the documented keys. The numbers themselves are not checked."""

from __future__ import annotations

import json

import pytest

from conftest import run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_monitoring_overhead_benchmark(tmp_path):
    out = tmp_path / "monitoring_overhead.json"
    proc = run_benchmark(
        "monitoring_overhead",
        [
            "--model",
            "simple_cnn",
            "--width",
            "4",
            "--batch",
            "4",
            "--image-size",
            "16",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--rounds",
            "2",
            "--log-interval",
            "2",
            "--straggler-interval",
            "2",
            "--scrape-interval",
            "0.05",
            "--threads",
            "1",
            "--profiler",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "metrics / off, median of per-round ratios" in proc.stdout
    r = json.loads(out.read_text())
    assert r["benchmark"] == "monitoring_overhead" and r["unit"] == "images/s"
    assert "profiler / off, median of per-round ratios" in proc.stdout
    for variant in ("off", "metrics", "profiler"):
        assert r[variant]["n"] == 2 and 0 < r[variant]["min"] <= r[variant]["median"] <= r[variant]["max"]
    assert r["ratio_of_medians"]["metrics"] > 0 and r["ratio_per_round"]["metrics"]["n"] == 2
    assert r["ratio_per_round"]["profiler"]["n"] == 2
    assert r["scrapes"] >= 1 and r["scrape_seconds"]["n"] == r["scrapes"]
    assert 0 < r["metrics_seconds_per_step_alone"] < 0.1
    assert r["machine"]["cpu_model"] and "monitoring_overhead.py" in r["command"]
