"""Byte sizes as people type them on the command line (``--shard-size``, ``--memory-limit``)."""

from __future__ import annotations

import re

# A number (decimal point and exponent allowed), then an optional unit: k/m/g/t are powers of 1000, with an
# "i" powers of 1024; a trailing "b" changes nothing; any case.
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?(?:e\d+)?|\.\d+(?:e\d+)?)\s*(?:([kmgt])(i?))?b?\s*", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """'500MB' -> 500_000_000, '1GiB' -> 2**30, '3e9' -> 3_000_000_000; a bare number is bytes. A ValueError
    naming ``what`` and the text otherwise."""
    m = _SIZE_RE.fullmatch(str(text))
    if not m:
        raise ValueError(f"not a {what}: {text!r} (examples: 500MB, 1GiB, 1500MiB, 3e9, 200000)")
    number, prefix, binary = m.groups()
    power = " kmgt".index(prefix.lower()) if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)
