"""Byte counts in words, for messages: the one definition used by every module (imports
nothing heavy, so the copy path can use it freely)."""

from __future__ import annotations

from typing import Final

__all__ = ["format_size"]

_UNITS: Final = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(n: int) -> str:
    """Return N bytes in a short human form for messages: ``"512 B"``, ``"1.5 MiB"``, ``"2.0 GiB"``.

    Below 1 KiB the exact byte count is shown; above, one decimal of the largest binary unit that
    fits, rounded half up. The text is for people, not for parsing back. Raises ValueError when N
    is not an int.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"size must be an int, not {type(n).__name__}")
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n < 1024:
        return f"{sign}{n} B"
    power = min((n.bit_length() - 1) // 10, len(_UNITS))
    tenths = (n * 20 // (1 << (10 * power)) + 1) // 2  # round(n * 10 / 1024**power), half up
    if tenths >= 10240 and power < len(_UNITS):
        power += 1
        tenths = (n * 20 // (1 << (10 * power)) + 1) // 2
    return f"{sign}{tenths // 10}.{tenths % 10} {_UNITS[power - 1]}"
