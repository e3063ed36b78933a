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
