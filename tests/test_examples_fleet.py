"""examples/fleet.py, run as a reader would in its non-interactive mode (``--calls N --exit``):
PostgreSQL in a temporary directory, three ``sandbox serve`` replicas, a deploy through one,
calls through one round_robin client over the three. It exits 0, names the three nodes with
how many calls each served (all of them), stops everything and removes its directory (the
conftest guard checks that no process is left). Skips, saying why, where PostgreSQL cannot be
started.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from postgres import unavailable

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "fleet.py"
CALLS = 30
#: Deadlock guard: the example takes about six seconds (initdb, three replicas, the calls).
RUN_TIMEOUT_S = 240


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_the_fleet_example_spreads_calls_over_three_replicas(tmp_path: Path) -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    run = subprocess.run([sys.executable, str(EXAMPLE), "--calls", str(CALLS), "--exit"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-4000:]
    served = {node: int(n) for node, n in re.findall(r"^\s+(n\d): (\d+) calls$", out, re.M)}
    assert set(served) == {"n1", "n2", "n3"}, out
    assert sum(served.values()) == CALLS and all(served.values()), served
    for node in ("n2", "n3"):
        assert re.search(rf"^\s+{node} serves it", out, re.M), out
    root = re.search(r"replicas in (\S+) \.\.\.", out)
    assert root is not None, out
    assert not Path(root.group(1)).exists(), "the fleet's temporary directory is left"
    assert out.rstrip().endswith("temporary directory removed"), out
