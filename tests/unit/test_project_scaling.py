"""benchmarks/project_scaling.py: the ring formula, the hierarchical split and the calibration check."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import project_scaling as ps  # noqa: E402


def test_ring_allreduce_bound():
    # 2(N-1)/N x bytes / bandwidth: 47 MB over 2 ranks at 1 Gbit/s is 376 ms (the prototype measured 391).
    assert ps.ring_allreduce_s(47e6, 2, 1e9 / 8) == pytest.approx(0.376)
    assert ps.ring_allreduce_s(100e6, 4, 1e9) == pytest.approx(0.15)
    assert ps.ring_allreduce_s(100e6, 4, 1e9, latency_s=1e-3) == pytest.approx(0.15 + 6e-3)
    assert ps.ring_allreduce_s(100e6, 1, 1e9) == 0.0


def test_hierarchical_allreduce_puts_only_the_inter_node_ring_on_the_network():
    spec = ps.ModelSpec("m", params=25_000_000, powersgd_floats=100_000, gpu_images_per_s=1000, gpu_source="")
    cal = ps.Calibration(bandwidth_efficiency=1.0, overlap=0.0)
    fabric = ps.Fabric("test", node_gbit=100, latency_s=0.0, nvlink_GBps=1e9, nvlink_latency_s=0.0)
    # NVLink made infinitely fast: 4 nodes of 8 GPUs cost exactly a 4-rank ring over the node NIC.
    t = ps.comm_time_s("none", spec, 32, 8, fabric, cal)
    assert t == pytest.approx(ps.ring_allreduce_s(4 * 25e6, 4, 100e9 / 8), rel=1e-6)
    assert ps.comm_time_s("fp16", spec, 32, 8, fabric, cal) == pytest.approx(t / 2, rel=1e-6)
    # Inside one node nothing crosses the network.
    assert ps.comm_time_s("none", spec, 8, 8, fabric, cal) == pytest.approx(0.0, abs=1e-9)
    # 1-bit is an all-gather: its bytes grow with the number of ranks and overtake fp16 at scale.
    assert ps.comm_time_s("onebit", spec, 64, 8, fabric, cal) > ps.comm_time_s(
        "onebit", spec, 16, 8, fabric, cal
    )


def _row(method, link, compute, wire_mb, overlap=0.0, eff=1.0, encode=0.0):
    comm = wire_mb * 1e6 / (eff * link * 1e6 / 8)
    step = compute + max(0.0, comm - overlap * ps.BACKWARD_FRACTION * compute) + encode
    return {
        "model": "resnet18",
        "nodes": 2,
        "link_mbit": link,
        "method": method,
        "compute_s": compute,
        "step_s": step,
        "wire_MB_per_step_per_rank": wire_mb,
        "allreduce_fp32_s": 0.4 / eff,
        "ring_bound_fp32_s": 0.4,
    }


def test_calibration_recovers_the_parameters_and_flags_a_row_it_cannot_explain():
    kw = {"overlap": 0.3, "eff": 0.9}
    rows = [
        _row("none", 1000, 0.1, 47, **kw),
        _row("none", 2500, 0.1, 47, **kw),
        _row("onebit", 1000, 0.1, 1.5, encode=0.05, **kw),
        _row("onebit", 2500, 0.12, 1.5, encode=0.05, **kw),
    ]
    cal, checks = ps.calibrate({"rows": rows})
    assert cal.bandwidth_efficiency == pytest.approx(0.9)
    assert cal.overlap == pytest.approx(0.3)
    assert cal.encode_s["onebit"] == pytest.approx(0.05)
    # Fitted on the 1 Gbit/s rows only; the 2.5 Gbit/s rows are predictions, exact for data the model made.
    assert [c["fitted_on"] for c in checks] == [True, False, True, False]
    assert max(abs(c["error"]) for c in checks) < 1e-6
    rows[3]["step_s"] *= 1.3  # a 2.5 Gbit/s step the model cannot explain
    _, checks = ps.calibrate({"rows": rows})
    assert abs(checks[3]["error"]) > ps.TOLERANCE
