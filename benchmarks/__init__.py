"""Benchmarks: cold start, latency, throughput, timeouts, memory, and the SOCK/Forklift paper.

Map of the package (each module one concept)::

    cli.py          `python -m benchmarks` / `sandbox bench`: argument parsing, progress bar
    suites.py       one function per suite, over (methods x preloads x scenarios)
    core.py         the Method interface, the method table, timing and statistics, machine info
    peers.py        the methods we compare against: fresh interpreters, multiprocessing, pools, gRPC
    ours.py         the `sandbox-*` methods (`sandbox` imported lazily: unavailable is reported)
    workload.py     the function every method runs (also shipped as source to fresh interpreters)
    echo_server.py  a bare gRPC echo server (generic handlers, bytes in/out) run as its own process
    zygote_helper.py  a plain os.fork zygote for the paper suite when `sandbox` is not available
    report.py       DIR/<suite>.json, .md (table with ratios against the suite's baseline), .png

This package must stay cheap to import: spawned children import `benchmarks.workload`.
"""
