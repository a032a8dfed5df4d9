"""Canaries for the private torch and Python symbols imgtrain uses (src/imgtrain/internals/): when an
upgrade changes one, the failure names it, instead of surfacing as a wrong byte count or a hung worker
later."""

from __future__ import annotations

import os

import psutil
import pytest
import torch
import torch.distributed.run
from torch.utils.data import DataLoader, TensorDataset

from imgtrain.internals import checkpoint_wrapper, dataloader, powersgd, shared_memory, torchrun

from conftest import canary, private_symbol_changed


def test_powersgd_should_compress_matches_torchs_rule():
    # torch compresses when (rows + cols) * rank * min_rate < rows * cols
    assert canary(powersgd, lambda: powersgd.should_compress(512, 512, 1, 2.0)) is True
    assert canary(powersgd, lambda: powersgd.should_compress(2, 2, 2, 2.0)) is False


def test_dataloader_workers_stop_on_request():
    loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, num_workers=1, persistent_workers=True)
    it = iter(loader)
    next(it)
    pids = canary(dataloader, lambda: dataloader.worker_pids(it))
    assert len(pids) == 1 and psutil.Process(pids[0]).ppid() == os.getpid()
    canary(dataloader, lambda: dataloader.shutdown_workers(loader))
    assert loader._iterator is None
    assert not psutil.pid_exists(pids[0])


class _Launched(Exception):
    """Raised where torch's run() would build the launch config: the arguments it rewrote, nothing launched."""


@pytest.mark.parametrize(
    "line",
    [
        ["--standalone", "--nproc-per-node=2"],
        ["--nnodes=1"],  # static, one node, no endpoint: a local c10d rendezvous
        ["--nnodes=2", "--node-rank=1", "--master-addr=head"],  # static across nodes: kept
        ["--nnodes=1", "--master-port=29999"],
        ["--nnodes=1:4", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=job7"],
    ],
)
def test_torchrun_arguments_are_rewritten_as_torchs_run_does(line, tmp_path, monkeypatch):
    argv = [f"--log-dir={tmp_path}", *line, "-m", "not_a_module_imgtrain_runs"]

    def stop(args):
        raise _Launched(vars(args))

    monkeypatch.setattr(torch.distributed.run, "config_from_args", stop)
    monkeypatch.setattr(torch.distributed.run, "elastic_launch", stop)  # never launch, whatever run() does
    monkeypatch.setattr(torch.multiprocessing, "_set_thread_name", lambda name: None, raising=False)
    with pytest.raises(_Launched) as seen:
        torch.distributed.run.run(torch.distributed.run.parse_args(argv))
    theirs = seen.value.args[0]
    ours = torch.distributed.run.parse_args(argv)
    canary(torchrun, lambda: torchrun.rewrite_as_run_does(ours))
    ours = vars(ours)
    if line[0] == "--standalone" or line == ["--nnodes=1"]:  # a fresh uuid4 on each side
        assert len(theirs["rdzv_id"]) == len(ours["rdzv_id"]) == 36
        theirs["rdzv_id"] = ours["rdzv_id"]
    differ = {
        k: (theirs.get(k), ours.get(k)) for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k)
    }
    assert not differ, private_symbol_changed(torchrun, f"torch's run() / ours differ: {differ}")


def test_checkpointed_block_keeps_its_state_dict_keys_and_gradients():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    plain_keys = list(block.state_dict())
    x = torch.randn(3, 4)
    block(x).sum().backward()
    expected = [p.grad.clone() for p in block.parameters()]
    block.zero_grad()
    wrapped = canary(checkpoint_wrapper, lambda: checkpoint_wrapper.checkpointed(block))
    assert list(wrapped.state_dict()) == plain_keys, private_symbol_changed(
        checkpoint_wrapper, "state_dict keys carry a prefix"
    )
    wrapped(x).sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(block.parameters(), expected, strict=True))


def test_shared_bytes_are_shared_memory_of_that_size():
    flat = canary(shared_memory, lambda: shared_memory.shared_bytes(24))
    assert flat.dtype == torch.uint8 and flat.numel() == 24
    assert flat.is_shared(), private_symbol_changed(shared_memory, "the storage is not in shared memory")
    flat[8:16].view(torch.long)[0] = 7  # the 8-byte views a batch takes of it
    assert flat[8:16].view(torch.long).item() == 7


def test_torchft_hook_survives_a_peer_dying_inside_the_allreduce():
    """torchft 0.2.0's own hook asserts on a future that a failed all-reduce never sets (the survivor
    died with the dead peer); ours completes the bucket and leaves the discarding to the commit vote."""
    torchft_internals = pytest.importorskip("imgtrain.internals.torchft", reason="torchft not installed")
    import torchft.ddp

    # The override replaces torchft's hook only while torchft registers it under this name.
    assert (
        canary(torchft_internals, lambda: vars(torchft.ddp.DistributedDataParallel)["_comm_hook"]) is not None
    )
    assert "self._comm_hook" in __import__("inspect").getsource(torchft.ddp.DistributedDataParallel.__init__)

    import weakref

    from torchft.manager import _ManagedFuture

    class FailedWork:  # what Manager.allreduce hands back after the peer's socket closed mid all-reduce
        def wait(self):
            return False

        def get_future(self):  # its future was never set up: torchft's hook asserts on fut._fut
            return _ManagedFuture(weakref.ref(self))

    class Manager:
        def allreduce(self, tensor):
            return FailedWork()

    model = torch.nn.Linear(3, 2)
    ddp = torchft_internals.FaultTolerantDDP(Manager(), model)
    ddp(torch.ones(4, 3)).sum().backward()  # torchft's own hook: AssertionError out of backward()
    assert model.weight.grad is not None


