"""sandbox: run untrusted or unreliable Python functions in cheap, isolated, limited processes.

Public names are loaded on first use, so a zygote (which imports this package) stays lean.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# No logging here: this package is imported into every zygote (see sandbox._logging).

if TYPE_CHECKING:
    from sandbox.asyncq import AsyncPolicy, InvocationNotFound, InvocationState, QueuedInvocation
    from sandbox.errors import (
        ConfigurationError,
        FunctionNotFound,
        InvalidRequest,
        InvocationFailed,
        IsolationUnavailable,
        Overloaded,
        ProfileError,
        SandboxError,
        ShuttingDown,
    )
    from sandbox.executor import (
        CallFailed,
        CallOutOfMemory,
        CallTimedOut,
        CPULimitExceeded,
        Executor,
        FunctionError,
        OutputLimitExceeded,
        ResultNotSerializable,
        WorkerCrashed,
    )
    from sandbox.functions import FunctionInfo
    from sandbox.limits import DEFAULT_LIMITS, Limits, parse_size
    from sandbox.outcome import ErrorInfo, InvocationResult, Outcome, Stats
    from sandbox.runtime import (
        AsyncInvocation,
        AsyncRuntime,
        Invocation,
        InvocationStream,
        Runtime,
        StreamIterator,
    )
    from sandbox.worker import Context

_EXPORTS = {
    "AsyncInvocation": "sandbox.runtime",
    "AsyncPolicy": "sandbox.asyncq",
    "AsyncRuntime": "sandbox.runtime",
    "CPULimitExceeded": "sandbox.executor",
    "CallFailed": "sandbox.executor",
    "CallOutOfMemory": "sandbox.executor",
    "CallTimedOut": "sandbox.executor",
    "ConfigurationError": "sandbox.errors",
    "Context": "sandbox.worker",
    "DEFAULT_LIMITS": "sandbox.limits",
    "ErrorInfo": "sandbox.outcome",
    "Executor": "sandbox.executor",
    "FunctionError": "sandbox.executor",
    "FunctionInfo": "sandbox.functions",
    "FunctionNotFound": "sandbox.errors",
    "InvalidRequest": "sandbox.errors",
    "Invocation": "sandbox.runtime",
    "InvocationNotFound": "sandbox.asyncq",
    "InvocationState": "sandbox.asyncq",
    "InvocationFailed": "sandbox.errors",
    "InvocationResult": "sandbox.outcome",
    "InvocationStream": "sandbox.runtime",
    "IsolationUnavailable": "sandbox.errors",
    "Limits": "sandbox.limits",
    "Outcome": "sandbox.outcome",
    "OutputLimitExceeded": "sandbox.executor",
    "Overloaded": "sandbox.errors",
    "ProfileError": "sandbox.errors",
    "QueuedInvocation": "sandbox.asyncq",
    "ResultNotSerializable": "sandbox.executor",
    "Runtime": "sandbox.runtime",
    "SandboxError": "sandbox.errors",
    "ShuttingDown": "sandbox.errors",
    "Stats": "sandbox.outcome",
    "StreamIterator": "sandbox.runtime",
    "WorkerCrashed": "sandbox.executor",
    "parse_size": "sandbox.limits",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
