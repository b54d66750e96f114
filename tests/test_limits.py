from __future__ import annotations

import pytest

from sandbox import Limits, parse_size
from sandbox.limits import DEFAULT_LIMITS, resolve


@pytest.mark.parametrize(("text", "expected"), [
    ("512", 512), ("1K", 1000), ("1KB", 1000), ("1KiB", 1024), ("64MiB", 64 << 20),
    ("1.5G", 1_500_000_000), ("2gib", 2 << 30), (" 3 MB ", 3_000_000), (7, 7),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.5", "1X", "MiB", "1iB", "1 0"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"wall_timeout_s": 0}, "wall_timeout_s"),
    ({"wall_timeout_s": float("inf")}, "wall_timeout_s"),
    ({"cpu_time_s": -1}, "cpu_time_s"),
    ({"memory_bytes": 1024}, "memory_bytes"),
    ({"max_processes": 0}, "max_processes"),
    ({"max_open_files": 3}, "max_open_files"),
    ({"max_result_bytes": 1.5}, "max_result_bytes"),
    ({"network": "yes"}, "network"),
    ({"wall_timeout_s": True}, "wall_timeout_s"),
])
def test_validation_names_the_field(kwargs: dict, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        Limits(**kwargs)


def test_from_dict_accepts_sizes_and_rejects_unknown() -> None:
    assert Limits.from_dict({"memory_bytes": "64MiB"}).memory_bytes == 64 << 20
    with pytest.raises(ValueError, match="unknown limit.*memory_mb"):
        Limits.from_dict({"memory_mb": 5})


def test_resolution_is_the_meet() -> None:
    function = Limits(wall_timeout_s=60, memory_bytes=1 << 30)
    maxima = Limits(wall_timeout_s=120, memory_bytes=2 << 30, cpu_time_s=10)
    # the function may raise a default, the request only lowers
    eff = resolve(Limits(wall_timeout_s=5), function, DEFAULT_LIMITS, maxima)
    assert eff.wall_timeout_s == 5 and eff.memory_bytes == 1 << 30 and eff.cpu_time_s == 10
    eff = resolve(Limits(wall_timeout_s=500, memory_bytes=4 << 30), function, DEFAULT_LIMITS,
                  maxima)
    assert eff.wall_timeout_s == 60 and eff.memory_bytes == 1 << 30
    eff = resolve(None, Limits(wall_timeout_s=1000), DEFAULT_LIMITS, maxima)
    assert eff.wall_timeout_s == 120


def test_network_needs_the_function_and_cannot_be_granted_by_a_request() -> None:
    assert resolve(Limits(network=True), None).network is False
    assert resolve(None, Limits(network=True)).network is True
    assert resolve(None, Limits(network=True), maxima=Limits(network=False)).network is False
