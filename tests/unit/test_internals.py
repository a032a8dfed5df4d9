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
