"""cdimover.sizing: CDI's overhead formulas in exact arithmetic, and Kubernetes quantities.

The model functions below compute the same formulas a different way (math.ceil/math.floor on
Fraction values, overheads built from Decimal) so the property tests compare two code paths.
"""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cdimover.sizing import (
    ALIGN,
    DEFAULT_OVERHEAD,
    MAX_QUANTITY,
    format_size,
    parse_overhead,
    parse_quantity,
    required_space,
    usable_space,
)

KiB, MiB, GiB, TiB, PiB, EiB = (1 << (10 * k) for k in range(1, 7))


def model_usable(available: int, overhead: Fraction) -> int:
    """RoundDown(ceil(available / (1 + overhead)), 1 MiB) via math.ceil/math.floor."""
    c = math.ceil(Fraction(available) / (Fraction(1) + overhead))
    return math.floor(Fraction(c, ALIGN)) * ALIGN


def model_required(size: int, overhead: Fraction) -> int:
    """ceil(RoundUp(size, 1 MiB) * (1 + overhead)) via math.ceil."""
    aligned = math.ceil(Fraction(size, ALIGN)) * ALIGN
    return math.ceil(aligned * (Fraction(1) + overhead))


# Overheads as CDI writes them: up to three decimals in [0, 1) (the Percent pattern), as text.
overhead_text = st.integers(0, 999).map(lambda k: str(Decimal(k) / 1000))
sizes = st.one_of(
    st.integers(0, 1 << 60),
    st.integers(0, 1 << 44),
    st.integers(0, 1 << 24),
    # values at and next to 1 MiB boundaries
    st.builds(lambda k, d: max(0, k * ALIGN + d), st.integers(0, 1 << 40), st.integers(-2, 2)),
)


# --- overhead ------------------------------------------------------------------------------------

@pytest.mark.parametrize("given_, expected", [
    (0.06, Fraction(6, 100)),
    ("0.06", Fraction(6, 100)),
    (Decimal("0.06"), Fraction(6, 100)),
    (Fraction(3, 50), Fraction(6, 100)),
    (0, Fraction(0)),
    ("0", Fraction(0)),
    (0.999, Fraction(999, 1000)),
    ("3/50", Fraction(6, 100)),
    (0.1, Fraction(1, 10)),  # not the double nearest 0.1
])
def test_parse_overhead_exact(given_: object, expected: Fraction) -> None:
    assert parse_overhead(given_) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [
    1, 1.0, "1", -0.01, "-0.06", 1.5, float("nan"), float("inf"), "nan", "abc", "", True,
    None, [0.06], Decimal("NaN"), Decimal("Infinity"),
])
def test_parse_overhead_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_overhead(bad)  # type: ignore[arg-type]


def test_default_overhead_is_cdis() -> None:
    assert DEFAULT_OVERHEAD == "0.06"
    assert usable_space(100 * GiB) == usable_space(100 * GiB, 0.06) \
        == usable_space(100 * GiB, "0.06") == usable_space(100 * GiB, Fraction(6, 100))
    assert required_space(100 * GiB) == required_space(100 * GiB, Decimal("0.06"))


# --- usable_space / required_space -----------------------------------------------------------------

def test_known_values() -> None:
    # 10 GiB * 1.06 = 11381663334.4 -> 11381663335
    assert required_space(10 * GiB) == 11_381_663_335
    assert required_space(10 * GiB, 0) == 10 * GiB
    # 10 GiB / 1.06 = 10129639849.06.. -> 10129639850 -> 9660 MiB
    assert usable_space(10 * GiB) == 9660 * MiB == 10_129_244_160
    assert usable_space(10 * GiB, 0) == 10 * GiB
    # a 1 byte image still needs a whole aligned MiB, plus 6 %
    assert required_space(1) == math.ceil(MiB * Fraction(106, 100)) == 1_111_491
    assert required_space(0) == 0
    assert usable_space(0) == 0


def test_float_overhead_is_exact_not_binary() -> None:
    # With the binary double 0.06 (0.059999999999999997779...) this ceil would be one lower.
    size = 50 * MiB  # 52428800 * 1.06 = 55574528 exactly
    assert required_space(size, 0.06) == 55_574_528
    assert required_space(size, 0.06) == model_required(size, Fraction(6, 100))


