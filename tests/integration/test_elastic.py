"""Elastic membership with real torchrun agents: a node is killed and re-added; a network partition."""

from __future__ import annotations

import json
import time

import pytest

from conftest import free_port, make_image_folder
from elastic_nodes import (
    Node,
    cleanup_pids,
    events,
    ip,
    lose_a_node_then_rejoin,
    namespace_pair_for_test,
    train_args,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_node_killed_and_readded(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    # The second node does not host the c10d store, so the first one can go on without it. The nodes run
    # the launcher imgtrain ships (`imgtrain launch`: workers forked from the pre-importing agent). Started
    # together (the second retries until the first's store is up), so that the first group has both:
    # one second apart, the first can pass its 1 s last call alone and start at world size 1.
    nodes = lose_a_node_then_rejoin(
        out, lambda name: Node(name, endpoint, train_args(data, out), tmp_path, launcher="imgtrain",
                               is_host=name == "first"), victim="second")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2 and summary["restarts"] >= 2
    # Every sample exactly once per epoch despite two membership changes and re-sharding.
    assert summary["images_seen"] == 6 * 48
    assert "elastic: world size changed 2 -> 1" in nodes[0].output()
    # The survivor's agent saw its worker fail when the peer vanished, and restarted a fork of itself.
    assert "of fn: run_worker (start_method: fork)" in nodes[0].output()


@pytest.fixture
def two_namespaces():
    with namespace_pair_for_test("it", "10.231.7") as pair:
        yield pair


def test_network_partition_is_detected_and_survivor_continues(tmp_path, two_namespaces):
    (ns_a, ns_b), (veth_a, veth_b), (addr_a, addr_b) = two_namespaces
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "run"
    endpoint = f"{addr_a}:{free_port()}"
    args = [*train_args(data, out), "distributed.timeout=10"]
    # Inside a namespace the hostname does not resolve to the namespace's address, so torchrun cannot
    # guess which agent hosts the store, nor which address the workers should advertise: say both
    # explicitly, as on machines with several interfaces.
    host = Node("host", endpoint, args, tmp_path, netns=ns_a, ifname=veth_a, is_host=True, local_addr=addr_a)
    other = Node("other", endpoint, args, tmp_path, netns=ns_b, ifname=veth_b, is_host=False,
                 local_addr=addr_b)
    nodes = [host, other]
    try:
        wait_for(lambda: any(e["world_size"] == 2 for e in events(out, "start")), 120, "a 2-node group", nodes)
        wait_for(lambda: list((out / "checkpoints").glob("step_*/manifest.json")), 120,
                 "a first checkpoint", nodes)
        starts_before = len(events(out, "start"))
        ip("-n", ns_b, "link", "set", veth_b, "down")  # cut the other node off
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
