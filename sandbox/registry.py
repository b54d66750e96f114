"""The registered functions: every version of every name, and nothing else.

:class:`Registry` validates a registration (:func:`sandbox.functions.make_function`), numbers
its version, and finds the latest or a given version. It knows neither pools nor calls: the
runtime tells the pools what an unregistration let go of.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sandbox.errors import ConfigurationError, FunctionNotFound
from sandbox.functions import FunctionInfo, make_function

__all__ = ["Registry"]


class Registry:
    """Functions by name and version.

    Args:
        profiles: the runtime's preload profiles (read live: a registration must name one).
        bundle_dir: where file, directory and zip bundles are snapshotted (None: loaded from
            where they are), once the host is set up.
    """

    def __init__(self, profiles: Mapping[str, Any], bundle_dir: Callable[[], str | None]
                 ) -> None:
        self._profiles = profiles
        self._bundle_dir = bundle_dir
        self._functions: dict[str, dict[int, FunctionInfo]] = {}

    def register(self, name: str, *, profile: str, version: int | None = None,
                 **kwargs: Any) -> FunctionInfo:
        """A new version of ``name`` (the next number, or ``version``); see
        :meth:`sandbox.runtime.AsyncRuntime.register` for the arguments.

        Raises:
            ConfigurationError: bad name, handler, path, profile, limits or version.
        """
        if profile not in self._profiles:
            raise ConfigurationError(f"unknown profile {profile!r}; profiles: "
                                     f"{sorted(self._profiles)}")
        versions = self._functions.setdefault(name, {})
        if version is None:
            version = max(versions, default=0) + 1
        elif version in versions:
            raise ConfigurationError(f"function {name!r} already has version {version}")
        try:
            info = make_function(name, version, profile=profile,
                                 bundle_dir=self._bundle_dir(), **kwargs)
        except BaseException:
            if not versions:
                del self._functions[name]
            raise
        versions[version] = info
        return info

    def unregister(self, name: str, version: int | None = None) -> list[FunctionInfo]:
        """Forget every version of a function, or one; returns what was forgotten.

        Raises:
            FunctionNotFound: no such function or version.
        """
        info = self.function(name, version)
        gone = list(self._functions[name].values()) if version is None else [info]
        if version is None:
            del self._functions[name]
        else:
            del self._functions[name][info.version]
            if not self._functions[name]:
                del self._functions[name]
        return gone

    def function(self, name: str, version: int | None = None) -> FunctionInfo:
        """The latest (or the given) version of a function.

        Raises:
            FunctionNotFound: no such function or version.
        """
        versions = self._functions.get(name)
        if not versions:
            raise FunctionNotFound(f"no function named {name!r}")
        if version is None:
            return versions[max(versions)]
        try:
            return versions[version]
        except KeyError:
            raise FunctionNotFound(f"function {name!r} has no version {version}; versions: "
                                   f"{sorted(versions)}") from None

    def functions(self) -> list[FunctionInfo]:
        """Every registered version of every function, by name then version."""
        return [info for name in sorted(self._functions)
                for _, info in sorted(self._functions[name].items())]

