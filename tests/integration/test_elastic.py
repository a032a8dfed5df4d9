"""Elastic membership with real torchrun agents: a node is killed and re-added; a network partition."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

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
        out,
        lambda name: Node(
            name, endpoint, train_args(data, out), tmp_path, launcher="imgtrain", is_host=name == "first"
        ),
        victim="second",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 2 and summary["restarts"] >= 2
    # Every sample exactly once per epoch despite two membership changes and re-sharding.
    assert summary["images_seen"] == 6 * 48
    assert "elastic: world size changed 2 -> 1" in nodes[0].output()
    # The survivor's agent saw its worker fail when the peer vanished, and restarted a fork of itself.
    assert "of fn: run_worker (start_method: fork)" in nodes[0].output()


def test_keep_global_holds_the_recipes_global_batch_as_the_world_grows_and_shrinks(tmp_path):
    """One node of a --nnodes=1:2 job starts alone, a second joins, then dies: under keep_global every start
    trains with the recipe's global batch at the full world size (4 per process x 2) and its peak LR,
    accumulating where a node is missing, and each change of world size is logged with the decision."""
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    args = train_args(data, out)  # training.batch_size=4, a checkpoint every 3 steps

    def node(name: str) -> Node:
        return Node(name, endpoint, args, tmp_path, launcher="imgtrain", is_host=name == "first")

    def start_at(world: int, after: int) -> dict:
        return wait_for(
            lambda: [e for e in events(out, "start")[after:] if e["world_size"] == world],
            120,
            f"a start at world size {world}",
            nodes,
        )[0]

    def saved_after(start: dict) -> None:  # published (manifest written) by the group that began at start
        wait_for(
            lambda: [
                e
                for e in events(out, "checkpoint")
                if e["time"] > start["time"] and (Path(e["path"]) / "manifest.json").exists()
            ],
            120,
            "a checkpoint",
            nodes,
        )

    def logged(line: str) -> None:
        wait_for(lambda: line in first.output(), 60, repr(line), nodes)

    first = node("first")
    nodes = [first]
    try:
        alone = start_at(1, 0)
        training = yaml.safe_load((out / "config.yaml").read_text())["training"]
        peak_lr = training["base_lr"] * 8 / training["lr_reference_batch"]  # the linear scaling rule at 8
        assert (alone["global_batch"], alone["accumulation"]) == (8, 2)
        assert alone["peak_lr"] == pytest.approx(peak_lr)
        logged(
            "elastic: world size 1 at the first start, 2 for the whole job (imgtrain launch's --nnodes "
            "maximum); policy keep_global: accumulation 2, global batch 8"
        )
        saved_after(alone)
        nodes.append(node("second"))
        both = start_at(2, len(events(out, "start")))
        assert both["resumed_from"], "the grown group continues from the 1-node checkpoint"
        assert (both["global_batch"], both["accumulation"]) == (8, 1)
        assert both["peak_lr"] == pytest.approx(peak_lr)
        logged("elastic: world size changed 1 -> 2; policy keep_global: accumulation 1, global batch 8")
        saved_after(both)
        starts = len(events(out, "start"))
        nodes[1].kill()
        again = start_at(1, starts)
        assert again["resumed_from"]
        assert (again["global_batch"], again["accumulation"]) == (8, 2)
        assert again["peak_lr"] == pytest.approx(peak_lr)
        logged("elastic: world size changed 2 -> 1; policy keep_global: accumulation 2, global batch 8")
        assert first.proc.wait(timeout=300) == 0, first.output()[-3000:]
    finally:
        cleanup_pids(nodes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 1 and summary["global_batch"] == 8
    assert summary["images_seen"] == 6 * 48


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
    other = Node(
        "other", endpoint, args, tmp_path, netns=ns_b, ifname=veth_b, is_host=False, local_addr=addr_b
    )
    nodes = [host, other]
    try:
        wait_for(
            lambda: any(e["world_size"] == 2 for e in events(out, "start")), 120, "a 2-node group", nodes
        )
        wait_for(
            lambda: list((out / "checkpoints").glob("step_*/manifest.json")), 120, "a first checkpoint", nodes
        )
        starts_before = len(events(out, "start"))
        ip("-n", ns_b, "link", "set", veth_b, "down")  # cut the other node off
        cut_at = time.time()
        survivor = wait_for(
            lambda: [e for e in events(out, "start")[starts_before:] if e["world_size"] == 1],
            150,
            "the survivor to re-form the group alone after the partition",
            nodes,
        )[0]
        first_step = wait_for(
            lambda: [e for e in events(out, "train") if e["time"] > survivor["time"]],
            120,
            "a step after the partition",
            nodes,
        )[0]
        assert first_step["time"] - cut_at < 90
        assert host.proc.wait(timeout=300) == 0, host.output()[-3000:]
    finally:
        cleanup_pids(nodes)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["world_size"] == 1
    assert summary["images_seen"] == 6 * 48
