"""The ``sandbox`` command.

``sandbox run PATH.py:FUNCTION`` runs one invocation locally (like a local Lambda invoke) and
prints one JSON object: ``outcome``, ``result``, ``error``, ``stdout``, ``stderr``, ``stats``.
It exits 0 exactly when the outcome is ``OK``; 1 for any other outcome; 2 for bad arguments
(one line on stderr naming the argument, never a traceback).

The gRPC subcommands (``serve``, ``deploy``, ``invoke``, ``functions``, ``info``,
``invocations``, ``invocation``), ``doctor`` and ``bench`` are added by their modules.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from sandbox import __version__
from sandbox.limits import parse_size

__all__ = ["main"]

EXIT_OK = 0
EXIT_OUTCOME = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the argument, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _modules(text: str) -> list[str]:
    mods = [m.strip() for m in text.split(",") if m.strip()]
    for m in mods:
        if not all(part.isidentifier() for part in m.split(".")):
            raise argparse.ArgumentTypeError(f"{m!r} is not a module name")
    return mods


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dump_json(data: Any) -> str:
    """The JSON of a result: bytes become ``{"$base64": ...}``, non-string keys strings."""
    return json.dumps(data, default=_json_default, ensure_ascii=False)


def _target(text: str) -> tuple[Path, str]:
    path, sep, function = text.rpartition(":")
    if not sep or not path or not function:
        raise argparse.ArgumentTypeError(f"expected PATH.py:FUNCTION, got {text!r}")
    if not function.isidentifier():
        raise argparse.ArgumentTypeError(f"{function!r} is not a function name")
    p = Path(path)
    if p.suffix != ".py":
        raise argparse.ArgumentTypeError(f"{path!r} is not a .py file")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{path!r} does not exist")
    return p, function


def _event(text: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {text[1:]!r}: {exc.strerror}") \
                from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run", help="run one invocation of a function in a sandboxed worker and print JSON",
        description="Run PATH.py:FUNCTION once in a fresh sandboxed worker; print one JSON "
                    "object; exit 0 exactly when the outcome is OK.")
    run.add_argument("target", type=_target, metavar="PATH.py:FUNCTION")
    run.add_argument("--event", type=_event, default=None, metavar="JSON",
                     help="the event as JSON (or @FILE, or - for stdin); default null")
    run.add_argument("--timeout", type=_positive_float, metavar="SECONDS",
                     help="wall-clock timeout (default 30)")
    run.add_argument("--memory", type=_size, metavar="SIZE",
                     help="memory limit, e.g. 256MiB, 1G (default 512MiB)")
    run.add_argument("--cpu", type=_positive_float, metavar="SECONDS", help="CPU-time limit")
    run.add_argument("--preload", type=_modules, default=[], metavar="MOD,MOD...",
                     help="modules the zygote imports before forking the worker")
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from sandbox.errors import SandboxError
    from sandbox.limits import Limits
    from sandbox.outcome import Outcome
    from sandbox.runtime import Runtime

    path, function = args.target
    try:
        limits = Limits(wall_timeout_s=args.timeout, memory_bytes=args.memory,
                        cpu_time_s=args.cpu)
    except (TypeError, ValueError) as exc:
        print(f"sandbox run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    profiles = {"run": args.preload} if args.preload else None
    try:
        # On the command line the user is the operator: the flags are the function's own
        # limits (which replace the defaults, above or below them), not a request (which may
        # only tighten them). One call: no warm worker is kept.
        with Runtime(profiles, min_idle=0, max_idle=0) as rt:
            rt.register("run", path=path, handler=function, limits=limits,
                        profile="run" if args.preload else "default")
            result = rt.invoke("run", args.event)
    except SandboxError as exc:
        print(f"sandbox run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(dump_json(result.to_dict()))
    return EXIT_OK if result.outcome is Outcome.OK else EXIT_OUTCOME


def _bench(args: argparse.Namespace) -> int:
    return _run_bench(args.args)


def _run_bench(argv: list[str]) -> int:
    try:
        from benchmarks.cli import main as bench_main
    except ImportError as exc:
        print(f"sandbox bench: error: the benchmarks are not installed ({exc}); install with "
              "pip install -e '.[bench]' from a checkout", file=sys.stderr)
        return EXIT_USAGE
    code: int = bench_main(argv)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sandbox", description="Run untrusted Python functions in cheap, "
                     "isolated, resource-limited processes.")
    parser.add_argument("--version", action="version", version=f"sandbox {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log to stderr (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    bench = sub.add_parser(
        "bench", help="run the benchmarks (sustained, births, calls, coldstart, latency, "
        "throughput, timeouts, memory, paper, observability, executor, async, fleet, soak; "
        "`sandbox bench --help` lists them)",
        add_help=False,
        description="Same as `python -m benchmarks`; `sandbox bench --help` for its options.")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_bench)
    for module_name in ("sandbox.remote_cli", "sandbox.doctor"):
        try:
            module = __import__(module_name, fromlist=["add_subcommands"])
        except ImportError:
            continue
        add = getattr(module, "add_subcommands", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after `bench` belongs to the benchmarks' own parser (--help included).
        return _run_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose > 1 else logging.INFO, stream=sys.stderr,
            format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
