"""What an :class:`sandbox.Executor` call's result looks like on its way back: plain data only.

A call goes supervisor → worker as a pickle (trusted direction: our own bytes). Nothing from a
worker is ever unpickled: the worker encodes what the function returned (or raised) with
:func:`dumps`, msgpack with a few extension types, and the supervisor decodes it with
:func:`loads`, which builds nothing but the types below.

What round-trips, with its type (exact types only: instances of subclasses, enums included,
are refused rather than silently converted)::

    None, bool, float, str, bytes     as themselves
    int                               any size (beyond 64 bits: extension 5)
    complex                           extension 4
    list, dict                        as themselves; dict keys: None, bool, int (64-bit), float,
                                      str or bytes
    tuple                             extension 1 (comes back a tuple, not a list)
    set, frozenset                    extensions 2 and 3; elements as dict keys
    bytearray, memoryview             come back as bytes

Anything else (a dataclass, a numpy array, a datetime, an OrderedDict, a namedtuple) makes
:func:`dumps` raise :class:`NotPlainData` naming the type, and the call fails with
:class:`sandbox.executor.ResultNotSerializable`.

Why the key rule: a hostile worker could otherwise send thousands of distinct keys with one
hash (tuples and big integers have hashes anyone can collide; str and bytes are salted per
process, 64-bit integers and floats collide only a bounded number of times), and building that
dict in the supervisor would take quadratic time.

The body of every reply is one msgpack array ``[tag, payload]``::

    OK            [0, value]
    RAISED        [1, {"type", "module", "args" (list | None), "message", "traceback"}]
    UNSENDABLE    [2, message]            the return value is not plain data (see above)
    INIT_FAILED   [3, same map as RAISED]  the executor's initializer raised
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

__all__ = ["INIT_FAILED", "OK", "RAISED", "UNSENDABLE", "InvalidReply", "NotPlainData", "dumps",
           "loads"]

OK: Final = 0
RAISED: Final = 1
UNSENDABLE: Final = 2
INIT_FAILED: Final = 3

_TUPLE, _SET, _FROZENSET, _COMPLEX, _BIGINT = 1, 2, 3, 4, 5
#: dict keys and set elements: types whose hashes a worker cannot collide without bound
_KEY_TYPES: Final = (type(None), bool, int, float, str, bytes)
_INT64_MIN, _UINT64_END = -(2**63), 2**64


class NotPlainData(TypeError):
    """A value cannot travel back from a worker (its type is not in the table above)."""


class InvalidReply(ValueError):
    """The bytes a worker sent are not a valid reply (a broken or hostile worker)."""


def _key_ok(key: Any) -> bool:
    kind = type(key)
    if kind is int:
        return bool(_INT64_MIN <= key < _UINT64_END)
    return kind in _KEY_TYPES


def _default(value: Any) -> Any:
    kind = type(value)
    if kind is tuple:
        return msgpack.ExtType(_TUPLE, _pack(list(value)))
    if kind is set or kind is frozenset:
        for item in value:
            if not _key_ok(item):
                raise NotPlainData(f"a {kind.__name__} element of type "
                                   f"{_type_name(item)} (elements, like dict keys, must be "
                                   "None, bool, 64-bit int, float, str or bytes)")
        return msgpack.ExtType(_SET if kind is set else _FROZENSET, _pack(list(value)))
    if kind is complex:
        return msgpack.ExtType(_COMPLEX, _pack([value.real, value.imag]))
    if kind is int:  # beyond 64 bits
        length = (value.bit_length() + 8) // 8
        return msgpack.ExtType(_BIGINT, value.to_bytes(length, "big", signed=True))
    raise NotPlainData(f"a {_type_name(value)} is not plain data")


def _type_name(value: Any) -> str:
    kind = type(value)
    module = kind.__module__
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True, strict_types=True, default=_default)
    return data


def dumps(value: Any) -> bytes:
    """Encode ``value`` (see the module's table).

    Raises:
        NotPlainData: something in it has a type that does not round-trip, or a dict key or
            set element is of a type that is not allowed there; the message names the type.
    """
    try:
        data = _pack(value)
    except NotPlainData:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise NotPlainData(str(exc)) from None
    if isinstance(value, list | dict | tuple):
        # msgpack packs any dict key; check them here (the supervisor would refuse the reply).
        try:
            loads(data)
        except InvalidReply as exc:
            raise NotPlainData(str(exc)) from None
    return data


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    for key, _ in pairs:
        if not _key_ok(key):
            raise InvalidReply(f"a dict key of type {_type_name(key)} (dict keys must be None, "
                               "bool, 64-bit int, float, str or bytes)")
    return dict(pairs)


def _ext(code: int, data: bytes) -> Any:
    if code == _BIGINT:
        return int.from_bytes(data, "big", signed=True)
    items = _unpack(data)
    if not isinstance(items, list):
        raise InvalidReply(f"extension {code} does not hold a list")
    if code == _TUPLE:
        return tuple(items)
    if code in (_SET, _FROZENSET):
        for item in items:
            if not _key_ok(item):
                raise InvalidReply(f"a set element of type {_type_name(item)}")
        return set(items) if code == _SET else frozenset(items)
    if code == _COMPLEX and len(items) == 2 and all(type(x) is float for x in items):
        return complex(items[0], items[1])
    raise InvalidReply(f"unknown or malformed extension {code}")


def _unpack(data: bytes) -> Any:
    size = len(data)
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                           object_pairs_hook=_pairs, ext_hook=_ext, timestamp=0,
                           max_str_len=size, max_bin_len=size, max_array_len=size,
                           max_map_len=size, max_ext_len=size)


def loads(data: bytes) -> Any:
    """Decode what :func:`dumps` made; never builds anything but the table's types.

    Raises:
        InvalidReply: the bytes are not exactly one valid value.
    """
    try:
        return _unpack(data)
    except InvalidReply:
        raise
    except (ValueError, TypeError, RecursionError, MemoryError, msgpack.ExtraData,
            msgpack.FormatError, msgpack.StackError, UnicodeDecodeError) as exc:
        raise InvalidReply(f"{type(exc).__name__}: {exc}") from None