@pytest.mark.parametrize("available, expected", [
    (0, 0),
    (1, 0),
    (MiB - 1, 0),
    (MiB, 0),                              # 1 MiB / 1.06 < 1 MiB
    (math.ceil(MiB * Fraction(106, 100)) - 1, MiB),  # ceil() of the quotient reaches 1 MiB
    (math.ceil(MiB * Fraction(106, 100)), MiB),
    (2 * MiB, MiB),
    (1_111_490, MiB),                      # ceil(1111490 / 1.06) = 1048576 exactly
    (1_111_489, 0),                        # ceil(1111489 / 1.06) = 1048575
])
def test_usable_space_mib_edges(available: int, expected: int) -> None:
    assert usable_space(available) == expected


@pytest.mark.parametrize("size, expected", [
    (1, 1_111_491),
    (MiB, 1_111_491),
    (MiB + 1, 2_222_982),     # rounds up to 2 MiB first: 2097152 * 1.06 = 2222981.12
    (2 * MiB, 2_222_982),
    (2 * MiB - 1, 2_222_982),
])
def test_required_space_mib_edges(size: int, expected: int) -> None:
    assert required_space(size) == expected


def test_multi_terabyte() -> None:
    for size in (2 * TiB, 16 * TiB, 3 * PiB + 1, EiB, 1 << 60):
        o = Fraction(6, 100)
        assert required_space(size) == model_required(size, o)
        assert usable_space(size) == model_usable(size, o)
        assert usable_space(required_space(size)) >= size
    assert required_space(2 * TiB) == 2_330_964_650_886  # 2199023255552 * 1.06 = ...885.12


@given(sizes, overhead_text)
@example(0, "0")
@example(1 << 60, "0.999")
@example(ALIGN, "0.06")
def test_usable_matches_model(available: int, overhead: str) -> None:
    got = usable_space(available, overhead)
    assert got == model_usable(available, Fraction(Decimal(overhead)))
    assert got % ALIGN == 0
    assert 0 <= got <= available


@given(sizes, overhead_text)
def test_required_matches_model(size: int, overhead: str) -> None:
    got = required_space(size, overhead)
    assert got == model_required(size, Fraction(Decimal(overhead)))
    assert got >= size


@given(sizes, overhead_text)
def test_required_then_usable_holds_the_image(size: int, overhead: str) -> None:
    # A Filesystem volume sized by required_space always has room for the image.
    assert usable_space(required_space(size, overhead), overhead) >= size


@given(sizes, sizes, overhead_text)
def test_monotonic(a: int, b: int, overhead: str) -> None:
    lo, hi = sorted((a, b))
    assert usable_space(lo, overhead) <= usable_space(hi, overhead)
    assert required_space(lo, overhead) <= required_space(hi, overhead)


