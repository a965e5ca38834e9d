"""Byte sizes written by people ("20GiB", "512 MB") and the block counts they turn into."""

from __future__ import annotations

import math
import re

from tierkv.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_nbytes(value: str | int | float, what: str = "size") -> int:
    """Bytes from an int or a string such as "20GiB", "1.5 GB", "4096"."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a byte size such as '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{what}: byte size must be a finite number >= 0, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}: cannot read {value!r} as a byte size; write it like '512MiB', '20GiB' or '1.5GB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_nbytes(nbytes: float) -> str:
    """Short human form: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
