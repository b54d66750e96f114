"""A demo function: `sandbox run examples/hello.py:handler --event '{"name": "world"}'`."""

import platform


def handler(event, context):
    name = (event or {}).get("name", "world")
    print(f"hello from pid-isolated worker, invocation {context.invocation_id}")
    return {"greeting": f"Hello, {name}!", "python": platform.python_version()}


def countdown(event, context):
    """A generator: each value is streamed as a chunk."""
    for i in range(int(event or 3), 0, -1):
        yield i
