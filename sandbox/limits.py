"""Resource limits: one frozen dataclass, units in the names, ``None`` for unlimited.

Limits are resolved in exactly one place (:func:`resolve`): the effective limit of an
invocation is the *meet* of what the request asks for, the function's defaults (which fall back
to the runtime's defaults) and the operator's maxima. A request can only tighten a limit, never
loosen it.

Sizes are bytes inside the program. At the edges (CLI, config) :func:`parse_size` accepts
``"64MiB"``-style strings: a plain integer is bytes; ``K``/``M``/``G``/``T`` and
``KB``/``MB``/``GB``/``TB`` are powers of 1000; ``KiB``/``MiB``/``GiB``/``TiB`` powers of 1024.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["DEFAULT_LIMITS", "Limits", "format_size", "parse_size", "resolve", "wire_dict"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str | int) -> int:
    """Parse ``"512"``, ``"64MiB"``, ``"1.5G"`` or ``"10KB"`` into a number of bytes.

    Raises:
        ValueError: the text is not a size; the message quotes it.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text!r}: must not be negative")
        return text
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected bytes or a number with K/M/G/T, KB/MB/GB/TB "
            "(powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)"
        )
    number, prefix, binary, suffix_b = match.groups()
    prefix = prefix.upper()
    if binary and not prefix:
        raise ValueError(f"invalid size {text!r}: 'i' needs a K/M/G/T prefix")
    base = 1024 if binary else 1000
    value = float(number) * base ** _POWERS[prefix]
    if not prefix and suffix_b == "" and "." in number:
        raise ValueError(f"invalid size {text!r}: a byte count must be a whole number")
    return int(value)


def format_size(n: int | None) -> str:
    """Human-readable binary size (``"64 MiB"``); ``"unlimited"`` for None."""
    if n is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n} TiB"  # pragma: no cover


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What one invocation may use. Every field is optional; ``None`` means unlimited.

    Attributes:
        wall_timeout_s: wall-clock time from the start of the function to its result, seconds.
            Enforced from outside by SIGKILL of the whole worker tree.
        cpu_time_s: CPU time of the whole worker tree (user + system), seconds.
        memory_bytes: memory of the whole worker tree (a memory cgroup when the machine has
            one; otherwise an RLIMIT_DATA plus an RSS watchdog).
        max_processes: processes and threads the worker tree may have at once (pids cgroup,
            RLIMIT_NPROC as defence in depth).
        max_open_files: file descriptors per process (RLIMIT_NOFILE).
        max_file_size_bytes: largest file the function may write (RLIMIT_FSIZE).
        max_result_bytes: encoded size of the result, or of all streamed chunks together.
        max_log_bytes: captured stdout, and separately stderr; the rest is dropped and the
            truncation flagged.
        network: whether the function may use the network (off by default; enforced by the
            isolation layers where the machine offers them).
    """

    wall_timeout_s: float | None = None
    cpu_time_s: float | None = None
    memory_bytes: int | None = None
    max_processes: int | None = None
    max_open_files: int | None = None
    max_file_size_bytes: int | None = None
    max_result_bytes: int | None = None
    max_log_bytes: int | None = None
    network: bool = False

    def __post_init__(self) -> None:
        for name in ("wall_timeout_s", "cpu_time_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"Limits.{name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive finite number of seconds, "
                                 f"got {value!r}")
        for name in ("memory_bytes", "max_processes", "max_open_files", "max_file_size_bytes",
                     "max_result_bytes", "max_log_bytes"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Limits.{name} must be an int, got {value!r}")
            minimum = 1 if name != "max_log_bytes" else 0
            if value < minimum:
                raise ValueError(f"Limits.{name} must be >= {minimum}, got {value!r}")
        if self.memory_bytes is not None and self.memory_bytes < 16 * 1024 * 1024:
            raise ValueError(f"Limits.memory_bytes must be at least 16 MiB (an interpreter "
                             f"needs that much), got {format_size(self.memory_bytes)}")
        if self.max_open_files is not None and self.max_open_files < 16:
            raise ValueError(f"Limits.max_open_files must be >= 16, got {self.max_open_files}")
        if not isinstance(self.network, bool):
            raise TypeError(f"Limits.network must be a bool, got {self.network!r}")

    # -- conversions -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The limits as a plain dict (JSON and msgpack friendly; a fresh copy)."""
        return dict(_as_dict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Limits:
        """Build from a mapping, rejecting unknown keys by name.

        Size fields also accept ``"64MiB"``-style strings.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown limit(s): {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        values = dict(data)
        for name in ("memory_bytes", "max_file_size_bytes", "max_result_bytes", "max_log_bytes"):
            if isinstance(values.get(name), str):
                values[name] = parse_size(values[name])
        return cls(**values)

    def replace(self, **changes: Any) -> Limits:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def meet(self, other: Limits) -> Limits:
        """Field-wise the tighter of the two (None is unlimited; network only if both allow)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "network":
                values[f.name] = bool(a and b)
            elif a is None:
                values[f.name] = b
            elif b is None:
                values[f.name] = a
            else:
                values[f.name] = min(a, b)
        return Limits(**values)


#: What a function gets when neither it nor the caller says otherwise.
DEFAULT_LIMITS = Limits(
    wall_timeout_s=30.0,
    cpu_time_s=None,
    memory_bytes=512 * 1024 * 1024,
    max_processes=64,
    max_open_files=256,
    max_file_size_bytes=64 * 1024 * 1024,
    max_result_bytes=16 * 1024 * 1024,
    max_log_bytes=1024 * 1024,
    network=False,
)

@functools.lru_cache(maxsize=1024)
def _as_dict(limits: Limits) -> dict[str, Any]:
    return {f.name: getattr(limits, f.name) for f in dataclasses.fields(limits)}


def wire_dict(limits: Limits) -> dict[str, Any]:
    """The limits as a dict for the wire: shared and cached, never to be mutated."""
    return _as_dict(limits)


@functools.lru_cache(maxsize=4096)
def resolve(
    request: Limits | None,
    function: Limits | None,
    defaults: Limits = DEFAULT_LIMITS,
    maxima: Limits | None = None,
) -> Limits:
    """The one place limits are resolved: request ∧ (function over defaults) ∧ maxima.

    ``function`` fields that are set replace the runtime defaults (a function may ask for more
    than the default, up to the maxima); the request may only tighten the result; ``network``
    is allowed only when the function (or defaults) allow it and the request does not say no
    (a request's ``network=False`` is the default, so a request cannot switch network *off*
    explicitly through this field: use a function default for that).
    """
    base = defaults if function is None else _function_over_defaults(function, defaults)
    effective = base
    if request is not None:
        req = dataclasses.replace(request, network=True)  # requests cannot grant network
        effective = effective.meet(req)
    if maxima is not None:
        effective = effective.meet(maxima)
    return effective


def _function_over_defaults(function: Limits, defaults: Limits) -> Limits:
    values = defaults.to_dict()
    for f in dataclasses.fields(function):
        v = getattr(function, f.name)
        if f.name == "network":
            values["network"] = bool(v) or defaults.network
        elif v is not None:
            values[f.name] = v
    return Limits(**values)
