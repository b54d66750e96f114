"""The worker: a child of a zygote that confines itself, then runs functions.

Runs only in the forked child, never in the supervisor. Its life, in order:

1. **birth** (:func:`main`, before any user byte runs): new session; death signal SIGKILL when
   the zygote goes (then re-check the parent, which may already be gone); stdin from
   ``/dev/null``, stdout and stderr onto the capture pipes, the channel on fd 3 and every other
   fd closed; the isolation layers the supervisor asked for; join its cgroups; baseline
   rlimits (no core files); then a ``ready`` frame.
2. **serve**: read an ``invoke`` frame; apply the invocation's rlimits; load the handler (once
   per function version: a reused worker keeps it); call ``handler(event, context)``; stream
   a generator's values as ``chunk`` frames; send exactly one terminal frame (``result`` or
   ``failed``). ``BaseException`` is caught, so ``SystemExit`` and ``KeyboardInterrupt`` are
   function errors, not exits.
3. **exit** with ``os._exit`` after its last invocation: no interpreter teardown, no atexit
   handlers of the function, no flushing of anything but stdout/stderr.

Limits set here are defence in depth. The guarantees (deadline, memory, processes) are enforced
from outside by the supervisor.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # CPython's C half of signal
import contextlib
import gc
import importlib
import json
import marshal
import os
import resource
import select
import signal
import socket
import sys
import time
import traceback
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgpack

from sandbox import _linux
from sandbox.protocol import HEADER, encode_frame

__all__ = ["Context", "main"]

CHANNEL_FD = 3
#: Error messages and tracebacks are clipped to this many characters before they are sent.
_MAX_TEXT = 64 * 1024
MSGPACK = "application/msgpack"
JSON = "application/json"


class Context:
    """The second argument of every handler.

    Attributes:
        invocation_id: the id of this invocation (the caller's, or a generated one).
        function_name: the registered name of the function.
        function_version: its version number.
        limits: the effective limits of this invocation (a dict of :class:`sandbox.Limits`
            fields; None is unlimited).
        deadline: ``time.monotonic()`` value after which the worker is killed, or None.
        trace_id: the W3C trace id of the invocation (32 hex digits) when it is traced or its
            caller sent a ``traceparent``, else None.
    """

    __slots__ = ("deadline", "function_name", "function_version", "invocation_id", "limits",
                 "trace_id")

    def __init__(self, invocation_id: str, function_name: str, function_version: int,
                 limits: dict[str, Any], deadline: float | None,
                 trace_id: str | None = None) -> None:
        self.invocation_id = invocation_id
        self.function_name = function_name
        self.function_version = function_version
        self.limits = limits
        self.deadline = deadline
        self.trace_id = trace_id

    def remaining_time_s(self) -> float | None:
        """Seconds left before the wall-clock timeout kills this invocation (None: no limit)."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def get_remaining_time_in_millis(self) -> int:
        """AWS Lambda's spelling of :meth:`remaining_time_s`, in milliseconds (a large number
        when there is no limit)."""
        left = self.remaining_time_s()
        return 2**31 - 1 if left is None else int(left * 1000)

    def __repr__(self) -> str:
        return (f"Context(invocation_id={self.invocation_id!r}, "
                f"function={self.function_name!r}@{self.function_version})")


# -- channel ------------------------------------------------------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise EOFError("supervisor closed the channel")
        buf += part
    return bytes(buf)


def _recv_message(sock: socket.socket) -> dict[str, Any]:
    (length,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    msg = msgpack.unpackb(_recv_exact(sock, length), raw=False)
    if not isinstance(msg, dict):
        raise EOFError("malformed message from the supervisor")
    return msg


def _send(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(encode_frame(message))


# -- birth --------------------------------------------------------------------------------------

#: The birth's phase timestamps (``time.monotonic_ns()``, one system-wide clock, so the
#: supervisor can place them beside its own): sent with ``ready``.
_phases: list[list[Any]] = []


def _mark(phase: str) -> None:
    _phases.append([phase, time.monotonic_ns(), resource.getrusage(_SELF).ru_minflt])


_SELF = resource.RUSAGE_SELF


def _birth(channel_fd: int, stdout_fd: int, stderr_fd: int, config: Mapping[str, Any]) -> None:
    os.setsid()
    # When the machine (or a container's limit) runs out of memory, the kernel's OOM killer
    # takes a worker, never the supervisor first: workers are the most expendable processes.
    try:
        adj = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
        try:
            os.write(adj, b"1000")
        finally:
            os.close(adj)
    except OSError:
        pass
    if config.get("idle_birth"):
        # Born at idle priority: a warm worker is made with spare CPU only, never at the
        # expense of running invocations. The supervisor restores SCHED_OTHER from outside
        # when it hands the worker an invocation (it can: it is root).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    # In a new pid namespace the parent is outside it and getppid() is 0. If the zygote died
    # before the prctl, the supervisor has closed its end of the channel: we exit on EOF.
    if os.getppid() not in (config["zygote_pid"], 0):
        os._exit(70)  # the zygote died between fork and prctl
    # The zygote's SIGCHLD plumbing must not leak into the function.
    signal.set_wakeup_fd(-1)
    # The C functions under the signal module: its wrappers convert every previous handler
    # into an enum member, which costs a forked child dozens of copy-on-write page faults.
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        _signal.signal(int(sig), _signal.SIG_DFL)
    _signal.signal(int(signal.SIGINT), _signal.default_int_handler)

    # fds: 0 /dev/null, 1 stdout pipe, 2 stderr pipe, 3 channel, nothing else (the shared
    # network namespace's fd survives only until the namespaces are entered).
    netns_fd = int(config.get("netns_fd", -1))
    alive_fd = int(config.get("alive_fd", -1))
    devnull = os.open(os.devnull, os.O_RDONLY)
    moved = {}
    for fd in (channel_fd, stdout_fd, stderr_fd, devnull):
        # Move out of the way of 0-3 first, so dup2 below never clobbers a source.
        moved[fd] = os.dup(fd) if fd <= CHANNEL_FD else fd
    if 0 <= netns_fd <= CHANNEL_FD:
        netns_fd = os.dup(netns_fd)
    if 0 <= alive_fd <= CHANNEL_FD:
        alive_fd = os.dup(alive_fd)
    os.dup2(moved[devnull], 0)
    os.dup2(moved[stdout_fd], 1)
    os.dup2(moved[stderr_fd], 2)
    os.dup2(moved[channel_fd], CHANNEL_FD)
    template_fd = -1
    if config.get("isolation") is not None:
        from sandbox import isolation

        template_fd = isolation.template_fd()  # the zygote's; closed once joined
    _linux.close_fds_except((0, 1, 2, CHANNEL_FD) + ((netns_fd,) if netns_fd >= 0 else ())
                            + ((alive_fd,) if alive_fd >= 0 else ())
                            + ((template_fd,) if template_fd >= 0 else ()))
    _mark("process")

    def join_cgroups() -> None:
        _linux.join_cgroups(config.get("cgroup_procs", ()))

    isolation_config = config.get("isolation")
    scratch = config.get("scratch")
    if isolation_config is None and scratch:
        # No private tmpfs without isolation: the runtime's scratch directory instead.
        os.chdir(scratch)
        os.environ["HOME"] = os.environ["TMPDIR"] = scratch
    if isolation_config is not None:
        from sandbox import isolation

        ids = isolation.worker_ids(isolation_config, int(config.get("slot", 0)))
        tmp = isolation.apply_layers(
            isolation_config, ids, netns_fd=netns_fd if netns_fd >= 0 else None,
            host_namespaces=config.get("host_namespaces", {}),
            allowed_fds=(0, 1, 2, CHANNEL_FD), join_cgroups=join_cgroups,
            after_drop=lambda: _exit_if_zygote_gone(alive_fd), mark=_mark)
        _posture.update(uid=os.getuid(), gid=os.getgid(), pid_in_namespace=os.getpid(),
                        tmp=tmp, layers=[layer for layer in isolation.LAYERS
                                         if isolation_config.enabled(layer)])
    else:
        join_cgroups()
        _exit_if_zygote_gone(alive_fd)
        _mark("cgroups")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _exit_if_zygote_gone(alive_fd: int) -> None:
    """The zygote holds the write end of the "alive" pipe and never writes: readable means
    end-of-file, i.e. the zygote died (maybe before our death signal was armed). In a pid
    namespace getppid() is 0 whatever happens, so the pipe is the only witness."""
    if alive_fd < 0:
        return
    readable, _, _ = select.select([alive_fd], [], [], 0)
    os.close(alive_fd)
    if readable:
        os._exit(70)


_posture: dict[str, Any] = {}


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- invocation ---------------------------------------------------------------------------------

_loaded: dict[str, Callable[..., Any]] = {}
#: the worker's CPU time when it reported ready (its birth's share)
_cpu_at_ready = [0.0]


def _load(fn: Mapping[str, Any]) -> Callable[..., Any]:
    key = fn["key"]
    cached = _loaded.get(key)
    if cached is not None:
        return cached
    kind, module_name, attr = fn["kind"], fn["module"], fn["attr"]
    if kind in ("source", "file"):
        # The code came over the channel, compiled once by the supervisor (our own marshal,
        # supervisor to worker: trusted); compiled here only when that failed, to report the
        # SyntaxError. A worker never reads a function's file.
        name = "__sandbox_function__" if kind == "source" else module_name
        module = types.ModuleType(name)
        module.__file__ = (f"<function {fn['name']}: {fn['path']}>" if fn.get("path")
                           else f"<function {fn['name']}>")
        sys.modules[name] = module
        code = (marshal.loads(fn["code"]) if fn.get("code")
                else compile(fn["source"], module.__file__, "exec"))
        exec(code, module.__dict__)
    elif kind in ("directory", "zip"):
        entry = _unpack(fn)
        if entry not in sys.path:
            sys.path.insert(0, entry)
        module = importlib.import_module(module_name)
    elif kind == "ref":
        module = importlib.import_module(module_name)
    else:
        raise ImportError(f"unknown function kind {kind!r}")
    try:
        handler = getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module_name or module.__file__!r} has no function "
                             f"{attr!r}") from None
    if not callable(handler):
        raise TypeError(f"{attr!r} is not callable")
    _loaded[key] = handler
    return handler  # type: ignore[no-any-return]


def _unpack(fn: Mapping[str, Any]) -> str:
    """Write a bundle's files (sent with the invocation) under this worker's private tmp
    directory, once per version; the ``sys.path`` entry to import them from."""
    base = os.path.join(os.environ.get("TMPDIR") or "/tmp", ".function", fn["key"][-16:])
    entry = os.path.join(base, fn["entry"])
    if not os.path.exists(entry):
        for relative, data in msgpack.unpackb(fn["archive"], raw=False):
            path = os.path.normpath(os.path.join(base, relative))
            if not path.startswith(base + os.sep):
                raise ImportError(f"bad path {relative!r} in the function's bundle")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
    return entry


def _decode_event(data: bytes, content_type: str) -> Any:
    if content_type == JSON:
        return json.loads(data) if data else None
    return msgpack.unpackb(data, raw=False, strict_map_key=False) if data else None


def _encode(value: Any, content_type: str) -> bytes:
    if content_type == JSON:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    data: bytes = msgpack.packb(value, use_bin_type=True)
    if isinstance(value, dict | list | tuple):
        # The supervisor decodes maps with str/bytes keys only (other keys would allow
        # hash-collision floods): say so here, as the function's error, not as a crash.
        try:
            msgpack.unpackb(data, raw=False, strict_map_key=True)
        except ValueError as exc:
            raise TypeError(f"{exc}: dict keys must be str or bytes") from None
    return data


def _apply_rlimits(limits: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    def set_limit(which: int, value: int | None) -> None:
        if value is None:
            return
        _, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(which, (value, value))

    cpu = limits.get("cpu_time_s")
    if cpu is not None:
        # The kernel counts whole seconds of the process's life; the supervisor's watchdog is
        # the precise bound. Only the soft limit (SIGXCPU): lowering the hard one would leave
        # a reused worker, which cannot raise it again without privileges, unable to give
        # its next invocation a budget (EPERM).
        soft = int(_cpu_s() + cpu) + 1
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
    set_limit(resource.RLIMIT_NOFILE, limits.get("max_open_files"))
    set_limit(resource.RLIMIT_FSIZE, limits.get("max_file_size_bytes"))
    if not config.get("memory_cgroup") and limits.get("memory_bytes") is not None:
        set_limit(resource.RLIMIT_DATA, limits["memory_bytes"])
    if os.getuid() != 0 and limits.get("max_processes") is not None:
        set_limit(resource.RLIMIT_NPROC, limits["max_processes"])


def _describe(exc: BaseException) -> tuple[str, str, str]:
    cls = type(exc)
    plain = cls.__module__ in ("builtins", "__main__", "__sandbox_function__")
    name = cls.__qualname__ if plain else f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except BaseException:  # a hostile __str__
        message = f"<{name} with an unprintable message>"
    if len(message) > _MAX_TEXT:
        message = message[:_MAX_TEXT] + "…[truncated]"
    try:
        # Our own frames (loading, calling) are noise to the function's author.
        te = traceback.TracebackException.from_exception(exc)
        te.stack = traceback.StackSummary.from_list(
            [f for f in te.stack if f.filename != __file__])
        tb = "".join(te.format())
    except BaseException:
        tb = ""
    if len(tb) > _MAX_TEXT:
        tb = "…[truncated]" + tb[-_MAX_TEXT:]  # the end of a traceback matters most
    return name, message, tb


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:
            pass
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except BaseException:
            pass


def _iterate(value: Any) -> Iterator[Any] | None:
    """The values to stream, if the handler returned a generator (sync or async)."""
    if isinstance(value, types.GeneratorType):
        return value
    if isinstance(value, types.AsyncGeneratorType):
        import asyncio

        agen = value

        def drive() -> Iterator[Any]:
            loop = asyncio.new_event_loop()
            try:
                while True:
                    try:
                        yield loop.run_until_complete(agen.__anext__())
                    except StopAsyncIteration:
                        return
            finally:
                loop.close()

        return drive()
    return None


def _invoke(sock: Any, msg: Mapping[str, Any], config: Mapping[str, Any],
            received_ns: int = 0) -> None:
    """Run one invocation and send exactly one terminal frame.

    The frame carries the call's timeline on our clock (``time.monotonic_ns()``, the
    supervisor's too): invoke received, handler loaded (and event decoded), handler returned
    (or its generator finished), result encoded.
    """
    now = time.monotonic_ns
    marks = [received_ns or now(), 0, 0, 0]
    limits: dict[str, Any] = msg["limits"]
    content_type: str = msg["ct"]
    cap = limits.get("max_result_bytes")
    timeout = msg.get("timeout")
    deadline = None if timeout is None else time.monotonic() + timeout
    fn = msg["fn"]
    terminal: dict[str, Any]
    try:
        _apply_rlimits(limits, config)
        handler = _load(fn)
        event = _decode_event(msg["event"], content_type)
        context = Context(msg["id"], fn["name"], fn["version"], limits, deadline,
                          msg.get("trace"))
        marks[1] = now()
        value = handler(event, context)
        if isinstance(value, types.CoroutineType):
            import asyncio

            value = asyncio.run(value)
        chunks = _iterate(value)
        if chunks is not None:
            total = 0
            for item in chunks:
                try:
                    data = _encode(item, content_type)
                except Exception as exc:
                    raise _EncodeError(exc) from exc
                total += len(data)
                if cap is not None and total > cap:
                    raise _OutputLimit(f"streamed chunks exceed max_result_bytes={cap} "
                                       f"(at least {total} bytes)")
                _send(sock, {"t": "chunk", "data": data})
            marks[2] = marks[3] = now()
            terminal = {"t": "result", "data": b"", "streamed": True}
        else:
            marks[2] = now()
            try:
                data = _encode(value, content_type)
            except Exception as exc:
                raise _EncodeError(exc) from exc
            if cap is not None and len(data) > cap:
                raise _OutputLimit(f"result is {len(data)} bytes, over max_result_bytes={cap}")
            marks[3] = now()
            terminal = {"t": "result", "data": data, "streamed": False}
    except _OutputLimit as exc:
        terminal = {"t": "failed", "type": "OutputLimitExceeded", "message": str(exc),
                    "traceback": "", "output_limit": True}
    except _EncodeError as exc:
        inner = exc.__cause__ or exc
        name, message, _ = _describe(inner)
        kind = "JSON" if content_type == JSON else "msgpack"
        terminal = {"t": "failed", "type": "ResultEncodingError",
                    "message": f"the result cannot be encoded as {kind}: {name}: {message}",
                    "traceback": "", "output_limit": False}
    except BaseException as exc:
        name, message, tb = _describe(exc)
        terminal = {"t": "failed", "type": name, "message": message, "traceback": tb,
                    "output_limit": False}
    _flush_stdio()
    # One getrusage each: peak resident set of the worker, CPU of the worker and of the
    # children it reaped (what the supervisor reports for an OK call without reading cgroupfs).
    own = resource.getrusage(_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    last = marks[0]
    for i in range(1, 4):  # a failure skipped the rest: those phases took no time
        last = marks[i] = marks[i] or last
    terminal["marks"] = marks
    terminal["rss"] = own.ru_maxrss * 1024
    # Since ready: the birth is not this invocation's (for a reused worker the supervisor
    # measures each invocation by difference).
    terminal["cpu"] = max(0.0, own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
                          - _cpu_at_ready[0])
    _send(sock, terminal)


class _OutputLimit(Exception):
    pass


class _EncodeError(Exception):
    pass


class _Discard:
    """A channel that drops what is sent: for the warm-up run."""

    def sendall(self, data: bytes) -> None:
        pass


_WARM_UP_SOURCE = "def handler(event, context):\n    return [event, context.invocation_id]\n"
#: Compiled when the zygote imports this module, so no birth compiles it again.
_WARM_UP_CODE = marshal.dumps(compile(_WARM_UP_SOURCE, "<function warm-up>", "exec"))


def _warm_up(config: Mapping[str, Any]) -> None:
    """Run the invocation path once on a trivial function before reporting ready.

    A fresh fork shares every page with its zygote; the first run of the path (decoding,
    compiling, calling, encoding) writes to many of them (reference counts, caches) and pays a
    copy-on-write fault for each. Paying them here, at birth (idle priority), keeps them off
    the invocation. Nothing of the run survives it.
    """
    fn = {"key": "__warm_up__", "name": "warm-up", "version": 0, "kind": "source",
          "module": "", "attr": "handler", "path": "", "source": _WARM_UP_SOURCE,
          "code": _WARM_UP_CODE}
    msg = {"id": "warm-up", "fn": fn, "event": msgpack.packb({"x": [1, 2.5, "s", b"b"]}),
           "ct": MSGPACK, "limits": {}, "timeout": None, "last": False}
    _invoke(_Discard(), msg, config)
    _loaded.pop("__warm_up__", None)
    sys.modules.pop("__sandbox_function__", None)


def main(channel_fd: int, stdout_fd: int, stderr_fd: int, config: Mapping[str, Any]) -> None:
    """The worker's whole life. Called in the zygote's child; never returns."""
    code = 0
    try:
        if config.get("received_ns"):
            _phases.append(["request", int(config["received_ns"]), 0])
        _mark("forked")
        _birth(channel_fd, stdout_fd, stderr_fd, config)
        sock = socket.socket(fileno=CHANNEL_FD)
        sock.setblocking(True)
        _warm_up(config)
        _mark("warm_up")
        _send(sock, {"t": "ready", "pid": os.getpid(), "rss": _rss_bytes(),
                     "posture": _posture, "phases": _phases})
        born = resource.getrusage(_SELF)
        _cpu_at_ready[0] = born.ru_utime + born.ru_stime
        gc.enable()
        while True:
            try:
                msg = _recv_message(sock)
            except (EOFError, OSError):
                break  # the supervisor let go of this worker
            if msg.get("t") != "invoke":
                break
            _invoke(sock, msg, config, time.monotonic_ns())
            if msg.get("last", True):
                # Our teardown (memory, namespaces, mounts) yields the CPU to the calls that
                # run meanwhile: nothing waits for it but the reaper.
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
                break
            if os.getpid() == 1:
                # pid 1 of its namespace: whatever this invocation left running dies now
                # (setsid'd, double-forked or not), before the next one starts.
                from sandbox import isolation

                isolation.end_namespace_processes()
    except BaseException:
        try:
            traceback.print_exc()
            _flush_stdio()
        finally:
            code = 71
    finally:
        os._exit(code)