def test_torchft_private_symbols_the_adapter_reads():
    torchft_internals = pytest.importorskip("imgtrain.internals.torchft", reason="torchft not installed")
    import weakref

    from torchft import manager

    holder = type("Holder", (), {})()
    assert hasattr(canary(torchft_internals, lambda: manager._ManagedFuture(weakref.ref(holder))), "_fut")
    # MembersGloo reads each member's group id and process count from the quorum's global ranks: the
    # trailing digits of its replica id, without the uuid torchft appends after a colon.
    rid = torchft_internals.replica_id(12, 2)
    assert canary(torchft_internals, lambda: manager.extract_trailing_digits(rid)) == 12 * 10**6 + 2
    assert 'extract_trailing_digits(replica_id.split(":")[0])' in __import__("inspect").getsource(
        manager.Manager._async_quorum
    ), private_symbol_changed(torchft_internals, "Manager._async_quorum no longer builds global_ranks so")
    http = __import__("torchft.checkpointing.http_transport", fromlist=["HTTPTransport"])
    assert isinstance(
        canary(torchft_internals, lambda: vars(http.HTTPTransport)["_load_from_address"]), classmethod
    )


def test_torchft_gloo_group_is_built_as_members_gloo_mirrors_it():
    """MembersGloo._create_pg (the Gloo backend on the advertised address) repeats the rest of torchft's
    ``ProcessGroupGloo._create_pg``; what it builds is tested in test_replicated_config.py. A change to
    torchft's (a new step, another way to build the backend) fails here until the override follows it."""
    torchft_internals = pytest.importorskip("imgtrain.internals.torchft", reason="torchft not installed")
    import hashlib
    import inspect
    import textwrap

    from torchft.process_group import ProcessGroupGloo, ProcessGroupWrapper

    configure = canary(torchft_internals, lambda: inspect.getsource(ProcessGroupWrapper.configure))
    assert "self._pg = self._create_pg(store, rank, world_size)" in configure, private_symbol_changed(
        torchft_internals, "ProcessGroupWrapper.configure no longer builds its group with _create_pg"
    )
    source = textwrap.dedent(
        canary(torchft_internals, lambda: inspect.getsource(ProcessGroupGloo._create_pg))
    )
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == "6b661f9f3f1e09e3", private_symbol_changed(
        torchft_internals, f"ProcessGroupGloo._create_pg is now:\n{source}"
    )


def test_torchft_servers_listen_on_the_one_address_given():
    """torchft 0.2.0 binds its manager and checkpoint servers to every interface; through the adapter both
    listen on the address given (torchft looks the server classes up by name while it builds them)."""
    torchft_internals = pytest.importorskip("imgtrain.internals.torchft", reason="torchft not installed")
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import ProcessGroupGloo
    from torchft.coordination import LighthouseServer

    def listening() -> set:
        return {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    before = listening()
    transport = canary(
        torchft_internals,
        lambda: torchft_internals.WeightsOnlyHTTPTransport(timedelta(seconds=5), 0, host="127.0.0.1"),
    )
    manager = canary(
        torchft_internals,
        lambda: torchft_internals.manager_on(
            "127.0.0.1",
            pg=ProcessGroupGloo(),
            load_state_dict=None,
            state_dict=None,
            min_replica_size=1,
            rank=0,
            world_size=1,
            store_addr="127.0.0.1",
            store_port=store.port,
            lighthouse_addr=lighthouse.address(),
            replica_id="canary_g0",
            checkpoint_transport=transport,
            connect_timeout=timedelta(seconds=10),
        ),
    )
    try:
        new = listening() - before
        assert len(new) == 2, private_symbol_changed(torchft_internals, f"servers started: {new}")
        assert {a.ip for a in new} == {"127.0.0.1"}, private_symbol_changed(
            torchft_internals, f"a server does not listen on the address given: {new}"
        )
    finally:
        manager.shutdown(wait=False)
        lighthouse.shutdown()


def test_a_restarted_groups_stale_manager_address_is_removed_and_the_client_closed(monkeypatch):
    """torchft's Manager of a rank other than 0 reads its group's manager server address from the group's
    store (MANAGER_ADDR_KEY, REPLICA_ID_KEY); a restarted group's rank 0 removes the dead one's keys first,
    through a store client that is closed once it is done, even when the removal fails."""
    torchft_internals = pytest.importorskip("imgtrain.internals.torchft", reason="torchft not installed")
    import torch.distributed as dist
    from torchft import manager

    keys = [canary(torchft_internals, lambda: manager.MANAGER_ADDR_KEY), manager.REPLICA_ID_KEY]
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def clients() -> int:  # this process's connections to the store
        tcp = psutil.Process().net_connections("tcp")
        return sum(1 for c in tcp if c.raddr and c.raddr.port == store.port)

    before = clients()
    for key in keys:
        store.set(key, "http://dead-peer:1")
    torchft_internals.forget_manager_address("127.0.0.1", store.port)
    assert not store.check(keys[:1]) and not store.check(keys[1:])
    assert clients() == before

    class Failing(dist.TCPStore):  # the connection breaks after it was made
        def delete_key(self, key):
            del self  # fails as torch's C++ method does: with no frame of its own that holds the store
            raise RuntimeError("connection reset by peer")

    monkeypatch.setattr(dist, "TCPStore", Failing)
    with pytest.raises(RuntimeError, match="connection reset") as failure:
        torchft_internals.forget_manager_address("127.0.0.1", store.port)
    assert failure.tb is not None and clients() == before  # the error's traceback holds the call's frame
