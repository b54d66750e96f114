"""Wire formats between the supervisor, the zygotes and the workers.

Worker channel (a ``SOCK_STREAM`` socketpair, one per worker)
==============================================================
Every message is one *frame*::

    +----------------------+--------------------------------------+
    | length: uint32, BE   | body: `length` bytes, one msgpack map |
    +----------------------+--------------------------------------+

The reader checks ``length`` against its cap as soon as the four header bytes are in, *before*
reading (or allocating) the body, and fails with :class:`~sandbox.errors.FrameTooLarge`. A
stream that ends between frames is a clean end; one that ends inside a frame is a
:class:`~sandbox.errors.ProtocolError` ("ended mid-frame"). Bodies are decoded with a strict
unpacker (no ext types, bounded lengths, string keys only) and then validated into the frozen
dataclasses below; anything else is a protocol violation. Nothing a child sends is ever
unpickled, evaluated or imported.

===========  =====  ==========================================================================
message      dir    meaning
===========  =====  ==========================================================================
``ready``    W→S    the worker has confined itself and waits for work (pid, rss, posture)
``invoke``   S→W    run the function once: id, function descriptor, event bytes, limits;
                    ``trace``, the call's trace id, only when it has one
``chunk``    W→S    one value yielded by a generator function, already encoded
``result``   W→S    terminal: the encoded return value (empty for a generator)
``failed``   W→S    terminal: the function raised, its result could not be encoded, or the
                    result was over ``max_result_bytes`` (``output_limit``)
===========  =====  ==========================================================================

Zygote control (a ``SOCK_SEQPACKET`` socketpair: one datagram per message, file descriptors
travel as ``SCM_RIGHTS``)
===========================================================================================

===============  =====  ======================================================================
message          dir    meaning
===============  =====  ======================================================================
``zready``       Z→S    preloading done (pid, modules, rss)
``zfailed``      Z→S    preloading failed (module, error); the zygote exits
``spawn``        S→Z    fork a worker; fds: channel, stdout, stderr; config for its birth
``spawned``      Z→S    the worker's pid; fds: its pidfd
``spawn_failed`` Z→S    the zygote refused (it gained a thread) or fork failed
``exited``       Z→S    a child of the zygote was reaped: pid, wait status, rusage
===============  =====  ======================================================================
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from sandbox.errors import FrameTooLarge, ProtocolError

__all__ = [
    "HEADER",
    "Chunk",
    "Failed",
    "FrameDecoder",
    "Ready",
    "Result",
    "WorkerMessage",
    "decode_worker_message",
    "encode_frame",
    "strict_unpackb",
]

HEADER: Final = struct.Struct(">I")
#: Frames from a worker that are not a result or chunk stay small; results get their own cap.
DEFAULT_FRAME_CAP: Final = 64 * 1024
#: Bytes a message's own fields (not the payload) may add to a frame.
FRAME_OVERHEAD: Final = 64 * 1024
#: Bounds for the strict unpacker, per container.
_MAX_CONTAINER: Final = 100_000


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """One frame: header + msgpack body."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def strict_unpackb(data: bytes, *, max_bytes: int) -> Any:
    """Decode untrusted msgpack: no ext types, bounded lengths, string map keys.

    Raises:
        ProtocolError: anything that is not plain, bounded msgpack (one object, nothing after).
    """
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=_MAX_CONTAINER,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
            timestamp=0,
        )
    except ProtocolError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.ExtraData,
            msgpack.FormatError, msgpack.StackError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"undecodable message: {type(exc).__name__}: {exc}") from None


