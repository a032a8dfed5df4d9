"""One size parser for `imgtrain prepare --shard-size` and `imgtrain find-batch-size --memory-limit`."""

import pytest

from imgtrain.units import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        # what --shard-size has always taken
        ("500MB", 500 * 10**6),
        ("1GiB", 2**30),
        ("4096", 4096),
        ("1.5k", 1500),
        ("2t", 2 * 10**12),
        ("64kib", 64 * 1024),
        ("3 mi", 3 * 2**20),
        ("  10b ", 10),
        # what --memory-limit has always taken
        ("2GiB", 2 * 2**30),
        ("1500MB", 1_500_000_000),
        ("3e9", 3 * 10**9),
        ("4TiB", 4 * 2**40),
        ("1tb", 10**12),
        (".5GB", 5 * 10**8),
        ("123", 123),
    ],
)
def test_both_grammars_parse_to_the_same_bytes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "", "5 GB extra", "-1GB", "1.2.3", "5xb", "GiB", "1e"])
def test_anything_else_is_a_value_error_naming_the_text(text):
    with pytest.raises(ValueError, match=f"not a memory size: {text!r}"):
        parse_size(text, "memory size")
