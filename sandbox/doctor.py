"""``sandbox doctor``: which isolation layers this machine gives, and why not when it does not.

It starts a real runtime in best-effort mode (one zygote, no warm workers) and prints the
report that runtime uses; the same report is in ``Runtime.info()["isolation"]`` and in the
gRPC ``GetInfo``. Exit status 0 when strict mode (every layer) would start here, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

__all__ = ["add_subcommands", "report"]


def report() -> dict[str, Any]:
    """The isolation report of a best-effort runtime on this machine, plus a strict verdict."""
    from sandbox.runtime import Runtime

    with Runtime(isolation="best-effort", min_idle=0) as rt:
        iso = rt.info()["isolation"]
    layers = iso["layers"]
    missing = sorted(name for name, layer in layers.items()
                     if not layer["available"] and not (name == "user_ns" and iso["root"]))
    return {
        "python": platform.python_version(),
        "kernel": iso["kernel"],
        "machine": platform.machine(),
        "root": iso["root"],
        "landlock_abi": iso["landlock_abi"],
        "layers": layers,
        "view": iso["view"],
        "strict_ready": not missing,
        "missing": missing,
    }


def _print_table(data: dict[str, Any]) -> None:
    print(f"sandbox doctor: Linux {data['kernel']} {data['machine']}, Python {data['python']}, "
          f"{'root' if data['root'] else 'not root'}")
    width = max(len(name) for name in data["layers"])
    print(f"  {'layer':<{width}}  available  enabled  detail")
    for name, layer in data["layers"].items():
        print(f"  {name:<{width}}  {'yes' if layer['available'] else 'NO':<9}  "
              f"{'yes' if layer['enabled'] else 'no':<7}  {layer['reason']}")
    view = data["view"]
    if view["minimal"]:
        print("what a function sees: its own root, read-only: " + ", ".join(view["paths"]))
        print(f"  devices {', '.join(view['devices'])}; its own {', '.join(view['private'])};"
              f" hidden {', '.join(view['hidden']) or 'nothing else'}")
    else:
        print("what a function sees: the host's whole filesystem"
              + (", read-only" if view["read_only"] else "")
              + (f"; its own {', '.join(view['private'])}" if view["private"] else ""))
    if data["strict_ready"]:
        print("strict mode: every layer is available")
    else:
        print(f"strict mode would refuse to start: missing {', '.join(data['missing'])} "
              "(best-effort runs without them)")


def _doctor(args: argparse.Namespace) -> int:
    from sandbox.errors import SandboxError

    try:
        data = report()
    except SandboxError as exc:
        print(f"sandbox doctor: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data))
    else:
        _print_table(data)
    return 0 if data["strict_ready"] else 1


def add_subcommands(subparsers: Any) -> None:
    doctor = subparsers.add_parser(
        "doctor", help="report which isolation layers this machine offers",
        description="Detect every isolation layer (namespaces, own uid, filesystem, Landlock, "
                    "seccomp, cgroups) and print whether each is available and enabled, and "
                    "why not. Exit 0 when strict mode would start.")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.set_defaults(func=_doctor)
