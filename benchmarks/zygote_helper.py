"""A minimal fork zygote for the paper suite: `python -m benchmarks.zygote_helper MOD [MOD...]`.

Imports the modules, calls `gc.freeze()`, writes "ready\\n", then for each line on stdin forks a
child that imports the modules again (free: they are in sys.modules), writes "ok <pid>\\n" and
`os._exit`s; the zygote reaps it before reading the next line. Single-threaded by construction;
exits at stdin EOF. This is the SOCK/Forklift idea in its plainest form, used when our runtime
is not available, and as the lower bound next to it.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys


def main(modules: list[str]) -> int:
    for name in modules:
        importlib.import_module(name)
    gc.freeze()
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for _line in sys.stdin.buffer:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for name in modules:
                    importlib.import_module(name)
                os.write(1, b"ok %d\n" % os.getpid())
                code = 0
            finally:
                os._exit(code)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
