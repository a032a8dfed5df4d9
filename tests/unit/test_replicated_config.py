"""Replicated mode without processes: its config section, what it rejects, and the data share of a step."""

from __future__ import annotations

import ipaddress
import os
import types
import uuid

import pytest
import torch

from imgtrain.config import ConfigError, load_config
from imgtrain.data.sampler import ShardedBatchSampler

replicas = pytest.importorskip("imgtrain.distributed.replicas", reason="torchft (the ft extra) not installed")

REPLICATED = ["fault_tolerance.mode=replicated"]


def test_restart_stays_the_default_mode():
    assert load_config(None, []).fault_tolerance.mode == "restart"


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        (
            "distributed.compression=powersgd",
            "distributed.compression",
            "'none' with fault_tolerance.mode=replicated",
        ),
        ("optimization.mixed_precision=fp16", "optimization.mixed_precision", "'bf16' or 'none'"),
        ("training.compile=true", "training.compile", "false with fault_tolerance.mode=replicated"),
        ("distributed.static_graph=true", "distributed.static_graph", "false with"),
        ("fault_tolerance.replicated.group_id=2", "fault_tolerance.replicated.group_id", "[0, num_groups=2)"),
        (
            "fault_tolerance.replicated.num_groups=1000001",
            "fault_tolerance.replicated.num_groups",
            "1000000]",
        ),
        (
            "fault_tolerance.replicated.min_replicas=3",
            "fault_tolerance.replicated.min_replicas",
            "[1, num_groups=2]",
        ),
        (
            "fault_tolerance.replicated.missing_group_policy=keep",
            "fault_tolerance.replicated.missing_group_policy",
            "'drop'",
        ),
        (
            "fault_tolerance.replicated.lighthouse=lh:29510",
            "fault_tolerance.replicated.lighthouse",
            "http://host:port",
        ),
        ("fault_tolerance.replicated.bind=node-3:29500", "fault_tolerance.replicated.bind", "no port"),
        (
            "fault_tolerance.replicated.advertise_address=http://10.0.0.7:1234",
            "fault_tolerance.replicated.advertise_address",
            "no scheme, no port",
        ),
        (
            "fault_tolerance.replicated.advertise_address=0.0.0.0",
            "fault_tolerance.replicated.advertise_address",
            "not 0.0.0.0 or ::",
        ),
        (
            "fault_tolerance.replicated.collective_timeout=0",
            "fault_tolerance.replicated.collective_timeout",
            "> 0",
        ),
    ],
)
def test_replicated_rejects_what_it_cannot_run_naming_the_key(override, key, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [*REPLICATED, override])
    assert ei.value.key == key
    assert expected in str(ei.value)


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("10.0.0.7", "10.0.0.7"),
        ("fd00::7", "fd00::7"),
        ('"[fd00::7]"', "fd00::7"),  # quoted: YAML reads a bare [x] as a list
        ("node-3", "node-3"),
        ("imgtrain-1.replicas.default.svc.cluster.local", "imgtrain-1.replicas.default.svc.cluster.local"),
    ],
)
def test_bind_and_advertise_address_take_ipv4_ipv6_with_or_without_brackets_and_host_names(value, host):
    from imgtrain.config import bare_host

    for key in ("bind", "advertise_address"):
        rc = load_config(
            None, [*REPLICATED, f"fault_tolerance.replicated.{key}={value}"]
        ).fault_tolerance.replicated
        assert bare_host(getattr(rc, key)) == host


