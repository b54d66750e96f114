"""The fork-and-reap floor: `python -I -S benchmarks/fork_floor.py N`.

A small, clean interpreter (isolated mode, no `site`, nothing imported beyond what Python
itself needs) that forks N children one after the other: `os.fork()`, the child `os._exit(0)`,
the parent `os.waitpid`. Nothing of a process pool, no pipe, no work in the child: the least a
"process per call" can cost on this machine, and a ceiling no single-use worker can beat.

Protocol (so several loops start together and their start-up is not timed): writes "ready\\n",
waits for a line on stdin, runs the loop, writes one JSON line
`{"t0": ns, "t1": ns, "lat": [ns, ...]}` (`time.monotonic_ns()`, one system-wide clock, so the
harness can put several loops on one time line) and exits.
"""

import json
import os
import sys
import time


def main(n: int) -> int:
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    if not sys.stdin.readline():
        return 1
    lat = [0] * n
    clock = time.perf_counter_ns
    t0 = time.monotonic_ns()
    for i in range(n):
        start = clock()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        lat[i] = clock() - start
    t1 = time.monotonic_ns()
    out.write(json.dumps({"t0": t0, "t1": t1, "lat": lat}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
