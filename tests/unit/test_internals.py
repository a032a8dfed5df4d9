"""Canaries for the private torch symbols imgtrain uses (src/imgtrain/internals/): when an upgrade
changes one, the failure names it, instead of surfacing as a wrong byte count or a hung worker later."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from imgtrain.internals import dataloader, powersgd


def _canary(module, call):
    try:
        return call()
    except (AttributeError, TypeError, IndexError) as e:
        pytest.fail(
            f"private symbol changed: {module.PRIVATE_SYMBOL} ({type(e).__name__}: {e}); "
            f"update {module.__name__}"
        )


def test_powersgd_should_compress_matches_torchs_rule():
    # torch compresses when (rows + cols) * rank * min_rate < rows * cols
    assert _canary(powersgd, lambda: powersgd.should_compress(512, 512, 1, 2.0)) is True
    assert _canary(powersgd, lambda: powersgd.should_compress(2, 2, 2, 2.0)) is False


def test_dataloader_workers_stop_on_request():
    loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=2, num_workers=1, persistent_workers=True)
    next(iter(loader))
    workers = list(loader._iterator._workers)
    assert all(w.is_alive() for w in workers)
    _canary(dataloader, lambda: dataloader.shutdown_workers(loader))
    assert loader._iterator is None
    assert not any(w.is_alive() for w in workers)


def test_torchft_hook_survives_a_peer_dying_inside_the_allreduce():
    """torchft 0.2.0's own hook asserts on a future that a failed all-reduce never sets (the survivor
    died with the dead peer); ours completes the bucket and leaves the discarding to the commit vote."""
    torchft_internals = pytest.importorskip("imgtrain.internals.torchft", reason="torchft not installed")
    import torchft.ddp

    # The override replaces torchft's hook only while torchft registers it under this name.
    assert (
        _canary(torchft_internals, lambda: vars(torchft.ddp.DistributedDataParallel)["_comm_hook"])
        is not None
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
    assert hasattr(_canary(torchft_internals, lambda: manager._ManagedFuture(weakref.ref(holder))), "_fut")
    # MembersGloo reads replica group ids from the quorum's global ranks: replica id "imgtrain_g<id>".
    assert _canary(torchft_internals, lambda: manager.extract_trailing_digits("imgtrain_g12")) == 12
    http = __import__("torchft.checkpointing.http_transport", fromlist=["HTTPTransport"])
    assert isinstance(
        _canary(torchft_internals, lambda: vars(http.HTTPTransport)["_load_from_address"]), classmethod
    )