@pytest.mark.parametrize(
    "value", ["10.0.0.256", '"[10.0.0.7]"', '"[node-3]"', "node-3:29500", "[fd00::7]:80", "-node"]
)
@pytest.mark.parametrize("key", ["bind", "advertise_address"])
def test_a_bad_host_exits_2_naming_the_key(key, value, tmp_path, capsys):
    from imgtrain import cli

    out = tmp_path / "run"
    assert (
        cli.main(
            ["train", "--output-dir", str(out), *REPLICATED, f"fault_tolerance.replicated.{key}={value}"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"fault_tolerance.replicated.{key}" in err and "Traceback" not in err
    assert not out.exists()


def test_compression_and_fp16_stay_allowed_in_restart_mode():
    cfg = load_config(None, ["distributed.compression=powersgd", "optimization.mixed_precision=fp16"])
    assert cfg.fault_tolerance.mode == "restart"


def test_lighthouse_and_group_come_from_the_environment_when_unset(monkeypatch):
    rc = load_config(None, REPLICATED).fault_tolerance.replicated
    monkeypatch.delenv("TORCHFT_LIGHTHOUSE", raising=False)
    monkeypatch.delenv("REPLICA_GROUP_ID", raising=False)
    with pytest.raises(ConfigError) as ei:
        rc.resolved()
    assert ei.value.key == "fault_tolerance.replicated.lighthouse" and "TORCHFT_LIGHTHOUSE" in str(ei.value)
    monkeypatch.setenv("TORCHFT_LIGHTHOUSE", "http://10.0.0.5:29510")
    with pytest.raises(ConfigError) as ei:
        rc.resolved()
    assert ei.value.key == "fault_tolerance.replicated.group_id" and "REPLICA_GROUP_ID" in str(ei.value)
    monkeypatch.setenv("REPLICA_GROUP_ID", "5")
    with pytest.raises(ConfigError, match="got 5"):
        rc.resolved()
    monkeypatch.setenv("REPLICA_GROUP_ID", "1")
    assert rc.resolved() == ("http://10.0.0.5:29510", 1)
    rc = load_config(None, [*REPLICATED, "fault_tolerance.replicated.group_id=0"]).fault_tolerance.replicated
    assert rc.resolved() == ("http://10.0.0.5:29510", 0)  # the config wins over the environment


def _shares(policy: str, groups: int, members: tuple[int, ...], gbatch: list[int]) -> dict[int, list[int]]:
    return {g: replicas.step_share(gbatch, policy, groups, g, members, members.index(g)) for g in members}


@pytest.mark.parametrize("size", [12, 11, 7])  # a full global micro-batch of 3 x 4 and two short last ones
def test_all_present_both_policies_train_every_sample_once(size):
    gbatch = list(range(100, 100 + size))
    for policy in ("redistribute", "drop"):
        shares = _shares(policy, 3, (0, 1, 2), gbatch)
        assert sorted(i for s in shares.values() for i in s) == gbatch
        assert replicas.trained_count(size, policy, 3, (0, 1, 2)) == size


def test_all_present_share_is_the_samplers_own_rank_slice():
    """With every group present a step trains exactly what restart mode's sampler gives rank g."""
    for g in range(3):
        plain = ShardedBatchSampler(30, 4, rank=g, world_size=3, seed=1)
        shared = ShardedBatchSampler(30, 4, rank=g, world_size=3, seed=1)
        shared.share = lambda gb, g=g: replicas.step_share(gb, "drop", 3, g, (0, 1, 2), g)
        assert [[r.index for r in refs] for refs, _ in plain.plan()] == [
            [r.index for r in refs] for refs, _ in shared.plan()
        ]


def test_redistribute_keeps_the_global_batch_when_a_group_is_missing():
    gbatch = list(range(12))
    shares = _shares("redistribute", 3, (0, 2), gbatch)
    assert sorted(shares[0] + shares[2]) == gbatch  # group 1's samples are trained by the others
    assert len(shares[0]) == len(shares[2]) == 6
    assert replicas.trained_count(12, "redistribute", 3, (0, 2)) == 12


def test_drop_skips_and_counts_the_missing_groups_share():
    gbatch = list(range(12))
    shares = _shares("drop", 3, (0, 2), gbatch)
    assert shares == {0: [0, 1, 2, 3], 2: [8, 9, 10, 11]}  # group 1's 4 samples are not trained
    assert replicas.trained_count(12, "drop", 3, (0, 2)) == 8
    # a short last batch: 11 samples split 4/4/3, group 1 missing drops 4
    assert replicas.trained_count(11, "drop", 3, (0, 2)) == 7


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_lighthouse_refuses_every_interface_unless_asked(host, capsys, monkeypatch):
    import os

    from imgtrain import cli

    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail(f"the lighthouse was started: {a}"))
    assert cli.main(["lighthouse", "--host", host]) == 2
    err = capsys.readouterr().err
    assert "listens on every interface" in err and "--allow-wildcard-bind" in err


def test_lighthouse_runs_torchfts_binary_on_loopback_by_default():
    from imgtrain import cli
    from imgtrain.distributed.rendezvous import lighthouse_command

    args = cli.build_parser().parse_args(["lighthouse"])
    cmd = lighthouse_command(
        args.host, args.port, args.min_replicas, args.heartbeat_timeout_ms, args.join_timeout_ms
    )
    assert cmd[0].endswith("torchft_lighthouse")
    assert cmd[cmd.index("--bind") + 1] == "127.0.0.1:29510"
    assert lighthouse_command("::1", 29510, 1, 1000, 100)[2] == "[::1]:29510"


def test_a_loopback_store_address_is_replaced_by_one_peers_reach():
    for host in ("localhost", "127.0.0.1", "::1", "[::1]"):
        assert replicas._is_loopback(host)
    for host in ("10.0.0.5", "node-3", "fe80::1"):
        assert not replicas._is_loopback(host)


def test_bind_defaults_to_the_address_of_the_host_name_peers_are_told(monkeypatch):
    monkeypatch.setattr(replicas.socket, "gethostname", lambda: "localhost")
    assert ipaddress.ip_address(replicas.bind_address(None, "http://127.0.0.1:29510")).is_loopback
    assert replicas.bind_address("127.0.0.1", "http://192.0.2.9:29510") == "127.0.0.1"  # what was asked
    assert replicas.bind_address("::1", "http://192.0.2.9:29510") == "::1"
    assert replicas.bind_address("[::1]", "http://192.0.2.9:29510") == "::1"
    assert replicas.bind_address(None, "http://127.0.0.1:29510", "[::1]") == "::1"  # the advertised address
    # bind wins over the address the advertised name resolves to
    assert replicas.bind_address("127.0.0.2", "http://127.0.0.1:29510", "localhost") == "127.0.0.2"


def test_bind_default_refuses_loopback_when_the_lighthouse_is_elsewhere(monkeypatch):
    """A multi-machine job whose host name resolves to loopback (Debian's 127.0.1.1): the other groups
    could not reach this group's servers, so it stops at start naming the key instead of hanging later."""
    monkeypatch.setattr(replicas.socket, "gethostname", lambda: "localhost")
    with pytest.raises(ConfigError) as ei:
        replicas.bind_address(None, "http://192.0.2.9:29510")
    assert ei.value.key == "fault_tolerance.replicated.bind"
    assert "(loopback)" in str(ei.value) and "http://192.0.2.9:29510" in str(ei.value)


def test_bind_that_does_not_resolve_names_the_key():
    with pytest.raises(ConfigError) as ei:
        replicas.bind_address("no-such-host.invalid", "http://127.0.0.1:29510")
    assert ei.value.key == "fault_tolerance.replicated.bind" and "no-such-host.invalid" in str(ei.value)


def test_a_replica_group_spanning_nodes_is_refused_naming_the_mode():
    replicas.check_one_node(4, {"LOCAL_WORLD_SIZE": "4"})  # one node of 4 processes
    replicas.check_one_node(1, {})  # a plain process
    with pytest.raises(ConfigError) as ei:
        replicas.check_one_node(8, {"LOCAL_WORLD_SIZE": "4"})  # 2 nodes of 4
    assert ei.value.key == "fault_tolerance.mode" and "one node per replica group" in str(ei.value)


def test_bind_on_an_address_this_machine_does_not_hold_names_the_key():
    """A typo'd bind (here a documentation address, TEST-NET-1) is a config error at start, not a traceback
    from whichever server tries to listen on it first."""
    with pytest.raises(ConfigError) as ei:
        replicas.bind_address("192.0.2.77", "http://127.0.0.1:29510")
    assert ei.value.key == "fault_tolerance.replicated.bind" and "192.0.2.77" in str(ei.value)
    assert "cannot listen on" in str(ei.value)


def test_importing_replicated_mode_leaves_rust_log_alone(monkeypatch):
    """RUST_LOG=warn is torchft's default only while torchft is imported for training: neither importing
    imgtrain's replicated mode nor that import leaves it in the environment children inherit."""
    import importlib

    monkeypatch.delenv("RUST_LOG", raising=False)
    importlib.reload(replicas)
    replicas._import_torchft()
    assert "RUST_LOG" not in os.environ
    monkeypatch.setenv("RUST_LOG", "info")
    replicas._import_torchft()
    assert os.environ["RUST_LOG"] == "info"  # the user's own value stays


def test_an_advertised_address_is_where_the_gradient_groups_gloo_listens(monkeypatch):
    """The Gloo device of the group torchft reconfigures for each quorum is built on the advertised address
    (127.0.0.2: neither the host name nor any interface's first address is it), and the environment, which
    every child inherits, is left as it was. GLOO_SOCKET_IFNAME set by the user wins; an address that is not
    this host's exits 2 naming the key."""
    import threading
    from datetime import timedelta

    import psutil
    import torch.distributed as dist

    from imgtrain.internals.torchft import MembersGloo

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    environ = dict(os.environ)
    assert replicas._gloo_address(None) is None  # Gloo's default device: the host name's address
    assert replicas._gloo_address("127.0.0.2", {"GLOO_SOCKET_IFNAME": "eth7"}) is None  # the user's interface
    assert replicas._gloo_address("[::1]") == "::1"
    address = replicas._gloo_address("127.0.0.2")
    assert address == "127.0.0.2"

    def listening() -> set:
        return {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    before = listening()
    pgs = [MembersGloo(timeout=timedelta(seconds=30), address=address) for _ in range(2)]
    joins = [
        threading.Thread(target=pg.configure, args=(f"127.0.0.1:{store.port}/q1", f"imgtrain_g{r}", r, 2))
        for r, pg in enumerate(pgs)
    ]
    for t in joins:
        t.start()
    for t in joins:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in joins), "the two ranks did not connect"
    new = listening() - before
    assert new and {a.ip for a in new} == {"127.0.0.2"}, new
    tensors = [torch.full((3,), float(r + 1)) for r in range(2)]
    works = [pg.allreduce([t], dist.ReduceOp.SUM) for pg, t in zip(pgs, tensors, strict=True)]
    for w in works:
        w.wait()
    assert all(t.tolist() == [3.0] * 3 for t in tensors)
    assert dict(os.environ) == environ
    with pytest.raises(ConfigError) as ei:
        replicas._gloo_address("203.0.113.1")  # TEST-NET-3: no host has it
    assert ei.value.key == "fault_tolerance.replicated.advertise_address" and "interfaces" in str(ei.value)


def test_the_checkpoint_server_advertises_the_given_address():
    from datetime import timedelta
    from urllib.parse import urlsplit

    from imgtrain.internals.torchft import WeightsOnlyHTTPTransport

    for advertise, host in (("10.0.0.7", "10.0.0.7"), ("fd00::7", "[fd00::7]")):
        t = WeightsOnlyHTTPTransport(
            timeout=timedelta(seconds=5), num_chunks=0, host="127.0.0.1", advertise=advertise
        )
        try:
            port = urlsplit(t.address()).port
            assert port and t.address() == f"http://{host}:{port}/checkpoint/"
        finally:
            t.shutdown(wait=False)


# A replica group of several processes: the group's share of a step is split again over its processes.


def _process_shares(
    policy: str, groups: int, processes: int, members: tuple[int, ...], gbatch: list[int]
) -> dict[tuple[int, int], list[int]]:
    return {
        (g, p): replicas.process_share(gbatch, policy, groups, g, members, members.index(g), p, processes)
        for g in members
        for p in range(processes)
    }


@pytest.mark.parametrize("size", [24, 23, 13, 5])  # a full global micro-batch of 3 groups x 2 x 4, short ones
@pytest.mark.parametrize("policy", ["redistribute", "drop"])
def test_groups_of_several_processes_train_every_sample_of_a_step_once(size, policy):
    gbatch = list(range(100, 100 + size))
    shares = _process_shares(policy, 3, 2, (0, 1, 2), gbatch)
    assert sorted(i for s in shares.values() for i in s) == gbatch
    assert max(map(len, shares.values())) - min(map(len, shares.values())) <= 1


def test_all_present_process_share_is_what_one_job_of_every_process_trains():
    """3 groups x 2 processes train, step by step, what ranks 0..5 of one 6-process job train: the global
    micro-batch is num_groups x processes x batch_size, and process p of group g is rank 2g + p of it."""
    for g in range(3):
        for p in range(2):
            plain = ShardedBatchSampler(60, 4, rank=2 * g + p, world_size=6, seed=1)
            shared = ShardedBatchSampler(60, 4, rank=0, world_size=6, seed=1)
            shared.share = lambda gb, g=g, p=p: replicas.process_share(gb, "drop", 3, g, (0, 1, 2), g, p, 2)
            assert [[r.index for r in refs] for refs, _ in plain.plan()] == [
                [r.index for r in refs] for refs, _ in shared.plan()
            ]


def test_redistribute_spreads_a_missing_groups_share_over_every_process_present():
    gbatch = list(range(24))  # 3 groups x 2 processes x 4
    shares = _process_shares("redistribute", 3, 2, (0, 2), gbatch)
    assert sorted(i for s in shares.values() for i in s) == gbatch
    assert {len(s) for s in shares.values()} == {6}  # each of the 4 processes present trains 6, not 4
    assert replicas.trained_count(24, "redistribute", 3, (0, 2)) == 24


def test_drop_skips_a_missing_groups_share_whatever_its_processes():
    gbatch = list(range(24))
    shares = _process_shares("drop", 3, 2, (0, 2), gbatch)
    assert shares == {
        (0, 0): [0, 1, 2, 3],
        (0, 1): [4, 5, 6, 7],
        (2, 0): [16, 17, 18, 19],
        (2, 1): [20, 21, 22, 23],
    }
    assert replicas.trained_count(24, "drop", 3, (0, 2)) == 16  # the gradient's denominator


def test_quorum_members_and_sizes_come_back_from_the_replica_ids_in_torchfts_order(monkeypatch):
    """torchft hands each process of group g the members as global ranks (each member's replica id's trailing
    digits x g's process count + the process's rank in g), in the order of the replica ids as strings, and
    g's position there; the group ids and process counts come back from them, order kept."""
    from datetime import timedelta

    from torchft import ProcessGroupGloo
    from torchft.manager import extract_trailing_digits

    from imgtrain.internals.torchft import MembersGloo, replica_id

    monkeypatch.setattr(ProcessGroupGloo, "configure", lambda self, *a, **k: None)  # no Gloo group built
    pg = MembersGloo(timeout=timedelta(seconds=1))
    ids = sorted(
        f"{replica_id(g, n)}:{u}" for g, n, u in [(2, 2, "a"), (0, 2, "b"), (10, 1, "c"), (2, 2, "d")]
    )
    ranks = [extract_trailing_digits(i.split(":")[0]) * 2 + 1 for i in ids]  # rank 1 of a group of 2
    pg.configure("store", ids[1], 1, len(ids), 7, 1, 2, ranks)
    assert pg.quorum.groups == (0, 2, 2, 10)  # the numeric order, a group id used twice kept twice
    assert pg.quorum.sizes == (2, 2, 2, 1)
    assert (pg.quorum.rank, pg.quorum.quorum_id) == (1, 7)


# Replicas against torchft's quorum semantics without processes: a fake Manager forms each quorum as torchft
# 0.2.0 does (the Rust side sorts the members by replica id, a string, each with a per-start uuid; the
# Python side configures the process group with this group's position and the members' trailing digits,
# and answers participating_rank() and num_participants() from the same quorum). The process group is
# imgtrain's MembersGloo, without its Gloo group.


class _Lighthouse:
    def __init__(self):
        self.ids: list[str] = []  # the live members' replica ids
        self.starts: dict[str, str] = {}  # a group's replica id -> its current start's (rank 0's, uuid added)
        self.quorum_id = 0
        self._last: list[str] | None = None
        self.failed_vote = False

    def quorum(self) -> tuple[int, list[str]]:
        """The members, sorted as strings, and an id that changes with them or after a failed vote."""
        ids = sorted(self.ids)
        if ids != self._last or self.failed_vote:
            self.quorum_id, self._last, self.failed_vote = self.quorum_id + 1, ids, False
        return self.quorum_id, ids

    def restart(self) -> None:
        """Killed and started again: it counts quorum ids from 1 again."""
        self.quorum_id, self._last = 0, None

    def start(self, replica_id: str, rank: int) -> str:
        if rank == 0:
            self.starts[replica_id] = f"{replica_id}:{uuid.uuid4()}"
            self.ids.append(self.starts[replica_id])
        return self.starts[replica_id]


class _Manager:
    def __init__(self, lighthouse, pg, replica_id, rank, world_size, load_state_dict, state_dict, **_):
        self.lighthouse, self.pg, self.group_rank, self.group_world_size = lighthouse, pg, rank, world_size
        self.load_state_dict, self.state_dict = load_state_dict, state_dict
        self.replica_id = lighthouse.start(replica_id, rank)
        self.quorum_id = -1
        self.commit = True
        self.error: Exception | None = None
        self.heal_from: dict | None = None  # a peer's state to load at the next quorum
        self.serve = False  # a peer heals from this group at the next quorum

    def start_quorum(self):
        from torchft.manager import extract_trailing_digits

        self.error = None
        quorum_id, ids = self.lighthouse.quorum()
        self.rank, self.size = ids.index(self.replica_id), len(ids)
        if quorum_id != self.quorum_id:  # the process group is configured again
            self.quorum_id = quorum_id
            g, n = self.group_rank, self.group_world_size
            ranks = [extract_trailing_digits(i.split(":")[0]) * n + g for i in ids]
            self.pg.configure("store", self.replica_id, self.rank, self.size, quorum_id, g, n, ranks)
        if self.serve:
            self.state_dict()
        if self.heal_from is not None:
            self.load_state_dict(self.heal_from)
        self.serve, self.heal_from = False, None

    def participating_rank(self):
        return self.rank

    def num_participants(self):
        return self.size

    def should_commit(self):
        vote = self.commit and self.error is None
        self.lighthouse.failed_vote |= not vote
        return vote

    def report_error(self, e: Exception) -> None:
        self.error = e

    def errored(self):
        return self.error

    def current_step(self):
        return 3


@pytest.fixture
def replica_groups(monkeypatch):
    """``start(group, num_groups, processes=1, process=0, *overrides)``: a Replicas on the fake Manager;
    ``records`` holds what each emitted."""
    from imgtrain.distributed.process_group import DistInfo
    from imgtrain.internals import torchft as torchft_internals

    lighthouse = _Lighthouse()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torchft_internals, "manager_on", lambda host, **kw: _Manager(lighthouse, **kw))
    monkeypatch.setattr(torchft_internals, "WeightsOnlyHTTPTransport", lambda **kw: None)
    monkeypatch.setattr(replicas, "tcp_store_on", lambda *a, **k: (types.SimpleNamespace(port=1), None))
    monkeypatch.setattr(torchft_internals.ProcessGroupGloo, "configure", lambda self, *a, **k: None)
    records: dict[tuple[int, int, int], list[dict]] = {}

    def start(group: int, num_groups: int, processes: int = 1, process: int = 0, *overrides: str):
        cfg = load_config(
            None,
            [
                *REPLICATED,
                "fault_tolerance.replicated.lighthouse=http://127.0.0.1:29510",
                "fault_tolerance.replicated.bind=127.0.0.1",
                f"fault_tolerance.replicated.group_id={group}",
                f"fault_tolerance.replicated.num_groups={num_groups}",
                *overrides,
            ],
        )
        info = DistInfo(process, process, processes, torch.device("cpu"), None, "local", 0)
        out = records.setdefault((group, process, len(records)), [])
        model = {"w": torch.arange(4.0)}
        return replicas.Replicas(cfg, info, lambda: {"model": model}, lambda s: None, out.append)

    start.records = records
    start.lighthouse = lighthouse
    return start


def test_eleven_or_more_groups_train_what_the_ranks_of_one_job_train(replica_groups):
    """12 groups of 2 processes: torchft orders members by replica id as a string ("g10" before "g2" unless
    the ids are padded); process p of group g must still train rank 2g + p's samples, and every process
    divides by the 12 groups torchft divides by."""
    procs = {(g, p): replica_groups(g, 12, 2, p) for g in range(12) for p in range(2)}
    for (g, p), r in procs.items():
        assert r.plan_holds() is False  # a new quorum: the plan is made after it
        assert r.participants == r.manager.num_participants() == 12
        assert r.members == tuple(range(12))
        plain = ShardedBatchSampler(24 * 2 * 3, 2, rank=2 * g + p, world_size=24, seed=1)
        shared = ShardedBatchSampler(24 * 2 * 3, 2, rank=0, world_size=1, seed=1)
        r.attach(shared)
        assert (shared.rank, shared.world_size) == (2 * g + p, 24)
        assert [[s.index for s in refs] for refs, _ in shared.plan()] == [
            [s.index for s in refs] for refs, _ in plain.plan()
        ], (g, p)


def test_two_groups_under_one_id_count_twice_and_the_one_that_joined_stops_naming_the_key(replica_groups):
    g0, g1 = replica_groups(0, 2), replica_groups(1, 2)
    for r in (g0, g1):
        r.plan_holds()
    for r in (g0, g1):
        assert r.should_commit()
    twin = replica_groups(1, 2)  # started by mistake under the id of a live group
    gbatch = list(range(12))
    shares = []
    for r in (g0, g1, twin):
        r.plan_holds()
        # torchft averages over 3 participants: the loss scale and the split of the batch count 3 too.
        assert r.participants == r.manager.num_participants() == 3
        shares.append(replicas.process_share(gbatch, r.policy, 2, r.group_id, r.members, r.rank, 0, 1))
    assert sorted(i for s in shares for i in s) == gbatch  # disjoint: each sample trained once
    assert g0.should_commit() and g1.should_commit()  # the groups that were training go on
    with pytest.raises(
        ConfigError, match=r"'fault_tolerance\.replicated\.group_id': got 1, .*REPLICA_GROUP_ID"
    ):
        twin.should_commit()


def test_a_dead_group_still_in_a_quorum_under_the_id_of_its_restart_is_no_twin(replica_groups):
    """A killed group's replica id can still be in the quorum its restart joins (it asked for the quorum
    before it died): that step cannot commit, and the restart is not taken for a second group."""
    g0, g1 = replica_groups(0, 2), replica_groups(1, 2)
    for r in (g0, g1):
        r.plan_holds()
        r.should_commit()
    restarted = replica_groups(1, 2)  # g1 died; the lighthouse still counts it for one quorum
    for r in (g0, restarted):
        r.plan_holds()
        r.manager.commit = False  # the dead member never joins the all-reduce
        assert not r.should_commit()
    replica_groups.lighthouse.ids.remove(g1.manager.replica_id)  # its heartbeats expired
    for r in (g0, restarted):
        r.plan_holds()
        r.manager.commit = True
        assert r.members == (0, 1) and r.should_commit()


def test_a_quorum_under_a_reused_id_with_other_members_is_not_committed_and_the_next_one_is(replica_groups):
    """torchft configures its process group only when the quorum id changes; a restarted lighthouse counts
    from 1 again, so group 0 can get a quorum of itself alone under the id of its last quorum of two. torchft
    would divide by 1 while the members its group holds say 2: that step is dropped, not committed, and the
    next quorum (a new id after the failed vote) is set up afresh."""
    g0, g1 = replica_groups(0, 2), replica_groups(1, 2)
    for r in (g0, g1):
        r.plan_holds()
    assert g0.should_commit() and g0.quorum_id == 1
    replica_groups.lighthouse.restart()
    replica_groups.lighthouse.ids.remove(g1.manager.replica_id)  # not back yet
    g0.plan_holds()
    assert g0.manager.num_participants() == 1 and g0.members == (0, 1)  # the old group's members
    assert not g0.should_commit()
    g0.plan_holds()
    assert (g0.members, g0.participants, g0.quorum_id) == ((0,), 1, 2)
    assert g0.should_commit()


def test_groups_of_different_sizes_starting_together_are_refused_naming_the_process_count(replica_groups):
    starting = [replica_groups(0, 2, 1, 0), replica_groups(1, 2, 2, 0), replica_groups(1, 2, 2, 1)]
    for r in starting:  # no heal compares them: they start from the same step
        with pytest.raises(ConfigError, match=r"'--nproc-per-node': got [12], expected [12] \(replica group"):
            r.plan_holds()


def test_a_group_of_another_size_joining_stops_itself_and_the_training_group_goes_on(replica_groups):
    g0 = replica_groups(0, 2)
    g0.plan_holds()
    assert g0.should_commit()
    newcomer = [replica_groups(1, 2, 2, p) for p in range(2)]
    g0.plan_holds()  # a quorum with a group of 2 processes: not g0's to refuse
    for r in newcomer:
        with pytest.raises(ConfigError, match=r"'--nproc-per-node': got 2, expected 1 "):
            r.plan_holds()


@pytest.mark.parametrize("on", [False, True])
def test_heal_records_carry_a_state_digest_only_when_asked(replica_groups, on):
    extra = [f"fault_tolerance.replicated.state_digest={str(on).lower()}"]
    g0, g1 = replica_groups(0, 2, 1, 0, *extra), replica_groups(1, 2, 1, 0, *extra)
    g0.manager.serve, g1.manager.heal_from = True, {"model": {"w": torch.arange(4.0)}}
    for r in (g0, g1):
        r.plan_holds()
    (served,), (healed,) = (
        [x for x in recs if x["event"] in ("heal", "heal_served")] for recs in replica_groups.records.values()
    )
    assert (served["event"], healed["event"]) == ("heal_served", "heal")
    if on:
        assert served["state_digest"] == healed["state_digest"]
    else:
        assert "state_digest" not in served and "state_digest" not in healed


def test_state_digest_survives_the_transfer_and_sees_one_changed_value(tmp_path):
    state = {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(2)},
        "rng": {"torch": torch.ByteTensor([1, 2, 3]), "python": (3, (1, 2), None)},
        "progress": {"step": 7, "epoch": 1},
    }
    torch.save(state, tmp_path / "s.pt")
    received = torch.load(tmp_path / "s.pt", weights_only=True)
    assert replicas.state_digest(received) == replicas.state_digest(state)
    received["model"]["w"][1, 2] += 1e-6
    assert replicas.state_digest(received) != replicas.state_digest(state)
