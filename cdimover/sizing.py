"""Exact size arithmetic: CDI's filesystem-overhead formulas and Kubernetes resource quantities.

CDI reserves a fraction of every Filesystem-mode volume for the filesystem's own metadata
(``filesystemOverhead``, default ``"0.06"``, configurable per storage class). Its controllers and
pods compute, in float64 (kubevirt/containerized-data-importer, ``pkg/util/util.go``)::

    usable   = RoundDown(ceil(available / (1 + overhead)), 1 MiB)      GetUsableSpace
    required = ceil(RoundUp(size, 1 MiB) * (1 + overhead))             GetRequiredSpace

This module computes the same formulas in exact rational arithmetic: the overhead is a
:class:`~fractions.Fraction` (a float ``0.06`` means exactly 6/100, via its shortest ``repr``),
and every result is an ``int``. No float takes part in any result.

:func:`parse_quantity` turns a Kubernetes quantity (``"10Gi"``, ``"1.5G"``, ``"1e9"``) into bytes,
rounding a fractional byte count up as ``resource.Quantity.Value()`` does.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction
from typing import Final, Union

from .units import format_size

__all__ = [
    "ALIGN",
    "DEFAULT_OVERHEAD",
    "MAX_QUANTITY",
    "Overhead",
    "parse_overhead",
    "usable_space",
    "required_space",
    "parse_quantity",
    "format_size",
]

ALIGN: Final = 1 << 20
"""CDI's ``DefaultAlignBlockSize``: disk images are aligned to 1 MiB."""

DEFAULT_OVERHEAD: Final = "0.06"
"""CDI's default ``filesystemOverhead`` (a string, as CDI stores it)."""

MAX_QUANTITY: Final = (1 << 63) - 1
"""The largest byte count :func:`parse_quantity` returns (Kubernetes' int64 ``Value()``)."""

Overhead = Union[float, str, Decimal, Fraction]
"""An overhead as a caller may give it: ``0.06``, ``"0.06"``, ``Decimal("0.06")``, ``Fraction(3, 50)``."""


