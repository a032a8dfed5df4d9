"""imgtrain.tools.find_batch_size.search: grow by doubling, then bisect; halve down when the start does not fit."""

from __future__ import annotations

import pytest

from imgtrain.tools.find_batch_size import ProbeResult, search
from imgtrain.units import parse_size


def _limit(fits_up_to: int):
    tried: list[int] = []

    def probe(b: int) -> ProbeResult:
        tried.append(b)
        return ProbeResult(b, b <= fits_up_to, images_per_s=float(b) if b <= fits_up_to else None)

    return probe, tried


def test_doubles_then_bisects_to_the_tolerance():
    probe, tried = _limit(100)
    largest, probes = search(probe, start=8, max_batch=4096, tolerance=0.0)
    assert largest == 100
    assert tried[:5] == [8, 16, 32, 64, 128]  # doubling until the first failure
    assert all(b <= 128 for b in tried[5:])  # then bisection between 64 and 128
    assert len(probes) == len(tried)


def test_coarse_tolerance_stops_early_and_max_batch_caps_the_growth():
    probe, tried = _limit(100)
    largest, _ = search(probe, start=8, max_batch=4096, tolerance=0.5)
    assert 64 <= largest <= 100 and len(tried) <= 7
    probe, tried = _limit(10_000)
    assert search(probe, start=8, max_batch=48, tolerance=0.1)[0] == 48 and tried == [8, 16, 32, 48]


def test_start_too_large_halves_down_and_nothing_fits_returns_zero():
    probe, tried = _limit(20)
    assert search(probe, start=256, max_batch=4096, tolerance=0.0)[0] == 20
    assert tried[:5] == [256, 128, 64, 32, 16]
    probe, _ = _limit(0)
    assert search(probe, start=4, max_batch=4096, tolerance=0.1)[0] == 0


def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1500MB") == 1_500_000_000
    assert parse_size("123") == 123
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size("lots", "memory size")
