"""The public names: every one in ``__all__`` resolves, and the zygote stays lean."""

from __future__ import annotations

import subprocess
import sys

import sandbox


def test_all_names_resolve() -> None:
    for name in sandbox.__all__:
        assert getattr(sandbox, name) is not None, name
    assert sorted(sandbox.__all__) == sandbox.__all__
    assert {"Runtime", "AsyncRuntime", "Limits", "Outcome", "InvocationResult",
            "Context"} <= set(sandbox.__all__)


def test_importing_the_package_loads_no_runtime_machinery() -> None:
    """A zygote imports ``sandbox``: the package itself must not pull in asyncio or gRPC."""
    code = ("import sys, sandbox.zygote, sandbox.worker; "
            "print(sorted(m for m in ('asyncio', 'grpc', 'sandbox.runtime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": ""}, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
