"""benchmarks/netem.py + scaling.py: a 2-node torchrun job over an emulated, rate-limited network
completes and leaves no namespace, veth or bridge behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

pytestmark = [pytest.mark.integration]


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="iproute2 not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and qdiscs need root")
def test_two_node_job_over_a_shaped_link_and_nothing_left_behind(tmp_path):
    links_before, ns_before = _links(), _namespaces()
    out = tmp_path / "scaling.json"
    env = subprocess_env()
    env["TMPDIR"] = str(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "scaling.py"),
            "--models",
            "simple_cnn",
            "--nodes",
            "2",
            "--links",
            "1000",
            "--methods",
            "none",
            "--steps",
            "2",
            "--compute-steps",
            "1",
            "--allreduce-repeats",
            "1",
            "--image-size",
            "16",
            "--batch",
            "8",
            "--job-timeout",
            "240",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    result = json.loads(out.read_text())
    (job,) = result["jobs"]
    assert job["world_size"] == 2 and job["network"]["emulated"]
    assert [h["addr"] for h in job["network"]["hosts"]] == ["10.232.0.1", "10.232.0.2"]
    assert job["network"]["qdisc"].startswith("tbf rate 1000")
    (row,) = result["rows"]
    # Gradients crossed the emulated link: each rank's eth0 sent at least its share of the ring all-reduce.
    grad_bytes = 4 * job["links"][0]["grad_numel"]
    assert row["wire_MB_per_step_per_rank"] * 1e6 >= grad_bytes * 0.9
    assert 0 < row["compute_s"] and 0 < row["step_s"] and row["allreduce_fp32_s"] > 0
    # Other jobs on the machine may add links or namespaces meanwhile: look for ours by name.
    assert not {n for n in _namespaces() - ns_before if n.startswith("itn")}
    assert not (_links() - links_before) & {"br0", "p0", "p1", "eth0"}