def _ceil_div(num: int, den: int) -> int:
    return -(-num // den)


def _check_size(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def parse_overhead(overhead: Overhead) -> Fraction:
    """Return OVERHEAD as an exact fraction in [0, 1).

    A float is converted through its shortest decimal form (``Fraction(str(x))``), so ``0.06`` is
    exactly 6/100 rather than the binary double nearest to it. Strings take any form
    :class:`~fractions.Fraction` accepts (``"0.06"``, ``"3/50"``, ``"6e-2"``).

    Raises ValueError for a bool, NaN, an infinity, an unparsable string, or a value outside
    [0, 1). CDI's API documents the range as [0, 1) (``Percent`` in ``api/.../types.go``).
    """
    if isinstance(overhead, bool):
        raise ValueError("filesystem overhead must be a number, not bool")
    try:
        if isinstance(overhead, Fraction):
            value = overhead
        elif isinstance(overhead, (int, float)):
            value = Fraction(str(overhead))
        elif isinstance(overhead, (str, Decimal)):
            value = Fraction(overhead)
        else:
            raise ValueError(
                f"filesystem overhead must be a float, str, Decimal or Fraction, "
                f"not {type(overhead).__name__}")
    except (ValueError, ZeroDivisionError, ArithmeticError) as e:
        raise ValueError(f"invalid filesystem overhead {overhead!r}: {e}") from None
    if not 0 <= value < 1:
        raise ValueError(f"filesystem overhead must be in [0, 1), got {overhead!r}")
    return value


def usable_space(available: int, overhead: Overhead = DEFAULT_OVERHEAD) -> int:
    """Bytes of a Filesystem volume of AVAILABLE bytes that an image may occupy.

    ``RoundDown(ceil(available / (1 + overhead)), 1 MiB)``, exactly. AVAILABLE is an int >= 0;
    OVERHEAD is as for :func:`parse_overhead`. Raises ValueError on invalid arguments.
    """
    available = _check_size(available, "available space")
    ratio = 1 + parse_overhead(overhead)
    unaligned = _ceil_div(available * ratio.denominator, ratio.numerator)
    return unaligned // ALIGN * ALIGN


def required_space(size: int, overhead: Overhead = DEFAULT_OVERHEAD) -> int:
    """Bytes a Filesystem volume must have to hold an image of SIZE bytes.

    ``ceil(RoundUp(size, 1 MiB) * (1 + overhead))``, exactly. SIZE is an int >= 0; OVERHEAD is as
    for :func:`parse_overhead`. Raises ValueError on invalid arguments.

    ``usable_space(required_space(s, o), o) >= s`` holds for every s and o.
    """
    size = _check_size(size, "size")
    ratio = 1 + parse_overhead(overhead)
    aligned = _ceil_div(size, ALIGN) * ALIGN
    return _ceil_div(aligned * ratio.numerator, ratio.denominator)


# Kubernetes' quantity grammar (k8s.io/apimachinery/pkg/api/resource/quantity.go):
#   <quantity> ::= <signedNumber><suffix>
#   <numeric>  ::= <digits> | <digits>.<digits> | <digits>. | .<digits>
#   <suffix>   ::= <binarySI> | <decimalExponent> | <decimalSI>
# Only ASCII digits; no whitespace anywhere.
_QUANTITY_RE: Final = re.compile(
    r"(?P<sign>[+-]?)"
    r"(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?"
    r"(?:(?P<bin>Ki|Mi|Gi|Ti|Pi|Ei)|[eE](?P<exp>[+-]?[0-9]+)|(?P<dec>[numkMGTPE]?))",
    re.ASCII)

_BINARY_SHIFT: Final = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_DECIMAL_EXP: Final = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12,
                       "P": 15, "E": 18}


def parse_quantity(q: str | int) -> int:
    """Return the Kubernetes resource quantity Q as a whole number of bytes.

    Accepts an int >= 0, or a string in Kubernetes' quantity syntax: a decimal number (``"1"``,
    ``"1.5"``, ``"1."``, ``".5"``) followed by nothing, a binary suffix (``Ki Mi Gi Ti Pi Ei``), a
    decimal suffix (``n u m k M G T P E``), or a decimal exponent (``e3``, ``E9``, ``e-3``). Note that
    ``"1E"`` is one exa and ``"1E3"`` is one thousand. A fractional byte count is rounded up to a
    whole byte, as ``Quantity.Value()`` does (``"1500m"`` is 2, ``"0.1Ki"`` is 103).

    Raises ValueError, naming the input, for anything else: empty strings, whitespace, unknown
    suffixes (``"1GiB"``, ``"1K"``), negative quantities (not a size), and values above
    :data:`MAX_QUANTITY`.
    """
    if isinstance(q, bool):
        raise ValueError(f"invalid quantity {q!r}: not a number")
    if isinstance(q, int):
        if q < 0:
            raise ValueError(f"invalid quantity {q!r}: a size cannot be negative")
        if q > MAX_QUANTITY:
            raise ValueError(f"invalid quantity {q!r}: larger than {MAX_QUANTITY}")
        return q
    if not isinstance(q, str):
        raise ValueError(f"invalid quantity {q!r}: expected a string or an int, "
                         f"not {type(q).__name__}")
    m = _QUANTITY_RE.fullmatch(q)
    if m is None or not (m["int"] or m["frac"]):
        raise ValueError(f"invalid quantity {q!r}: must match Kubernetes' quantity syntax, "
                         f"e.g. '10Gi', '1.5G', '1e9', '1024'")
    frac_part = m["frac"] or ""
    digits = (m["int"] + frac_part).lstrip("0")
    if not digits:
        return 0
    if m["sign"] == "-":
        raise ValueError(f"invalid quantity {q!r}: a size cannot be negative")
    # value = int(digits) * 2**shift * 10**exp10, and 10**(len(digits)-1) <= int(digits)
    shift = 0
    exp10 = -len(frac_part)
    if m["bin"] is not None:
        shift = _BINARY_SHIFT[m["bin"]]
    elif m["exp"] is not None:
        if len(m["exp"].lstrip("+-").lstrip("0")) > 20:
            raise ValueError(f"invalid quantity {q!r}: exponent out of range")
        exp10 += int(m["exp"])
    else:
        exp10 += _DECIMAL_EXP[m["dec"]]
    # Bound the magnitude before building 10**exp10, so '1e999999999' costs nothing.
    if len(digits) - 1 + exp10 >= 19:  # value >= 10**19 > MAX_QUANTITY
        raise ValueError(f"invalid quantity {q!r}: larger than {MAX_QUANTITY} bytes")
    if len(digits) + exp10 < -19:  # 0 < value < 10**-19 * 2**60 < 1
        return 1  # a positive amount below one byte rounds up to one byte
    try:
        mantissa = int(digits)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        raise ValueError(f"invalid quantity {q!r}: too many digits") from None
    scale: int = 10 ** abs(exp10)
    if exp10 >= 0:
        result = (mantissa << shift) * scale
    else:
        result = _ceil_div(mantissa << shift, scale)
    if result > MAX_QUANTITY:
        raise ValueError(f"invalid quantity {q!r}: larger than {MAX_QUANTITY} bytes")
    return result