class FrameDecoder:
    """Incremental reader of length-prefixed frames with a hard cap on each frame.

    ``feed()`` returns the complete frame bodies so far and keeps any partial frame; it never
    holds more than ``cap + 4`` bytes of a frame. The cap may be changed between frames.
    """

    __slots__ = ("_buf", "_need", "cap")

    def __init__(self, cap: int = DEFAULT_FRAME_CAP) -> None:
        self.cap = cap
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being read

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return the bodies of every frame now complete.

        Raises:
            FrameTooLarge: a header announces more than ``cap`` bytes.
        """
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while True:
            if self._need is None:
                if end - pos < HEADER.size:
                    break
                (length,) = HEADER.unpack_from(buf, pos)
                if length > self.cap:
                    raise FrameTooLarge(
                        f"frame of {length} bytes announced, cap is {self.cap} bytes")
                self._need = length
                pos += HEADER.size
            if end - pos < self._need:
                break
            out.append(bytes(buf[pos:pos + self._need]))
            pos += self._need
            self._need = None
        if pos:
            del buf[:pos]  # once per feed: many small frames cost no repeated copying
        return out

    @property
    def mid_frame(self) -> bool:
        """True if a frame has started but not finished (the stream must not end here)."""
        return self._need is not None or len(self._buf) > 0

    def close(self) -> None:
        """The stream ended.

        Raises:
            ProtocolError: it ended inside a frame.
        """
        if self.mid_frame:
            raise ProtocolError("stream ended mid-frame")


# -- worker → supervisor messages ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """The worker confined itself and waits for an ``invoke``."""

    pid: int
    rss_bytes: int
    posture: dict[str, Any]
    #: the birth's phases in order: (name, ``time.monotonic_ns()`` when it ended, the
    #: worker's minor page faults so far: copy-on-write faults are most of a birth's cost)
    phases: tuple[tuple[str, int, int], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """One value yielded by a generator function, encoded in the call's content type."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """Terminal: the function returned. ``data`` is the encoded value (empty for a generator)."""

    data: bytes
    streamed: bool
    rss_bytes: int
    cpu_s: float
    #: the worker's clock (``time.monotonic_ns()``): invoke received, handler loaded, handler
    #: returned, result encoded
    marks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Failed:
    """Terminal: the function raised, or its result could not be encoded or was too large."""

    type: str
    message: str
    traceback: str
    output_limit: bool
    rss_bytes: int
    cpu_s: float
    marks: tuple[int, ...] = ()


WorkerMessage = Ready | Chunk | Result | Failed

_MAX_TEXT: Final = 64 * 1024


def _field(msg: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in msg:
        raise ProtocolError(f"{msg.get('t')!r} message lacks field {name!r}")
    value = msg[name]
    if isinstance(value, bool) and kind is int:
        raise ProtocolError(f"field {name!r} must be int, got bool")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {name!r} has type {type(value).__name__}")
    return value


def _text(msg: Mapping[str, Any], name: str) -> str:
    value: str = _field(msg, name, str)
    # Over-long texts are clipped, not refused: the bound on the frame already holds.
    return value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "…[truncated]"


def _nonneg_int(msg: Mapping[str, Any], name: str) -> int:
    value: int = _field(msg, name, int)
    if value < 0 or value > 2**62:
        raise ProtocolError(f"field {name!r} out of range: {value}")
    return value


def _nonneg_float(msg: Mapping[str, Any], name: str) -> float:
    value = _field(msg, name, (int, float))
    if not 0 <= value < 1e9:
        raise ProtocolError(f"field {name!r} out of range: {value}")
    return float(value)


_MAX_PHASES: Final = 32


def _marks(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) not in (0, 4) \
            or not all(type(v) is int and 0 <= v < 2**63 for v in value) \
            or value != sorted(value):
        raise ProtocolError("field 'marks' must be 4 ascending [0, 2**63) ints")
    return tuple(value)


def _phases(value: Any) -> tuple[tuple[str, int, int], ...]:
    if not isinstance(value, list) or len(value) > _MAX_PHASES:
        raise ProtocolError("field 'phases' must be a list of at most "
                            f"{_MAX_PHASES} [name, ns, faults] entries")
    out = []
    for item in value:
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or len(item[0]) > 32
                or not all(type(v) is int and 0 <= v < 2**63 for v in item[1:])):
            raise ProtocolError(f"field 'phases' has a bad entry: {item!r:.80}")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


def decode_worker_message(body: bytes, *, max_bytes: int) -> WorkerMessage:
    """Decode and validate one frame body from a worker.

    Raises:
        ProtocolError: not a map, unknown type, missing or mistyped fields.
    """
    msg = strict_unpackb(body, max_bytes=max_bytes)
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a map, got {type(msg).__name__}")
    kind = msg.get("t")
    if kind == "chunk":
        return Chunk(data=_field(msg, "data", bytes))
    if kind == "result":
        return Result(
            data=_field(msg, "data", bytes),
            streamed=_field(msg, "streamed", bool),
            rss_bytes=_nonneg_int(msg, "rss"),
            cpu_s=_nonneg_float(msg, "cpu"),
            marks=_marks(msg.get("marks", [])),
        )
    if kind == "failed":
        return Failed(
            type=_text(msg, "type"),
            message=_text(msg, "message"),
            traceback=_text(msg, "traceback"),
            output_limit=_field(msg, "output_limit", bool),
            rss_bytes=_nonneg_int(msg, "rss"),
            cpu_s=_nonneg_float(msg, "cpu"),
            marks=_marks(msg.get("marks", [])),
        )
    if kind == "ready":
        posture = _field(msg, "posture", dict)
        return Ready(pid=_nonneg_int(msg, "pid"), rss_bytes=_nonneg_int(msg, "rss"),
                     posture=posture, phases=_phases(msg.get("phases", [])))
    raise ProtocolError(f"unknown message type {kind!r}")
