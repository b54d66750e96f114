"""The frame reader and message validation, including a hypothesis fuzz with hostile bytes."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import protocol
from sandbox.errors import FrameTooLarge, ProtocolError


def frame(obj: object) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return protocol.HEADER.pack(len(body)) + body


def test_frames_split_anywhere_reassemble() -> None:
    data = b"".join(protocol.encode_frame({"t": "chunk", "data": bytes([i]) * i})
                    for i in range(50))
    for step in (1, 3, 7, 64, len(data)):
        decoder = protocol.FrameDecoder(cap=1024)
        bodies = []
        for i in range(0, len(data), step):
            bodies += decoder.feed(data[i:i + step])
        assert len(bodies) == 50
        decoder.close()
        msgs = [protocol.decode_worker_message(b, max_bytes=1024) for b in bodies]
        assert [len(m.data) for m in msgs] == list(range(50))  # type: ignore[union-attr]


def test_oversized_header_is_refused_before_the_body() -> None:
    decoder = protocol.FrameDecoder(cap=100)
    with pytest.raises(FrameTooLarge, match="4294967295 bytes"):
        decoder.feed(b"\xff\xff\xff\xff")  # 4 GiB claimed; nothing else sent


def test_end_mid_frame_is_an_error_end_between_frames_is_not() -> None:
    decoder = protocol.FrameDecoder()
    decoder.feed(protocol.encode_frame({"t": "chunk", "data": b"x"}))
    decoder.close()
    decoder.feed(b"\x00\x00\x00\x05ab")
    with pytest.raises(ProtocolError, match="mid-frame"):
        decoder.close()


@pytest.mark.parametrize(("obj", "match"), [
    ([1, 2], "must be a map"),
    ({"t": "nope"}, "unknown message type"),
    ({"t": "chunk"}, "lacks field 'data'"),
    ({"t": "chunk", "data": "text"}, "has type str"),
    ({"t": "result", "data": b"", "streamed": 1, "rss": 0, "cpu": 0.0}, "streamed"),
    ({"t": "result", "data": b"", "streamed": False, "rss": -1, "cpu": 0.0}, "out of range"),
    ({"t": "failed", "type": 1, "message": "", "traceback": "", "output_limit": False,
      "rss": 0, "cpu": 0}, "type"),
    ({1: 2}, "undecodable"),
])
def test_invalid_messages(obj: object, match: str) -> None:
    body = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_worker_message(body, max_bytes=1 << 20)


def test_ext_types_and_trailing_bytes_are_refused() -> None:
    ext = msgpack.packb(msgpack.ExtType(5, b"abc"))
    with pytest.raises(ProtocolError):
        protocol.strict_unpackb(ext, max_bytes=100)
    with pytest.raises(ProtocolError):
        protocol.strict_unpackb(msgpack.packb(1) + b"\x01", max_bytes=100)
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested one-element arrays
    with pytest.raises(ProtocolError):
        protocol.strict_unpackb(deep, max_bytes=1 << 20)


def test_length_limits_inside_a_frame() -> None:
    body = msgpack.packb({"t": "chunk", "data": b"x" * 2000}, use_bin_type=True)
    with pytest.raises(ProtocolError):
        protocol.decode_worker_message(body, max_bytes=1000)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=20), st.integers(min_value=0, max_value=4096))
def test_fuzz_hostile_byte_streams(chunks: list[bytes], cap: int) -> None:
    """Any byte stream: only ProtocolError (or clean messages), never another exception, and
    the decoder never buffers more than one capped frame."""
    decoder = protocol.FrameDecoder(cap=cap)
    try:
        for chunk in chunks:
            for body in decoder.feed(chunk):
                assert len(body) <= cap
                try:
                    protocol.decode_worker_message(body, max_bytes=cap)
                except ProtocolError:
                    pass
            assert len(decoder._buf) <= cap + protocol.HEADER.size + 300
        decoder.close()
    except ProtocolError:
        pass


valid_message = st.one_of(
    st.builds(lambda d: {"t": "chunk", "data": d}, st.binary(max_size=64)),
    st.builds(lambda d, s: {"t": "result", "data": d, "streamed": s, "rss": 1, "cpu": 0.5},
              st.binary(max_size=64), st.booleans()),
    st.builds(lambda m: {"t": "failed", "type": "E", "message": m, "traceback": "",
                         "output_limit": False, "rss": 0, "cpu": 0.0}, st.text(max_size=64)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(valid_message, max_size=10), st.data())
def test_fuzz_valid_frames_with_mutations(messages: list[dict], data: st.DataObject) -> None:
    stream = bytearray(b"".join(protocol.encode_frame(m) for m in messages))
    if stream and data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] = data.draw(st.integers(0, 255))
    decoder = protocol.FrameDecoder(cap=4096)
    try:
        for body in decoder.feed(bytes(stream)):
            protocol.decode_worker_message(body, max_bytes=4096)
        decoder.close()
    except ProtocolError:
        pass
