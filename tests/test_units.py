"""Sizes as people write them."""

from __future__ import annotations

import pytest

from fornax_sched.units import SizeError, format_size, parse_size


def test_sizes_round_trip() -> None:
    for text, n in [("100", 100), ("512K", 512 << 10), ("64M", 64 << 20), ("1.5G", 3 << 29), ("2GiB", 2 << 30)]:
        assert parse_size(text) == n
    assert format_size(256 << 20) == "256M" and format_size(1000) == "1000"


def test_zero_is_a_reading_not_a_limit() -> None:
    """A full node reports mem_free 0; a limit of 0 is a mistake."""
    assert parse_size(format_size(0), allow_zero=True) == 0
    with pytest.raises(SizeError, match="must be above zero"):
        parse_size("0", "memory limit")
    with pytest.raises(SizeError, match="bad memory limit '12Q'"):
        parse_size("12Q", "memory limit")


def test_sizes_are_read_exactly_up_to_the_cap() -> None:
    """8192T (2^53 bytes) is the most a size may say: exact as a double and as a Lua number, and a
    node's sum of them stays far from 2^63.  Long numbers are read exactly, not through a float
    (which would take 2^53 + 1 for 2^53 and let it through)."""
    assert parse_size("8192T") == 1 << 53 == parse_size(str(1 << 53))
    for text in (str((1 << 53) + 1), "8193T", "99999999999999999999999T", "8192.0001T"):
        with pytest.raises(SizeError, match="must be at most 8192T"):
            parse_size(text, "mem")
    assert parse_size("4503599627370497") == (1 << 52) + 1
    assert parse_size("1.1T") == 1209462790553 and parse_size("0.5K") == 512
