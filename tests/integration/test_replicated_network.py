"""Replicated mode across hosts: each replica group in a network namespace of its own (its own address,
and in the first test its own host name), the lighthouse bound to one host's address. What a user of a
multi-host job sees is checked: the groups find each other only through what they advertise; a group
killed and restarted heals from its peer on the other host bit for bit; a network partition that cuts a
group off for longer than the collective timeout leaves the group that still reaches the lighthouse
training (no restart, its step never goes back), and once the link is back the cut-off group rejoins
without a restart and heals.

Needs root and iproute2 (skipped otherwise). The tests wait on metrics.jsonl records; timeouts are
generous bounds only.
"""

from __future__ import annotations

import time

import pytest
import test_replicated as rep
from test_replicated import data_dir  # noqa: F401 - the module-scoped fixture

from conftest import Run, free_port, wait_for
from elastic_nodes import hosts_for_test

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COLLECTIVE_TIMEOUT = 5  # rep.group_command's fault_tolerance.replicated.collective_timeout


@pytest.fixture
def network(tmp_path, data_dir):  # noqa: F811
    """``(hosts, lighthouse, start)``: two hosts, the lighthouse on host 0's address, and
    ``start(group, *extra, own_name=True)`` running replica group g on host g."""
    with hosts_for_test("rn", "10.231.11", ("imgtrain-g0", "imgtrain-g1")) as hosts:
        lighthouse = rep.Lighthouse(
            free_port(),
            tmp_path / "lighthouse.log",
            host=hosts.addrs[0],
            prefix=lambda cmd: hosts.command(0, cmd, own_name=False),
        )
        started: list[Run] = []
        try:
            lighthouse.start()

            def start(group: int, *extra: str, own_name: bool = True, name: str | None = None) -> Run:
                cmd = rep.group_command(tmp_path, data_dir, lighthouse.address, group, *extra)
                run = Run(hosts.command(group, cmd, own_name), tmp_path / "run", name or f"group{group}")
                started.append(run)
                return run

            yield hosts, lighthouse, start
        finally:
            for r in started:
                r.cleanup()
            lighthouse.kill()


def test_groups_on_two_hosts_heal_across_them_bit_exact(tmp_path, network):
    """Each group on its own host under its own host name, nothing configured but the lighthouse's address:
    torchft and imgtrain advertise the host name, which resolves on the other host. Group 1 killed,
    relaunched: it heals over the link from group 0, which never restarts."""
    hosts, _, start = network
    g0, g1 = start(0), start(1)
    pid0 = g0.proc.pid
    rep.wait_both_in_quorum(tmp_path, [g0, g1])
    g1.proc.kill()
    g1.proc.wait(timeout=30)
    wait_for(
        lambda: any(r["quorum_size"] == 1 for r in rep.records(tmp_path, 0, "quorum")),
        rep.WAIT,
        "group 0 to go on without group 1",
        poll=0.05,
    )
    before = rep.last_step(tmp_path, 0)
    heals = len(rep.records(tmp_path, 1, "heal"))
    g1b = start(1, name="group1-restarted")
    heal = rep.wait_for_heal(tmp_path, g1b, heals)
    assert heal["heal_bytes"] > 0 and heal["step"] > before
    rep.assert_no_restart(g0, pid0)
    rep.assert_same_weights_after(tmp_path, [g0, g1b], heal["step"])
    rep.assert_steps_never_go_back(tmp_path, 0)


def test_partition_the_group_with_the_lighthouse_goes_on_and_the_cut_off_group_rejoins_and_heals(
    tmp_path, network
):
    """Both hosts keep the host's name (which resolves to nothing reachable): each group advertises its
    address instead (fault_tolerance.replicated.advertise_address). Group 1's link goes down for longer
    than the collective timeout, then comes back."""
    hosts, _, start = network

    def group(g: int) -> Run:
        return start(g, f"fault_tolerance.replicated.advertise_address={hosts.addrs[g]}", own_name=False)

    g0, g1 = group(0), group(1)
    pid0, pid1 = g0.proc.pid, g1.proc.pid
    rep.wait_both_in_quorum(tmp_path, [g0, g1])
    hosts.link(1, up=False)
    cut, cut_at = time.monotonic(), rep.last_step(tmp_path, 0)
    wait_for(
        lambda: (
            any(r["quorum_size"] == 1 and r["step"] >= cut_at for r in rep.records(tmp_path, 0, "quorum"))
            and rep.last_step(tmp_path, 0) >= cut_at + 10
            and time.monotonic() - cut > COLLECTIVE_TIMEOUT + 1
        ),
        rep.WAIT,
        "group 0 to train on without the cut-off group",
        poll=0.05,
        ended=lambda: g0.proc.poll() is not None,
        context=lambda: g0.output[-4000:],
    )
    alone_until = rep.last_step(tmp_path, 0)
    heals = len(rep.records(tmp_path, 1, "heal"))
    hosts.link(1, up=True)
    heal = rep.wait_for_heal(tmp_path, g1, heals)
    assert heal["step"] >= alone_until  # it caught up with group 0 instead of rolling it back
    rep.assert_no_restart(g0, pid0)
    rep.assert_no_restart(g1, pid1)
    assert "Traceback" not in g0.output
    rep.assert_same_weights_after(tmp_path, [g0, g1], heal["step"])
    rep.assert_steps_never_go_back(tmp_path, 0)
