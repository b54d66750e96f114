"""Exceptions of the sandbox runtime.

Function-level outcomes (timeouts, crashes, the function's own exceptions) are *results*
(:class:`sandbox.outcome.InvocationResult`), not exceptions. The exceptions here are about the
call itself or the runtime::

    SandboxError
    ├── ConfigurationError          bad runtime / function settings (names the setting)
    │   ├── ProfileError            a preload profile failed to import (names the module)
    │   └── IsolationUnavailable    a required isolation layer is missing on this machine
    ├── FunctionNotFound            no function (or version) by that name        → NOT_FOUND
    ├── InvalidRequest              malformed event, payload or limits           → INVALID_ARGUMENT
    ├── Overloaded                  the bounded queue is full                → RESOURCE_EXHAUSTED
    ├── ShuttingDown                the runtime is closing or closed             → UNAVAILABLE
    ├── StoreUnavailable            a fleet's shared store cannot be reached     → UNAVAILABLE
    ├── InvocationFailed            raised by ``InvocationResult.unwrap()`` for a non-OK outcome
    └── ProtocolError               a peer broke the wire protocol (internal; a worker doing
        └── FrameTooLarge           so is classified CRASHED, never propagated to a caller)

:mod:`sandbox.executor` adds the exceptions a :class:`sandbox.Executor` call's future raises
(``FunctionError``, and ``CallFailed`` with one subclass per outcome): they live there because
``WorkerCrashed`` is also a ``concurrent.futures.process.BrokenProcessPool``, whose module this
one, imported by every zygote, must not load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.outcome import InvocationResult

__all__ = [
    "ConfigurationError",
    "FrameTooLarge",
    "FunctionNotFound",
    "InvalidRequest",
    "InvocationFailed",
    "IsolationUnavailable",
    "Overloaded",
    "ProfileError",
    "ProtocolError",
    "SandboxError",
    "ShuttingDown",
    "StoreUnavailable",
]


class SandboxError(Exception):
    """Base class of every exception the runtime raises."""


class ConfigurationError(SandboxError, ValueError):
    """A runtime, profile or function setting is invalid; the message names it."""


class ProfileError(ConfigurationError):
    """A preload profile could not be loaded: the zygote failed to import one of its modules."""


class IsolationUnavailable(ConfigurationError):
    """An isolation layer the operator required is not available on this machine."""


class FunctionNotFound(SandboxError, LookupError):
    """No function is registered under that name (or that version of it)."""


class InvalidRequest(SandboxError, ValueError):
    """The request is malformed: an event that cannot be encoded, a bad payload or limit."""


class Overloaded(SandboxError):
    """Admission control refused the call: the bounded queue is full. Retry later."""


class ShuttingDown(SandboxError):
    """The runtime is closing or closed and accepts no new invocations."""


class StoreUnavailable(SandboxError):
    """The shared function store (PostgreSQL) cannot be reached: the deploy or delete was not
    made. Calls of functions already deployed go on."""


class InvocationFailed(SandboxError):
    """``InvocationResult.unwrap()`` on an outcome other than ``OK``."""

    def __init__(self, result: InvocationResult) -> None:
        self.result = result
        err = result.error
        detail = f"{err.type}: {err.message}" if err is not None else ""
        super().__init__(f"invocation {result.id} ended {result.outcome.value}"
                         + (f" ({detail})" if detail else ""))


class ProtocolError(SandboxError):
    """A peer sent bytes that are not a valid frame or message."""


class FrameTooLarge(ProtocolError):
    """A frame header announced more bytes than the cap allows."""
