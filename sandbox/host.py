"""What a runtime sets up on the machine, once, before any zygote: the host environment.

:class:`Host` owns the bundle directory (private to the supervisor; stale ones of dead
runtimes swept), the cgroup manager (and the report of what cgroups give), and the isolation
configuration every zygote gets: the layers asked for, the filesystem view (exposed and hidden
paths) and the shared empty network namespace. :meth:`Host.close` undoes it all.

It knows the machine, nothing of pools, functions or calls.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sandbox._logging import get_logger
from sandbox.errors import ConfigurationError, IsolationUnavailable

if TYPE_CHECKING:
    from sandbox.cgroups import CgroupManager
    from sandbox.isolation import IsolationConfig

__all__ = ["BUNDLE_DIR_PREFIX", "Host", "isolation_config", "sweep_stale_bundle_dirs"]

log = get_logger(__name__)

BUNDLE_DIR_PREFIX = "sandbox-bundles-"


class Host:
    """The machine-level setup of one runtime (see the module's docstring).

    Args:
        isolation: ``"strict"``, ``"best-effort"``, ``"off"``, an ``IsolationConfig``, or
            None (strict as root, best-effort otherwise).
        cgroups: None (use them when usable), False (never), True (required).
        bundle_dir: where registered bundles are snapshotted (default: a private directory
            under ``/var/tmp``, removed at close).
        hide: directories no worker may see even under an exposed path.
    """

    def __init__(self, *, isolation: Any = None, cgroups: bool | None = None,
                 bundle_dir: str | os.PathLike[str] | None = None,
                 hide: Sequence[str | os.PathLike[str]] = ()) -> None:
        self.isolation: IsolationConfig | None = isolation_config(isolation)
        self.cgroups_wanted = cgroups
        self.bundle_dir_given = bundle_dir is not None
        self.bundle_dir = str(bundle_dir) if bundle_dir is not None else None
        self.hidden = tuple(str(p) for p in hide)
        self.cgroups: CgroupManager | None = None
        self.cgroup_report: dict[str, Any] = {"available": False, "reason": "not started"}
        #: the shared empty network namespace (-1: none; each worker makes its own)
        self.netns_fd = -1

    def setup(self) -> None:
        """Bundle directory, cgroups, then the isolation configuration (which needs both).

        Raises:
            IsolationUnavailable: cgroups required (or strict isolation) but unusable; the
                shared network namespace cannot be made in strict mode.
        """
        self._setup_bundle_dir()
        self._setup_cgroups()
        self._setup_isolation()

    def pool_isolation(self) -> dict[str, Any] | None:
        """The isolation configuration as a zygote takes it (JSON-ready), None for off."""
        cfg = self.isolation
        if cfg is None:
            return None
        iso = dataclasses.asdict(cfg)
        iso["expose"] = list(cfg.expose)
        iso["hide"] = list(cfg.hide)
        return iso

    def birth_config(self) -> dict[str, Any]:
        """What every worker's birth is told of the host: without isolation, its scratch
        directory (cwd, HOME, TMPDIR): private to this runtime, removed at close, never the
        zygote's ``/`` or a ``/tmp`` path another user could have made first."""
        if self.isolation is not None or self.bundle_dir is None:
            return {}
        scratch = os.path.join(self.bundle_dir, "scratch")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        return {"scratch": scratch}

    def close(self) -> None:
        """Remove what :meth:`setup` made (cgroups, the network namespace, the bundle
        directory unless it was given). Idempotent."""
        if self.cgroups is not None:
            self.cgroups.close()
        if self.netns_fd >= 0:
            os.close(self.netns_fd)
            self.netns_fd = -1
        if self.bundle_dir is not None and not self.bundle_dir_given:
            shutil.rmtree(self.bundle_dir, ignore_errors=True)
        elif self.bundle_dir is not None:
            shutil.rmtree(os.path.join(self.bundle_dir, "scratch"), ignore_errors=True)

    # ---------------------------------------------------------------------------------------

    def _setup_bundle_dir(self) -> None:
        if self.bundle_dir is None:
            base = "/var/tmp" if os.path.isdir("/var/tmp") else tempfile.gettempdir()
            swept = sweep_stale_bundle_dirs(base)
            if swept:
                log.info("removed %d bundle dir(s) left by a runtime that died", swept)
            self.bundle_dir = tempfile.mkdtemp(prefix=f"{BUNDLE_DIR_PREFIX}{os.getpid()}-",
                                               dir=base)
        os.makedirs(self.bundle_dir, exist_ok=True)
        # The supervisor's alone: workers get a function's code over their channel.
        os.chmod(self.bundle_dir, 0o700)

    def _setup_cgroups(self) -> None:
        if self.cgroups_wanted is False:
            self.cgroup_report = {"available": False, "enabled": False,
                                  "reason": "disabled by configuration"}
            return
        from sandbox import cgroups as cg

        manager = cg.CgroupManager(prefix="sandbox")
        report = manager.report.to_dict()
        if not manager.available:
            if self.cgroups_wanted:
                raise IsolationUnavailable(f"cgroups were required but are not usable: "
                                           f"{manager.report.reason}")
            log.warning("cgroups unavailable (%s): memory is limited by rlimit only and "
                        "double-forked grandchildren may escape the tree kill",
                        manager.report.reason)
            if os.geteuid() != 0:
                report["reason"] = f"{report['reason']}; {cg.delegation_hint()}"
            self.cgroup_report = {**report, "available": False, "enabled": False}
            return
        swept = manager.sweep_stale()
        if swept:
            log.info("removed %d cgroup(s) left by a supervisor that died", swept)
        self.cgroups = manager
        # Where: as root our own cgroup; otherwise a subtree someone delegated to us.
        self.cgroup_report = {**report, "available": True, "enabled": True,
                              "paths": manager.role_paths, "delegated": os.geteuid() != 0}

    def _setup_isolation(self) -> None:
        cfg = self.isolation
        if cfg is None:
            return
        from sandbox import isolation

        strict = cfg.mode == "strict"
        if strict and self.cgroups is None and self.cgroups_wanted is not False:
            raise IsolationUnavailable(
                "strict isolation needs memory and pids cgroups: "
                f"{self.cgroup_report.get('reason') or 'unavailable'} (use isolation="
                "'best-effort' to run without them)")
        # Workers see the interpreter, our package and the embedding program's import path
        # (so a ref= function and a profile's modules import), never the bundles: a
        # function's code travels over its worker's channel, and the bundle directory is
        # hidden should it be under an exposed one.
        import sandbox as package

        expose = list(cfg.expose)
        for path in [*sys.path, os.path.dirname(package.__file__ or "")]:
            if path and os.path.isdir(path) and path not in expose:
                expose.append(path)
        hide = [*cfg.hide, *(p for p in (self.bundle_dir, *self.hidden) if p)]
        cfg = dataclasses.replace(cfg, expose=tuple(expose), hide=tuple(dict.fromkeys(hide)))
        if cfg.net_ns and not cfg.allow_network:
            try:
                self.netns_fd = isolation.create_empty_netns()
            except OSError as exc:
                if strict and os.geteuid() == 0:
                    raise IsolationUnavailable(f"net_ns: cannot create the shared empty "
                                               f"network namespace: {exc}") from None
                # Not root: no capability here to make one; each worker makes its own,
                # inside the zygote's user namespace (the zygote's probe says whether it can).
                log.info("no shared network namespace (%s): each worker gets its own", exc)
        self.isolation = cfg


def sweep_stale_bundle_dirs(base: str) -> int:
    """Remove ``<base>/sandbox-bundles-<pid>-*`` directories whose runtime (``pid``) is dead;
    returns how many. (A live process that reused the pid keeps them: harmless, swept later.)
    """
    removed = 0
    try:
        entries = list(os.scandir(base))
    except OSError:
        return 0
    for entry in entries:
        rest = entry.name[len(BUNDLE_DIR_PREFIX):]
        pid_text, sep, _ = rest.partition("-")
        if not entry.name.startswith(BUNDLE_DIR_PREFIX) or not sep or not pid_text.isdigit() \
                or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        shutil.rmtree(entry.path, ignore_errors=True)
        removed += not os.path.exists(entry.path)
    return removed


def isolation_config(isolation: Any) -> IsolationConfig | None:
    """The IsolationConfig asked for, or None for "off"."""
    from sandbox.isolation import IsolationConfig

    if isolation is None:
        isolation = "strict" if os.geteuid() == 0 else "best-effort"
    if isinstance(isolation, IsolationConfig):
        return isolation
    if isolation == "off":
        return None
    if isolation in ("strict", "best-effort"):
        return IsolationConfig(mode=isolation)
    raise ConfigurationError(f"isolation must be 'strict', 'best-effort', 'off' or an "
                             f"IsolationConfig, got {isolation!r}")
