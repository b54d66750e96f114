"""The server's logs: text for a terminal, or one JSON object per line; and the access log.

``sandbox serve --log-format text`` (the default) writes ``time pid level logger: message``
lines; ``--log-format json`` writes one JSON object per line on stderr::

    {"ts": "2026-12-02T14:11:05.123456Z", "level": "info", "logger": "sandbox.access",
     "pid": 4242, "event": "invocation", "message": "...", "id": "...", "function": "add", ...}

Every line has ``ts``, ``level``, ``logger``, ``pid``, ``event`` and ``message``; a line that
records an event carries the event's own fields beside them (a log call passes them as
``extra={"event": NAME, "fields": {...}}``). Other lines have ``"event": "log"``.

Events: ``start`` (the runtime, with its isolation summary), ``listening``, ``zygote_start``,
``zygote_replace``, ``birth_failed``, ``auth_reload``, ``drain``, ``stop``, and
``invocation``: one line per invocation, written by :class:`AccessLog` when it ends, with
``id``, ``function``, ``version``, ``outcome``, ``queue_s``, ``startup_s``, ``run_s``,
``cpu_s``, ``peak_memory_bytes``, ``cold_start``, ``peer`` (and ``trace_id``, ``error_type``
when there is one). Never the event, the result, the error's message or captured output: those
are the caller's data.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import sys
from typing import IO, TYPE_CHECKING, Any

from sandbox.observe import InvocationRecord, Observer

if TYPE_CHECKING:
    from sandbox.outcome import InvocationResult

__all__ = ["LOG_FORMATS", "AccessLog", "JsonFormatter", "configure"]

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
#: the access log's logger: one record per invocation, at INFO
ACCESS_LOGGER = "sandbox.access"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for key, value in fields.items():
                line.setdefault(key, value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def configure(log_format: str = "text", level: str | int = "info",
              stream: IO[str] | None = None) -> logging.Handler:
    """Send the process's logs to ``stream`` (stderr) in ``log_format``; returns the handler.

    Raises:
        ValueError: an unknown format or level.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got "
                         f"{log_format!r}")
    numeric = level if isinstance(level, int) else logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    return handler


class AccessLog(Observer):
    """One ``invocation`` record per invocation, at INFO on ``sandbox.access`` (nothing is
    built when that level is off).

    The record is written two loop turns after the call ends, like the worker's teardown: the
    callbacks that deliver the result to its caller go first, so formatting and writing the
    line are not on the call's path. Lines keep the order in which calls ended.
    """

    def __init__(self, logger: logging.Logger | None = None, node: str = "") -> None:
        self.log = logger if logger is not None else logging.getLogger(ACCESS_LOGGER)
        #: the server's name in a fleet, written as ``node`` in every line (when set)
        self.node = node

    def invocation_finished(self, record: InvocationRecord, result: InvocationResult) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        s = result.stats
        peer = record.origin.peer if record.origin is not None else ""
        fields: dict[str, Any] = {
            "id": record.id, "function": record.function, "version": record.version,
            "outcome": result.outcome.value, "queue_s": round(s.queue_s, 6),
            "startup_s": round(s.startup_s, 6), "run_s": round(s.run_s, 6),
            "cpu_s": None if s.cpu_s is None else round(s.cpu_s, 6),
            "peak_memory_bytes": s.peak_memory_bytes, "cold_start": s.cold_start,
            "peer": peer,
        }
        if self.node:
            fields["node"] = self.node
        if record.trace_id is not None:
            fields["trace_id"] = record.trace_id
        if result.error is not None:
            fields["error_type"] = result.error.type
        args = (record.id, record.function, record.version, result.outcome.value,
                s.queue_s * 1e3, s.startup_s * 1e3, s.run_s * 1e3,
                " cold" if s.cold_start else "", f" from {peer}" if peer else "")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(args, fields)
        else:
            loop.call_soon(loop.call_soon, self._write, args, fields)

    def _write(self, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
        self.log.info("invocation %s %s@%d %s queue %.3f ms start-up %.3f ms run %.3f ms%s%s",
                      *args, extra={"event": "invocation", "fields": fields})

    def invocation_failed(self, record: InvocationRecord, error: BaseException) -> None:
        if not self.log.isEnabledFor(logging.INFO):
            return
        peer = record.origin.peer if record.origin is not None else ""
        self.log.info("invocation %s %s@%d failed: %s", record.id, record.function,
                      record.version, type(error).__name__,
                      extra={"event": "invocation", "fields": {
                          "id": record.id, "function": record.function,
                          "version": record.version, "outcome": None,
                          "error_type": type(error).__name__, "peer": peer}})
