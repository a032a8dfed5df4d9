"""scripts/launch_training.sh in its multi-node (ssh) mode starts a real 2-node job: two network namespaces
stand in for two hosts (the per-host command goes through `ip netns exec` instead of ssh), one torchrun
agent in each, rendezvous over their veth link, training to completion. scripts/monitor.sh reports the
job while it runs; scripts/cleanup.sh --dry-run, then a real cleanup, prune its checkpoints and keep the
newest good one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO, free_port, make_image_folder, subprocess_env
from elastic_nodes import events, namespace_pair_for_test, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCRIPTS = REPO / "scripts"


@pytest.fixture
def two_hosts():
    with namespace_pair_for_test("ls", "10.231.9") as pair:
        yield pair


def _script(name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout, env=subprocess_env()
    )


def test_two_node_job_over_launch_monitor_and_cleanup(tmp_path, two_hosts):
    (ns_a, ns_b), _, (addr_a, addr_b) = two_hosts
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "run"
    train = [
        "--output-dir",
        str(out),
        f"data.root={data}",
        "model.name=resnet18",
        "model.small_input=true",
        "data.image_size=16",
        "data.val_resize=16",
        "data.workers=0",
        "training.epochs=2",
        "training.batch_size=4",
        "training.warmup_epochs=0",
        "training.progress_bar=false",
        "training.log_interval=1",
        "checkpoint.save_every_steps=3",
        "checkpoint.keep_last_n=20",
        "distributed.timeout=30",
        "fault_tolerance.hang_timeout=120",
    ]
    launcher = subprocess.Popen(
        [
            str(SCRIPTS / "launch_training.sh"),
            "--mode",
            "ssh",
            "--hosts",
            f"{ns_a}={addr_a},{ns_b}={addr_b}",
            "--ssh-cmd",
            "ip netns exec {host} bash -c {cmd}",
            "--port",
            str(free_port()),
            "--gpus",
            "1",
            "--job",
            "it-launch",
            "--",
            *train,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
    )
    logs = out / "logs"

    def host_logs() -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs.glob("*.log"))

    try:
        try:
            wait_for(
                lambda: events(out, "train") or launcher.poll() is not None, 180, "a first training step"
            )
        except AssertionError as e:
            raise AssertionError(f"{e}\n{host_logs()}") from None
        assert launcher.poll() is None, f"the launcher exited {launcher.returncode}\n{host_logs()}"
        # While it runs: monitor.sh sees it running, with a step and a throughput.

        def running():
            mon = _script("monitor.sh", str(out))
            return mon if mon.stdout.startswith(f"{out}: running") and " images/s" in mon.stdout else None

        seen = wait_for(
            lambda: running() or launcher.poll() is not None, 180, "monitor.sh to see the job running"
        )
        assert seen is not True, "the job finished before monitor.sh saw it running"
        assert seen.returncode == 0 and re.search(
            r"\| step \d+ epoch \d world 2 \| [\d.]+ images/s", seen.stdout
        )
        status = json.loads(_script("monitor.sh", "--json", str(out)).stdout)
        assert (
            status["step"] >= 1 and status["world_size"] == 2 and status["state"] in ("running", "finished")
        )
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode == 0, output[-3000:] + host_logs()
    # The launcher said where everything is; each host's output is in its own log.
    assert f"checkpoints: {out}/checkpoints" in output and f"{out}/metrics.jsonl" in output
    # Each host ran the script in node mode against the first host's store, and its own agent's output
    # (rank 0's training log on one of them) went to that host's log.
    host_log = {ns: (logs / f"{ns}.log").read_text() for ns in (ns_a, ns_b)}
    for ns, is_host in ((ns_a, "true"), (ns_b, "false")):
        assert re.search(
            rf"launch_training.sh: mode=node nodes=2 .* endpoint={re.escape(addr_a)}:\d+ .*"
            rf"is_host={is_host}\b",
            host_log[ns],
        ), host_log[ns][-3000:]
    trained = [
        ns
        for ns, text in host_log.items()
        if "[rank 0] INFO imgtrain.train.trainer: imgtrain: world size 2" in text
    ]
    assert len(trained) == 1, host_logs()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2 and summary["images_seen"] == 2 * 48
    assert json.loads(_script("monitor.sh", "--json", str(out)).stdout)["state"] == "finished"

    # Cleanup keeps the newest *good* checkpoint: make the newest one corrupt first.
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) >= 4
    with open(ckpts[-1] / "state.pt", "r+b") as f:
        f.truncate(100)
    dry = _script("cleanup.sh", "--dry-run", "--run-dir", str(out), "--keep", "1")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {ckpts[0]}" in dry.stdout and f"keep {ckpts[-2]}" in dry.stdout
    assert sorted((out / "checkpoints").glob("step_*")) == ckpts
    real = _script("cleanup.sh", "--run-dir", str(out), "--keep", "1")
    assert real.returncode == 0, real.stderr
    assert sorted((out / "checkpoints").glob("step_*")) == ckpts[-2:]
    listed = subprocess.run(
        [sys.executable, "-m", "imgtrain", "checkpoints", "list", str(out / "checkpoints")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        check=True,
    ).stdout
    states = [json.loads(line)["state"][:3] for line in listed.splitlines()]
    assert states == ["bad", "ok"]
