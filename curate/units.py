"""Units written in recipes, parsed in one place: byte sizes (`1000`, `"512MB"`, `"1GiB"`).

A leaf module (it imports nothing from the project), so the recipe schema and the stage configs
that validate sizes both use it without importing each other.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    """`1000`, `"512MB"`, `"1GiB"` -> bytes (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB, any
    case); ValueError naming the value otherwise."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"expected a byte size like 1000, '512MB' or '1GiB', got {value!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])
