"""The function every method runs, and the preload profiles.

`SOURCE` is the one definition of the handler: this module executes it, so the function that
multiprocessing pickles by reference (`benchmarks.workload.handler`) and the source sent to a
fresh interpreter or registered with `sandbox` are the same code. Keep this module free of
third-party imports: spawned children import it.

Events (dicts, JSON- and msgpack-encodable):
    {"op": "echo", ...}                     returns the event
    {"op": "use", "modules": [...]}         imports the modules (free when preloaded) and uses them
    {"op": "sleep", "s": 0.5}               sleeps, returns None
    {"op": "hang"}                          never returns (a busy loop, so it holds the GIL)
    {"op": "collect", "s": 0.2}             a full gc (dirties what it touches), then sleeps
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

PROFILES: dict[str, list[str]] = {
    "none": [],
    "stdlib": [
        "asyncio",
        "json",
        "decimal",
        "email",
        "email.message",
        "http.client",
        "urllib.request",
        "xml.etree.ElementTree",
    ],
    # numpy plus widely used, import-heavy packages (the `bench` extra). `pydantic.main` because
    # `import pydantic` alone is lazy and defers most of its cost to the first attribute access.
    "heavy": ["numpy", "pandas", "requests", "pydantic", "pydantic.main"],
}

SOURCE = """
def handler(event, context=None):
    op = event.get("op", "echo")
    if op == "echo":
        return event
    if op == "use":
        import importlib
        mods = {name: importlib.import_module(name) for name in event.get("modules", ())}
        used = 0
        if "json" in mods:
            used += len(mods["json"].dumps(event))
        if "numpy" in mods:
            used += int(mods["numpy"].arange(16).sum())
        if "pandas" in mods:
            used += int(mods["pandas"].Series([1, 2, 3]).sum())
        if "pydantic" in mods:
            used += len(mods["pydantic"].BaseModel.__name__)
        return {"modules": len(mods), "used": used}
    if op == "sleep":
        import time
        time.sleep(event.get("s", 0.0))
        return None
    if op == "collect":
        import gc, time
        gc.collect()
        time.sleep(event.get("s", 0.0))
        return None
    if op == "hang":
        while True:
            pass
    raise ValueError("unknown op %r" % (op,))
"""

exec(compile(SOURCE, __file__ + ":SOURCE", "exec"))  # defines handler()

handler: Any  # set by the exec above


def preload(modules: list[str]) -> None:
    """Pool initializer: import the profile's modules once per worker."""
    for name in modules:
        importlib.import_module(name)


def echo(event: Any) -> Any:
    return event


def child_main(conn: Any, event: Any) -> None:
    """Entry of a `multiprocessing.Process` per call: run the handler, send the result back."""
    try:
        conn.send(handler(event))  # noqa: F821  (defined by the exec of SOURCE)
    finally:
        conn.close()


# A fresh interpreter per call: reads the event as JSON on stdin, prints the result as JSON.
FRESH_SCRIPT = (
    "import json, sys\n"
    + SOURCE
    + "\nevent = json.loads(sys.stdin.buffer.read())\n"
    + "sys.stdout.write(json.dumps(handler(event)))\n"
)


def warm(delay_s: float) -> int:
    """Pool warm-up task: hold a worker a moment so every worker gets one; return its pid."""
    import os
    import time

    time.sleep(delay_s)
    return os.getpid()


def collect_pid(delay_s: float) -> int:
    """Run a full collection in a pool worker, then behave like `warm`."""
    import gc

    gc.collect()
    return warm(delay_s)


def sleep(delay_s: float) -> None:
    import time

    time.sleep(delay_s)


def idle_child(conn: Any, collect: bool, modules: list[str]) -> None:
    """An idle worker for the memory suite: optionally run a full collection (as any long-lived
    worker eventually does, dirtying the pages of every tracked object it inherited unless the
    parent called gc.freeze()), report ready, then wait to be told to exit."""
    import gc
    import os

    preload(modules)  # free after a fork from a parent that has them; real work after spawn
    if collect:
        gc.collect()
    conn.send(os.getpid())
    with contextlib.suppress(EOFError):
        conn.recv()
