"""A fleet on this machine: a temporary PostgreSQL and three `sandbox serve` replicas sharing it.

    python examples/fleet.py                      # start, show the spread, stay up until Ctrl-C
    python examples/fleet.py --calls 30 --exit    # the same, then tear down at once

What it does: starts PostgreSQL in a temporary directory (Debian's `postgresql` package; as
root it runs the server as the `postgres` user) and three replicas, `sandbox serve --store
postgresql://... --node-name nX --listen 127.0.0.1:0`; deploys a function through replica n1
only; invokes it N times through one client balanced round_robin over the three and prints
which replica (`result.stats.node`) served how many calls. Then, unless `--exit`, it prints the
target to use from another terminal (`sandbox invoke --target ipv4:... hello ...`) and keeps the
fleet up until Ctrl-C (or SIGTERM), when it stops every replica (SIGTERM, in-flight calls
finish), then PostgreSQL, and removes the temporary directory.

Needs: `pip install -e .` in a checkout (psycopg comes with it) and PostgreSQL's server
(`apt-get install postgresql`). Runs as root (every isolation layer) or as an ordinary user
(the layers the kernel allows it). The helper it uses is `benchmarks/localfleet.py`.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

try:
    from benchmarks.localfleet import LocalFleet, unavailable
except ImportError:  # run from a checkout that is not installed: the package is next door
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.localfleet import LocalFleet, unavailable

from sandbox.client import Client
from sandbox.errors import FunctionNotFound

HELLO = '''\
def handler(event, context):
    name = (event or {}).get("name", "world")
    return f"Hello, {name}!"
'''
#: a function to deploy by hand (its `handler`)
EXAMPLE = Path(__file__).resolve().parent / "hello.py"
#: Deadlock guard: a deploy reaches the other replicas in tens of milliseconds.
PROPAGATION_TIMEOUT_S = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Start a local fleet: PostgreSQL + sandbox serve "
                                "replicas sharing it; deploy through one, call through all.")
    p.add_argument("--replicas", type=int, default=3, help="how many (default: 3)")
    p.add_argument("--calls", type=int, default=30, metavar="N",
                   help="invocations through the balanced client (default: 30)")
    p.add_argument("--exit", action="store_true",
                   help="tear the fleet down after the calls instead of waiting for Ctrl-C")
    return p.parse_args(argv)


def until_served(client: Client, name: str) -> None:
    """Ask one replica for ``name`` until it has it (the deploy reached it)."""
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while True:
        try:
            client.function(name)
            return
        except FunctionNotFound:
            if time.monotonic() > deadline:
                raise


def until_balanced(client: Client, nodes: set[str]) -> None:
    """round_robin spreads calls over the replicas it is connected to: reach every one."""
    seen: set[str] = set()
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while seen != nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the client reached only {sorted(seen)} of {sorted(nodes)}")
        seen.add(client.info()["node"])


def demo(fleet: LocalFleet, calls: int) -> dict[str, int]:
    first, *others = fleet.names
    with Client(fleet.replicas[first].target, timeout=30) as direct:
        fn = direct.deploy("hello", HELLO)
    deployed = time.monotonic()
    print(f"deployed hello v{fn.version} through {first} only")
    for node in others:
        with Client(fleet.replicas[node].target, timeout=30) as other:
            until_served(other, "hello")
            print(f"  {node} serves it (seen {(time.monotonic() - deployed) * 1000:.0f} ms after "
                  "the deploy returned)")
    with Client(fleet.target, timeout=30) as client:
        until_balanced(client, set(fleet.names))
        served: collections.Counter[str] = collections.Counter()
        for i in range(calls):
            result = client.invoke("hello", {"name": f"call {i}"})
            assert result.unwrap() == f"Hello, call {i}!", result
            served[result.stats.node] += 1
    print(f"{calls} calls through one round_robin client over {len(fleet.names)} replicas:")
    for node in fleet.names:
        print(f"  {node}: {served[node]} calls")
    return dict(served)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = unavailable()
    if reason is not None:
        print(f"cannot start PostgreSQL here: {reason}", file=sys.stderr)
        return 2
    # Ctrl-C and a `kill` both tear the fleet down (SIGINT explicitly: a shell starting this
    # in the background would have it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    fleet = LocalFleet(args.replicas)
    try:
        print(f"starting PostgreSQL and {args.replicas} replicas in {fleet.root} ...", flush=True)
        fleet.start()
        assert fleet.postgres is not None
        print(f"PostgreSQL on 127.0.0.1:{fleet.postgres.port}")
        for node in fleet.names:
            r = fleet.replicas[node]
            print(f"  {node}: sandbox serve on {r.target} (log: {r.log_path})")
        demo(fleet, args.calls)
        if not args.exit:
            print(f"\nThe fleet is up. From another terminal:\n"
                  f"  sandbox invoke --target {fleet.target} hello "
                  f"{shlex.quote(json.dumps({'name': 'you'}))}\n"
                  f"  sandbox info --target {fleet.target}\n"
                  f"  sandbox deploy --target {fleet.replicas[fleet.names[-1]].target} greet "
                  f"{shlex.quote(str(EXAMPLE))}    # through one replica: served by all\n"
                  f"  sandbox invoke --target {fleet.target} greet "
                  f"{shlex.quote(json.dumps({'name': 'you'}))}\n"
                  f"or in Python: Client({fleet.target!r})\n"
                  "Ctrl-C stops it.", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C: the teardown goes on
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        fleet.close()
    print("stopped: every replica, PostgreSQL; temporary directory removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
