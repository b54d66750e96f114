"""A bare gRPC echo server, the floor of any gRPC method: `python -m benchmarks.echo_server`.

Generic handlers with bytes in and bytes out (no protoc), on grpc.aio like our servicer:
    /bench.Echo/Unary    unary-unary, returns the request
    /bench.Echo/Stream   bidirectional stream, returns each request in order

Prints its port on the first line of stdout, then serves until its stdin reaches EOF (the
parent closing the pipe or dying), so it never outlives the harness.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"


async def _unary(request: bytes, context: Any) -> bytes:
    return request


async def _stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for request in requests:
        yield request


async def serve(address: str = "127.0.0.1:0") -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    await server.start()
    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()  # returns at EOF
        loop.call_soon_threadsafe(stdin_closed.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    await stdin_closed.wait()
    await server.stop(grace=None)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:0"))
