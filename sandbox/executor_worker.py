"""The worker side of :class:`sandbox.Executor`: one call, ``fn(*args, **kwargs)``, in a worker.

The executor registers :func:`run` as its one function (``ref="sandbox.executor_worker:run"``).
Its event is the msgpack array ``[sys_path, main, initializer, call]``:

- ``sys_path``: the caller's ``sys.path``, made absolute; put first on the worker's own, so what
  the caller imports, the worker imports (as multiprocessing's spawn passes ``sys.path``);
- ``main``: how to load the caller's main module when the call refers to ``__main__``:
  ``["path", "/abs/script.py"]``, ``["module", "pkg.app"]`` or None. As spawn does, it is run
  as ``__mp_main__`` (so code under ``if __name__ == "__main__":`` does not run) and installed
  as ``sys.modules["__main__"]``; only when a pickle names ``__main__``, once per worker;
- ``initializer``: the pickled ``(initializer, initargs)`` of the executor, or None; run once
  per worker process, before its first call;
- ``call``: the pickled ``(fn, args, kwargs)``.

It returns the reply of :mod:`sandbox.executor_wire` (msgpack, never pickle). A raised exception
is a reply too (type, module, plain-data args, message, traceback), except ``MemoryError``,
which is left to the runtime (a memory limit, and a reused worker retired).

Nothing here runs in the zygote but the import: no pickle, runpy or traceback at import time
(the executor's zygote preloads pickle itself, so a fresh worker does not pay for it).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sandbox import executor_wire as wire

__all__ = ["process_chunk", "run"]

#: True in a process serving executor calls: an Executor refuses to start there (module-level
#: code of a main script not guarded by ``if __name__ == "__main__":``).
active = False
#: Messages and tracebacks are clipped to this many characters.
_MAX_TEXT = 64 * 1024
_state: dict[str, Any] = {"main_loaded": False, "initialized": False, "unpickler": None}


def run(event: Sequence[Any], context: Any) -> bytes:
    """The handler: unpickle the call, run it, encode what it returned or raised."""
    global active
    active = True
    path, main, initializer, call = event
    _use_path(path)
    if initializer is not None and not _state["initialized"]:
        try:
            init, initargs = _unpickle(initializer, main)
            init(*initargs)
        except MemoryError:
            raise
        except BaseException as exc:
            return wire.dumps([wire.INIT_FAILED, _describe(exc)])
        _state["initialized"] = True
    try:
        fn, args, kwargs = _unpickle(call, main)
        value = fn(*args, **kwargs)
    except MemoryError:
        raise
    except BaseException as exc:
        return wire.dumps([wire.RAISED, _describe(exc)])
    try:
        return wire.dumps([wire.OK, value])
    except wire.NotPlainData as exc:
        return wire.dumps([wire.UNSENDABLE, f"the result cannot come back from the worker: "
                                            f"{exc}; return plain data (see "
                                            "sandbox.executor_wire)"])


def process_chunk(fn: Callable[..., Any], chunk: Sequence[Sequence[Any]]) -> list[Any]:
    """``map(..., chunksize=n)``: one call runs ``n`` items, results in order."""
    return [fn(*args) for args in chunk]


def _use_path(path: Sequence[str]) -> None:
    if path and sys.path[: len(path)] != list(path):
        first = set(path)
        sys.path[:] = [*path, *(p for p in sys.path if p not in first)]


def _unpickle(data: bytes, main: Sequence[str] | None) -> Any:
    cls = _state["unpickler"]
    if cls is None:
        import pickle

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if module == "__main__":
                    _load_main(main)
                    try:
                        return super().find_class(module, name)
                    except AttributeError as exc:
                        if main:
                            exc.add_note(f"(a function a worker runs must be defined at the "
                                         f"top level of the caller's main {main[0]}, not "
                                         "under `if __name__ == \"__main__\":`)")
                            raise
                        raise AttributeError(
                            f"{exc}: the caller's __main__ is not a script or module a "
                            "worker can load (an interactive session, python -c, a "
                            f"notebook); define {name} in a module") from None
                return super().find_class(module, name)

        cls = _state["unpickler"] = Unpickler
    return cls(io.BytesIO(data)).load()


def _load_main(main: Sequence[str] | None) -> None:
    """Run the caller's main script or module as ``__mp_main__`` (as multiprocessing's spawn
    does), once."""
    if _state["main_loaded"] or not main:
        return
    _state["main_loaded"] = True
    import runpy
    import types

    kind, target = main
    try:
        if kind == "module":
            content = runpy.run_module(target, run_name="__mp_main__", alter_sys=True)
        else:
            content = runpy.run_path(target, run_name="__mp_main__")
    except BaseException as exc:
        exc.add_note(f"(while loading the caller's main {kind} {target!r} as __mp_main__ in "
                     "the worker)")
        raise
    module = types.ModuleType("__mp_main__")
    module.__dict__.update(content)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


def _clip(text: str, *, tail: bool = False) -> str:
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= _MAX_TEXT:
        return text
    return "…[truncated]" + text[-_MAX_TEXT:] if tail else text[:_MAX_TEXT] + "…[truncated]"


def _describe(exc: BaseException) -> dict[str, Any]:
    """What the supervisor needs to raise it again: type, module, plain-data args (None when
    they are not plain data), message, and the traceback without this module's frames."""
    import traceback

    cls = type(exc)
    try:
        message = str(exc)
    except BaseException:  # a hostile __str__
        message = f"<{cls.__qualname__} with an unprintable message>"
    args: list[Any] | None = list(exc.args) if isinstance(exc.args, tuple) else None
    if isinstance(exc, OSError) and exc.filename is not None and exc.errno is not None:
        # The constructor's own form, so the file names come back too (args omits them).
        args = [exc.errno, exc.strerror, exc.filename, None, exc.filename2]
    try:
        wire.dumps(args)
    except BaseException:
        args = None
    try:
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if f.filename != __file__])
        tb = "".join(te.format())
    except BaseException:
        tb = ""
    return {"type": _clip(str(cls.__qualname__)), "module": _clip(str(cls.__module__)),
            "args": args, "message": _clip(message), "traceback": _clip(tb, tail=True)}