@given(sizes, st.floats(0, 0.999, allow_nan=False))
def test_float_overhead_equals_its_repr(size: int, overhead: float) -> None:
    assert usable_space(size, overhead) == usable_space(size, repr(overhead))
    assert required_space(size, overhead) == required_space(size, Fraction(repr(overhead)))


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, "10", None, True, Decimal(10)])
def test_sizes_reject_non_int(bad: object) -> None:
    with pytest.raises(ValueError):
        usable_space(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        required_space(bad)  # type: ignore[arg-type]


def test_sizes_reject_bad_overhead() -> None:
    with pytest.raises(ValueError):
        usable_space(GiB, 1)
    with pytest.raises(ValueError):
        required_space(GiB, -0.1)


# --- parse_quantity --------------------------------------------------------------------------------

@pytest.mark.parametrize("q, expected", [
    ("0", 0),
    ("1", 1),
    ("1024", 1024),
    ("007", 7),
    (42, 42),
    (0, 0),
    ("1Ki", KiB), ("1Mi", MiB), ("1Gi", GiB), ("1Ti", TiB), ("1Pi", PiB), ("1Ei", EiB),
    ("500Mi", 500 * MiB),
    ("10Gi", 10 * GiB),
    ("7Ei", 7 * EiB),
    ("1k", 1000), ("1M", 10**6), ("1G", 10**9), ("1T", 10**12), ("1P", 10**15), ("1E", 10**18),
    ("1e3", 1000), ("1E9", 10**9), ("1e0", 1), ("5e+2", 500), ("9E18", 9 * 10**18),
    ("1.5Gi", 3 * GiB // 2),
    ("1.5G", 1_500_000_000),
    ("2.5", 3),             # fractional bytes round up
    ("10.50", 11),
    ("1.", 1),
    (".5Ki", 512),
    ("0.1Ki", 103),         # 102.4 -> 103
    ("1500m", 2),           # milli: 1.5 -> 2
    ("1000m", 1),
    ("1m", 1),
    ("1u", 1), ("1n", 1),
    ("1e-3", 1),
    ("1.5e3", 1500),
    ("+1Ki", KiB),
    ("-0", 0),
    ("0Gi", 0),
    ("0.000Ei", 0),
    ("9223372036854775807", MAX_QUANTITY),
])
def test_quantity_table(q: str | int, expected: int) -> None:
    assert parse_quantity(q) == expected


@pytest.mark.parametrize("q", [
    "", " ", "1Gi ", " 1Gi", "1 Gi", "1GiB", "1gi", "1K", "1ki", "1KB", "Gi", "abc", "1..2",
    ".", "+", "-", "1e", "1e+", "1E+", "1ee3", "1e3Gi", "1Gi1", "0x10", "1_000",
    "١", "１",                       # non-ASCII digits
    "-1", "-1Gi", -1,                 # negative sizes
    "8Ei", "1e19", "9223372036854775808", 1 << 63, "1e999999999",
    "1e" + "9" * 30,
    None, 1.5, True, b"1Gi", [1],
])
def test_quantity_rejects(q: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_quantity(q)  # type: ignore[arg-type]
    assert repr(q) in str(info.value)


@given(st.integers(0, 1 << 40),
       st.sampled_from([("", 1), ("Ki", KiB), ("Mi", MiB), ("Gi", GiB), ("Ti", TiB),
                        ("k", 10**3), ("M", 10**6), ("G", 10**9)]))
def test_quantity_integers(n: int, suffix: tuple[str, int]) -> None:
    text, mult = suffix
    if n * mult > MAX_QUANTITY:
        with pytest.raises(ValueError):
            parse_quantity(f"{n}{text}")
    else:
        assert parse_quantity(f"{n}{text}") == n * mult


@given(st.integers(0, 10**12), st.integers(0, 6), st.integers(-12, 12))
def test_quantity_decimal_model(mantissa: int, frac_digits: int, exp: int) -> None:
    # "<digits>.<digits>e<exp>" against Fraction arithmetic on the same number.
    s = str(mantissa).rjust(frac_digits + 1, "0")
    text = f"{s[:len(s) - frac_digits]}.{s[len(s) - frac_digits:]}e{exp}" if frac_digits \
        else f"{s}e{exp}"
    value = Fraction(mantissa, 10**frac_digits) * Fraction(10) ** exp
    expected = math.ceil(value)
    if expected > MAX_QUANTITY:
        with pytest.raises(ValueError):
            parse_quantity(text)
    else:
        assert parse_quantity(text) == expected


# --- format_size -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, text", [
    (0, "0 B"),
    (512, "512 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (3 * MiB // 2, "1.5 MiB"),
    (2 * GiB, "2.0 GiB"),
    (10 * GiB + 1, "10.0 GiB"),
    (MiB - 1, "1.0 MiB"),            # 1023.999 KiB rounds to the next unit
    (int(10.25 * GiB), "10.3 GiB"),  # half up
    (2 * TiB, "2.0 TiB"),
    (1 << 60, "1.0 EiB"),
    (-2 * GiB, "-2.0 GiB"),
])
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


@given(st.integers(0, 1 << 64))
def test_format_size_is_close(n: int) -> None:
    text = format_size(n)
    number, unit = text.split(" ")
    scale = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "TiB": TiB, "PiB": PiB, "EiB": EiB}[unit]
    assert abs(Fraction(number) * scale - n) <= Fraction(scale, 20)


@pytest.mark.parametrize("bad", [1.5, "1", None, True])
def test_format_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        format_size(bad)  # type: ignore[arg-type]
