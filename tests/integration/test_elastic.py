"""Elastic membership with real torchrun agents: a node is killed and re-added; a network partition."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import pytest

from conftest import TINY, free_port, make_image_folder
from elastic_nodes import Node, cleanup_pids, events, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _train_args(data, out) -> list[str]:
    # A model slow enough (~0.1-0.3 s per step on 2 cores) that membership changes happen mid-run.
    return ["train", "--output-dir", str(out), f"data.root={data}", *TINY,
            "model.name=resnet18", "model.small_input=true", "data.image_size=16", "data.val_resize=16",
            "training.batch_size=4", "training.epochs=6", "checkpoint.save_every_steps=3",
            "checkpoint.keep_last_n=2", "distributed.timeout=20", "fault_tolerance.hang_timeout=120"]


def test_node_killed_and_readded(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    args = _train_args(data, out)
    host = Node("host", endpoint, args, tmp_path)
    time.sleep(1.0)  # the host agent starts the rendezvous store
    other = Node("other", endpoint, args, tmp_path)
    nodes = [host, other]
    try:
        wait_for(lambda: any(e["world_size"] == 2 for e in events(out, "start")), 120,
                 "a 2-node group", nodes)
        wait_for(lambda: list((out / "checkpoints").glob("step_*/manifest.json")), 120,
                 "a first checkpoint", nodes)
        starts_before = len(events(out, "start"))
        other.kill()
        killed_at = time.time()
        survivor = wait_for(lambda: [e for e in events(out, "start")[starts_before:] if e["world_size"] == 1],
                            120, "the survivor to re-form the group alone", nodes)[0]
        assert survivor["resumed_from"], "the survivor must continue from the last checkpoint"
        first_step = wait_for(lambda: [e for e in events(out, "train") if e["time"] > survivor["time"]],
                              120, "a step after the node loss", nodes)[0]
        recovery = first_step["time"] - killed_at
        assert recovery < 60, f"recovery from a node loss took {recovery:.1f}s"

        starts_before = len(events(out, "start"))
        other = Node("other2", endpoint, args, tmp_path)
        nodes.append(other)
        wait_for(lambda: [e for e in events(out, "start")[starts_before:] if e["world_size"] == 2], 120,
                 "the restarted node to join (world size back to 2)", nodes)
        assert host.proc.wait(timeout=300) == 0, host.output()[-3000:]
        assert other.proc.wait(timeout=60) == 0, other.output()[-3000:]
    finally:
        cleanup_pids(nodes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2 and summary["restarts"] >= 2
    # Every sample exactly once per epoch despite two membership changes and re-sharding.
    assert summary["images_seen"] == 6 * 48
    assert "elastic: world size changed 2 -> 1" in host.output()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_namespaces():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    tag = uuid.uuid4().hex[:6]
    ns = (f"itA{tag}", f"itB{tag}")
    veth = (f"va{tag}", f"vb{tag}")
    addrs = ("10.231.7.1", "10.231.7.2")
    try:
        for n in ns:
            _ip("netns", "add", n)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces unavailable (needs root): {e.stderr.decode().strip()}")
    try:
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for n, v, a in zip(ns, veth, addrs, strict=True):
            _ip("link", "set", v, "netns", n)
            _ip("-n", n, "addr", "add", f"{a}/24", "dev", v)
            _ip("-n", n, "link", "set", v, "up")
            _ip("-n", n, "link", "set", "lo", "up")
            # Give up on a dead TCP peer after ~3 retransmissions instead of ~15 minutes.
            subprocess.run(["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.tcp_retries2=3"], check=False)
        yield ns, veth, addrs
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_network_partition_is_detected_and_survivor_continues(tmp_path, two_namespaces):
    (ns_a, ns_b), (veth_a, veth_b), (addr_a, addr_b) = two_namespaces
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "run"
    endpoint = f"{addr_a}:{free_port()}"
    args = [*_train_args(data, out), "distributed.timeout=10"]
    # Inside a namespace the hostname does not resolve to the namespace's address, so torchrun cannot
    # guess which agent hosts the store, nor which address the workers should advertise: say both
    # explicitly, as on machines with several interfaces.
    host = Node("host", endpoint, args, tmp_path, netns=ns_a, ifname=veth_a, is_host=True, local_addr=addr_a)
    time.sleep(1.0)
    other = Node("other", endpoint, args, tmp_path, netns=ns_b, ifname=veth_b, is_host=False,
                 local_addr=addr_b)
    nodes = [host, other]
    try:
        wait_for(lambda: any(e["world_size"] == 2 for e in events(out, "start")), 120, "a 2-node group", nodes)
        wait_for(lambda: list((out / "checkpoints").glob("step_*/manifest.json")), 120,
                 "a first checkpoint", nodes)
        starts_before = len(events(out, "start"))
        _ip("-n", ns_b, "link", "set", veth_b, "down")  # cut the other node off
        cut_at = time.time()
        survivor = wait_for(lambda: [e for e in events(out, "start")[starts_before:] if e["world_size"] == 1],
                            150, "the survivor to re-form the group alone after the partition", nodes)[0]
        first_step = wait_for(lambda: [e for e in events(out, "train") if e["time"] > survivor["time"]],
                              120, "a step after the partition", nodes)[0]
        assert first_step["time"] - cut_at < 90
        assert host.proc.wait(timeout=300) == 0, host.output()[-3000:]
    finally:
        cleanup_pids(nodes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 1
    assert summary["images_seen"] == 6 * 48
