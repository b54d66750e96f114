"""Benchmarks: cold start, latency (light load and sustained), throughput, timeouts, worker
births, call phases, memory, the SOCK/Forklift paper, what metrics and access logs cost, and a
fleet (deploy propagation, three replicas vs one); and a soak (hostile sustained load, long:
not part of `all`).

Map of the package (each module one concept)::

    cli.py          `python -m benchmarks` / `sandbox bench`: argument parsing, progress bar
    suites.py       one function per suite, over (methods x preloads x scenarios)
    sustained.py    the sustained suite: no pauses between calls, 1/16/128 callers, ratios
    births.py       the births suite: births/s and the phases of a birth, all layers vs none
    calls.py        the calls suite: the phases of a call (the runtime's own breakdown), light
                    load and sustained, all layers vs none
    observability.py  the observability suite: a gRPC Invoke with metrics + JSON access logs on
                    vs off, same run, light load and sustained; the counters checked
    executors.py    the executor suite: sandbox.Executor beside ProcessPoolExecutor, loky and
                    pebble: a sustained map of a no-op, and what a timeout, an OOM and a
                    segfault cost each (executor_work.py: what their workers run)
    fleet.py        the fleet suite: PostgreSQL + three `sandbox serve` replicas; a deploy
                    through one served by the others (ms), 8 callers over 3 replicas vs 1
    localfleet.py   a local fleet: a temporary PostgreSQL (`Postgres`, also the tests') and N
                    `sandbox serve --store` replicas (`LocalFleet`, also examples/fleet.py)
    soak.py         the soak suite: 20,000 calls, 16 callers, 10 % hostile; nothing lost, every
                    outcome right, the supervisor's RSS and fd slopes; no process left
    core.py         the Method interface, the method table, timing and statistics, machine info
    peers.py        the methods we compare against: fresh interpreters, multiprocessing, pools,
                    gRPC, the fork-and-reap floor
    ours.py         the `sandbox-*` methods (`sandbox` imported lazily: unavailable is reported)
    workload.py     the function every method runs (also shipped as source to fresh interpreters)
    echo_server.py  a bare gRPC echo server (generic handlers, bytes in/out) run as its own process
    fork_floor.py   a fork + _exit + waitpid loop, run in its own small interpreter
    zygote_helper.py  a plain os.fork zygote for the paper suite when `sandbox` is not available
    report.py       DIR/<suite>.json, .md (table with ratios against the suite's baseline), .png
    headline.py     the targets table (README), from one run's JSON files
    summary.py      DIR/README.md: the targets, every suite's table and plot
    layers.py       fork -> ready with every isolation layer and with none (`births` does more)

Every row says its regime: light load (warm pool before each call) or sustained (no pauses).
This package must stay cheap to import: spawned children import `benchmarks.workload`.
"""
