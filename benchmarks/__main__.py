"""`python -m benchmarks [suite] [--quick] [--out DIR]`."""

import sys

if __name__ == "__main__":  # spawned children import this module as __mp_main__
    from benchmarks.cli import main

    sys.exit(main(sys.argv[1:]))
