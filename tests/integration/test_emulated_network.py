"""benchmarks/netem.py + scaling.py: a 2-node torchrun job over an emulated, rate-limited network
completes and leaves no namespace, veth or bridge behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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


@pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="iproute2 not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and qdiscs need root")
def test_network_removed_on_sigterm_and_leftovers_of_dead_runs_deleted(tmp_path):
    import signal

    # A leftover of a run killed with SIGKILL (its pid is not running) and one of a live run (ours).
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # never a running process
    leftover, live = f"itn{dead_pid}h0", f"itn{os.getpid()}h9"
    for name in (leftover, live):
        subprocess.run(["ip", "netns", "add", name], check=True)
    holder = None
    try:
        code = (
            "import sys, time; sys.path.insert(0, sys.argv[1]); from netem import StarNetwork\n"
            "with StarNetwork(2, rate_mbit=1000) as net:\n"
            "    print(net.prefix, flush=True); time.sleep(120)\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(REPO / "benchmarks")],
            stdout=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        prefix = holder.stdout.readline().strip()
        assert prefix, "the network was not created"
        assert {f"{prefix}s", f"{prefix}h0", f"{prefix}h1"} <= _namespaces()
        assert leftover not in _namespaces(), "a dead run's namespace must be deleted on entry"
        assert live in _namespaces(), "a live run's namespace must be left alone"
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=30) == 128 + signal.SIGTERM
        wait_for(
            lambda: not any(n.startswith(prefix) for n in _namespaces()),
            10,
            f"the {prefix}* namespaces to be deleted",
            poll=0.1,
            context=lambda: str(sorted(_namespaces())),
        )
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        subprocess.run(["ip", "netns", "del", live], capture_output=True)
        subprocess.run(["ip", "netns", "del", leftover], capture_output=True)
