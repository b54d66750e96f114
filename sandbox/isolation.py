"""Linux isolation layers a freshly forked worker applies to itself, before any user byte runs.

Pure mechanism: this module knows Linux (namespaces, mounts, credentials, Landlock, seccomp,
``/proc``), nothing about pools, gRPC or the wire protocol.

Who calls what, in order::

    supervisor (once, at start)      report = detect(config)          # raises in strict mode
                                     netns_fd = create_empty_netns()  # shared, kept open
                                     host_ns = namespace_ids()        # for the posture check
    zygote (single-threaded)         pid = fork_in_new_pid_namespace()   # instead of os.fork()
    worker (the child; pid 1 of its own pid namespace)
        os.setsid(); PR_SET_PDEATHSIG; close fds                      # caller's business
        ids = worker_ids(cfg, slot)
        <join cgroups: write "0" to each cgroup.procs>    still root, /sys still writable
        enter_namespaces(cfg, netns_fd=netns_fd)      1. mount (a copy of the zygote's sealed
                                                         template), net (shared), IPC, UTS
        setup_filesystem(cfg, ids)                    2a. private tmpfs (cwd, HOME), /proc
        seal_filesystem(cfg)                          2b. everything but tmp read-only (done
                                                          once, in the template, as root)
        <rlimits>                                          (either side of the drop)
        drop_privileges(cfg, ids)                     3. own uid/gid, no groups, no caps, NNP
        restrict(cfg, writable=[tmp])                 4. Landlock, 5. seccomp (TSYNC)
        posture_check(cfg, ids, host_namespaces=host_ns, allowed_fds=...)   6.
        -> "ready"

:func:`apply_layers` runs 1 to 6 in that order after a ``join_cgroups`` hook. The zygote
calls :func:`prepare` once: as root it builds the template mount namespace (private, exposed
paths reachable, ``/dev/shm`` covered, sealed read-only) that workers copy, the seccomp
programs, and empties its own capability bounding set.
Each function applies exactly what its config says and raises ``OSError`` /
:class:`~sandbox.errors.IsolationUnavailable` if it cannot: best-effort is decided once, by
:func:`detect`, whose ``IsolationReport.effective`` is the config with unavailable layers
switched off. A worker never silently downgrades.

PID namespace (measured on this machine, fork -> child ready, p50 of 200): ``os.fork`` 0.44 to
0.63 ms; zygote ``unshare(CLONE_NEWPID)`` + ``os.fork`` + ``setns`` back 0.68 to 0.72 ms; worker
``unshare(CLONE_NEWPID)`` + a second fork 1.09 to 1.18 ms and one more process per worker.
``unshare(CLONE_NEWPID)`` moves only the caller's *future children*, so the zygote does it right
before ``os.fork()`` and then ``setns``-es its ``pid_for_children`` back (a second ``unshare``
would fail with EINVAL otherwise). The child is pid 1 of a fresh namespace, the zygote's own
child (so ``waitpid`` gives its real exit status, and ``os.pidfd_open`` works as for any
child), and every ``os.register_at_fork`` hook runs, which a raw ``clone()`` through ctypes
would skip (it would also leave glibc's cached TID wrong, so ``abort()``/``raise`` would signal
the wrong thread). Track and kill *that pid* (the value ``fork_in_new_pid_namespace`` returned
in the zygote): SIGKILL to a namespace's init makes the kernel SIGKILL every process in it,
double-forked ``setsid`` grandchildren included. Consequences of being pid 1: signals the worker
sends *itself* with a default action are ignored (``os.kill(1, SIGKILL)`` from inside does
nothing; ``abort()`` ends in SIGSEGV instead of SIGABRT; faults still kill); orphans reparent to
the worker, so a reused worker calls :func:`end_namespace_processes` between invocations
(``kill(-1, SIGKILL)`` from pid 1, then reap them all).

Without root: the zygote first calls :func:`enter_zygote_namespaces` (single-threaded, before
any preload). It becomes pid 1 of a pid namespace owned by a user namespace of its own, under
a small outer process that only waits for it; there it holds every capability over its own
namespaces, so everything above works as for root (nested pid namespace per worker, the
template, the emptied bounding set), with the caller's uid for every worker. Killing the outer
process kills the zygote (death signal), and with it, by the kernel, every process below.

Cost (fork -> ready, p50 of 300, this 2-vCPU VM, noisy): no layer ~2.2 ms (including the
posture check); each namespace +0 to 0.2 ms (fresh netns +0.2, shared netns setns ~0);
filesystem +1.5 ms; credentials +1 ms (41 PR_CAPBSET_DROP calls); Landlock +0.4 ms; seccomp
+0.3 ms; all layers ~5 ms. All of it is on the pre-fork path, off the invocation's.

Shared network namespace: :func:`create_empty_netns` makes one per supervisor (from a short-lived
thread, so no fork and it works in a threaded supervisor) and returns an fd to it; give it to
the zygote (``pass_fds``), each worker ``setns``-es into it (SECURITY.md: ~1.05 ms vs 1.8 ms for
a fresh netns, and no asynchronous netns teardown per worker). Its loopback is down: connect to
127.0.0.1 fails with ENETUNREACH.

seccomp: our own BPF, not ``pyseccomp``. ``pip download pyseccomp`` works (0.1.2, a ctypes
wrapper) but it needs the system ``libseccomp.so.2`` at run time (present here, not a Python
dependency we can declare), and what we need is small: an arch check, a denylist, and three
argument checks (clone namespace flags, 32-bit masked ioctl request, socket family). Building
~100 BPF instructions by hand keeps the filter inspectable and dependency-free.

Landlock: raw ``landlock_*`` syscalls (the ``landlock`` package covers only filesystem rights).
ABI 1 to 3 filesystem, 4 TCP bind/connect, 5 device ioctls, 6 signal and abstract-unix-socket
scopes. There is no thread sync before ABI 8: :func:`restrict` refuses to run with threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sandbox import _linux
from sandbox.errors import ConfigurationError, IsolationUnavailable

__all__ = [
    "LAYERS",
    "SYSTEM_VIEW",
    "IsolationConfig",
    "IsolationReport",
    "LayerStatus",
    "PostureError",
    "WorkerIds",
    "apply_layers",
    "create_empty_netns",
    "detect",
    "drop_privileges",
    "end_namespace_processes",
    "enter_namespaces",
    "enter_user_namespace",
    "enter_zygote_namespaces",
    "fork_in_new_pid_namespace",
    "interpreter_paths",
    "landlock_abi",
    "namespace_ids",
    "posture_check",
    "prepare",
    "restrict",
    "seal_filesystem",
    "seccomp_filter",
    "setup_filesystem",
    "template_fd",
    "view_paths",
    "view_report",
    "worker_ids",
]

Mode = Literal["strict", "best-effort"]

#: Every layer, in the order a worker applies them (the keys of ``IsolationReport.layers``).
LAYERS: tuple[str, ...] = (
    "user_ns", "mount_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns",
    "filesystem", "credentials", "landlock", "seccomp",
)

# --------------------------------------------------------------------------------------------
# Kernel constants
# --------------------------------------------------------------------------------------------

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
# clone()'s low byte is the exit signal, so CLONE_NEWTIME (0x80) cannot be tested there.
_CLONE_NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                   | CLONE_NEWPID | CLONE_NEWNET)

_NS_FLAG = {"mount_ns": CLONE_NEWNS, "net_ns": CLONE_NEWNET, "ipc_ns": CLONE_NEWIPC,
            "uts_ns": CLONE_NEWUTS, "pid_ns": CLONE_NEWPID, "user_ns": CLONE_NEWUSER}
# Layer name -> /proc/<pid>/ns/<file>.
_NS_FILE = {"mount_ns": "mnt", "net_ns": "net", "ipc_ns": "ipc", "uts_ns": "uts",
            "pid_ns": "pid", "user_ns": "user"}

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_GET_SECCOMP = 21
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

_LL_EXECUTE = 1 << 0
_LL_WRITE_FILE = 1 << 1
_LL_READ_FILE = 1 << 2
_LL_READ_DIR = 1 << 3
_LL_FS_V1 = (1 << 13) - 1          # EXECUTE .. MAKE_SYM
_LL_REFER = 1 << 13                # ABI 2
_LL_TRUNCATE = 1 << 14             # ABI 3
_LL_IOCTL_DEV = 1 << 15            # ABI 5
_LL_NET_BIND_TCP = 1 << 0          # ABI 4
_LL_NET_CONNECT_TCP = 1 << 1       # ABI 4
_LL_SCOPE_ABSTRACT_UNIX = 1 << 0   # ABI 6
_LL_SCOPE_SIGNAL = 1 << 1          # ABI 6
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV

_LINUX_CAPABILITY_VERSION_3 = 0x20080522

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10

# Syscall numbers. aarch64 uses the generic table; numbers >= 424 are the same on both.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272,
        "setns": 308, "bpf": 321, "userfaultfd": 323, "keyctl": 250, "add_key": 248,
        "request_key": 249, "init_module": 175, "finit_module": 313, "delete_module": 176,
        "kexec_load": 246, "kexec_file_load": 320, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "perf_event_open": 298, "reboot": 169, "swapon": 167,
        "swapoff": 168, "acct": 163, "quotactl": 179, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "personality": 135, "syslog": 103, "lookup_dcookie": 212,
        "vhangup": 153, "settimeofday": 164, "clock_settime": 227, "adjtimex": 159,
        "clock_adjtime": 305, "fanotify_init": 300, "kcmp": 312, "sethostname": 170,
        "setdomainname": 171, "nfsservctl": 180, "iopl": 172, "ioperm": 173, "uselib": 134,
        "ustat": 136, "sysfs": 139, "_sysctl": 156, "modify_ldt": 154, "create_module": 174,
        "get_kernel_syms": 177, "query_module": 178, "vserver": 236,
        "clone": 56, "ioctl": 16, "socket": 41, "socketpair": 53, "seccomp": 317,
        "capset": 126,
    },
    "aarch64": {
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97,
        "setns": 268, "bpf": 280, "userfaultfd": 282, "keyctl": 219, "add_key": 217,
        "request_key": 218, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "kexec_load": 104, "kexec_file_load": 294, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "perf_event_open": 241, "reboot": 142, "swapon": 224,
        "swapoff": 225, "acct": 89, "quotactl": 60, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "personality": 92, "syslog": 116, "lookup_dcookie": 18,
        "vhangup": 58, "settimeofday": 170, "clock_settime": 112, "adjtimex": 171,
        "clock_adjtime": 266, "fanotify_init": 262, "kcmp": 272, "sethostname": 161,
        "setdomainname": 162, "nfsservctl": 42,
        "clone": 220, "ioctl": 29, "socket": 198, "socketpair": 199, "seccomp": 277,
        "capset": 91,
    },
}
_COMMON_SYSCALLS = {
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "clone3": 435, "pidfd_getfd": 438, "mount_setattr": 442,
    "quotactl_fd": 443, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
    "landlock_restrict_self": 446, "open_tree_attr": 467,
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_X32_SYSCALL_BIT = 0x40000000

_MACHINE = os.uname().machine
_NR: dict[str, int] = {**_SYSCALLS.get(_MACHINE, {}), **_COMMON_SYSCALLS}

# Denied with EPERM by the seccomp layer. Why each (Docker's default profile, Chromium's and
# nsjail's policies deny the same families):
#   mount, umount2, pivot_root, chroot, open_tree*, move_mount, fs*, mount_setattr:
#       change the mount table (our read-only view) even inside our mount namespace.
#   unshare, setns: new user namespaces hand back every capability inside them and are the
#       entry point of most container escapes; setns would leave our namespaces.
#   bpf, perf_event_open, userfaultfd, io_uring_*: large, frequently exploited kernel
#       surface; io_uring also bypasses seccomp for the operations it performs.
#   keyctl, add_key, request_key: the kernel keyring is not namespaced.
#   init/finit/delete_module, create_module, query_module, get_kernel_syms, kexec_*,
#       reboot, swapon/off, acct, quotactl*, syslog, settimeofday, clock_settime, adjtimex,
#       clock_adjtime, sethostname, setdomainname, nfsservctl, vhangup, iopl, ioperm,
#       modify_ldt, uselib, ustat, sysfs, _sysctl, vserver, lookup_dcookie: administration,
#       obsolete or 32-bit-era calls no Python program needs.
#   ptrace, process_vm_readv/writev, kcmp, pidfd_getfd: reach into other processes.
#   open_by_handle_at, name_to_handle_at: the "shocker" escape, bypasses path checks.
#   fanotify_init: global filesystem monitoring.
#   personality: can disable ASLR (ADDR_NO_RANDOMIZE) and select odd execution domains.
_DENIED = (
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "open_tree_attr", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "unshare", "setns", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "init_module", "finit_module", "delete_module",
    "create_module", "query_module", "get_kernel_syms", "kexec_load", "kexec_file_load",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "settimeofday",
    "clock_settime", "adjtimex", "clock_adjtime", "sethostname", "setdomainname", "nfsservctl",
    "vhangup", "iopl", "ioperm", "modify_ldt", "uselib", "ustat", "sysfs", "_sysctl",
    "vserver", "lookup_dcookie", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "pidfd_getfd", "open_by_handle_at", "name_to_handle_at", "fanotify_init", "personality",
)

# --------------------------------------------------------------------------------------------
# libc
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(name: str, *args: Any) -> int:
    try:
        nr = _NR[name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name}: unsupported architecture {_MACHINE}") from None
    return _check(int(_libc.syscall(ctypes.c_long(nr), *args)), name)


_prctl = _linux.prctl


def _unshare(flags: int) -> None:
    _check(int(_libc.unshare(ctypes.c_int(flags))), f"unshare({flags:#x})")


def _setns(fd: int, nstype: int) -> None:
    _check(int(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype))), f"setns({nstype:#x})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)
    _check(int(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                           enc(data))), f"mount {fstype or ''} {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


# --------------------------------------------------------------------------------------------
# Configuration and report
# --------------------------------------------------------------------------------------------

def interpreter_paths() -> tuple[str, ...]:
    """This interpreter's prefixes (stdlib, venv): what a worker must still be able to read."""
    seen: dict[str, None] = {}
    for path in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix):
        if path and os.path.isdir(path):
            seen[os.path.realpath(path)] = None
    return tuple(seen)


@dataclass(frozen=True)
class IsolationConfig:
    """Which layers to apply, and their parameters.

    Each boolean switches one layer. ``mode="strict"``: :func:`detect` raises if an enabled
    layer is unavailable; ``"best-effort"``: it is reported and switched off in
    ``IsolationReport.effective``.
    """

    mode: Mode = "strict"
    user_ns: bool = True          # only when not root: a user namespace mapping our own uid
    mount_ns: bool = True
    pid_ns: bool = True           # the worker must come from fork_in_new_pid_namespace()
    net_ns: bool = True           # shared empty netns (fd) or a fresh one
    ipc_ns: bool = True
    uts_ns: bool = True
    filesystem: bool = True       # private tmpfs, fresh /proc, /dev/shm hidden, rest read-only
    credentials: bool = True      # own uid/gid (root) or drop all caps (user ns); NNP; dumpable 0
    landlock: bool = True
    seccomp: bool = True
    allow_network: bool = False   # needs net_ns=False; then TCP and AF_INET/6 are allowed
    tmp_dir: str = "/tmp"         # mount point of the private tmpfs; becomes cwd, HOME, TMPDIR
    tmp_size_bytes: int = 64 * 1024 * 1024
    tmp_max_inodes: int = 16_384
    uid_base: int = 200_000       # root: worker uid = uid_base + slot
    gid_base: int = 200_000       # root: worker gid = gid_base + slot
    id_count: int = 65_536        # slots are 0 .. id_count-1
    hostname: str = "sandbox"     # inside the UTS namespace
    # What the worker sees of the host besides SYSTEM_VIEW: the interpreter (default), the
    # import path and the operator's additions, read-only. Without the minimal view (not root),
    # these are the directories the worker uid must be able to read although an ancestor is
    # closed to it (e.g. a pyenv under /root, mode 0700).
    expose: tuple[str, ...] = field(default_factory=interpreter_paths)
    # Root: the worker's / is a fresh tmpfs holding only SYSTEM_VIEW, ``expose``, a few
    # devices, its /proc and its /tmp (a template built once per zygote, then copied). False:
    # the host's whole filesystem, read-only.
    minimal_view: bool = True
    # Paths covered by an empty read-only tmpfs in the view, should they be under an exposed
    # directory (the runtime's bundles and state).
    hide: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("strict", "best-effort"):
            raise ConfigurationError(f"IsolationConfig.mode: {self.mode!r} is not "
                                     "'strict' or 'best-effort'")
        if self.allow_network and self.net_ns:
            raise ConfigurationError("IsolationConfig.allow_network=True needs net_ns=False "
                                     "(an empty network namespace has no network)")
        if self.filesystem and not self.mount_ns:
            raise ConfigurationError("IsolationConfig.filesystem=True needs mount_ns=True "
                                     "(mounts outside a private mount namespace hit the host)")
        if not os.path.isabs(self.tmp_dir) or os.path.normpath(self.tmp_dir) in ("/", "//"):
            raise ConfigurationError(f"IsolationConfig.tmp_dir: {self.tmp_dir!r} must be an "
                                     "absolute path other than /")
        if self.tmp_size_bytes < 4096:
            raise ConfigurationError(f"IsolationConfig.tmp_size_bytes: {self.tmp_size_bytes} "
                                     "< 4096")
        if self.tmp_max_inodes < 1:
            raise ConfigurationError("IsolationConfig.tmp_max_inodes: must be >= 1")
        for name in ("uid_base", "gid_base"):
            value = getattr(self, name)
            if value < 1 or value + self.id_count > 2**32 - 2:
                raise ConfigurationError(f"IsolationConfig.{name}: {value} (+ id_count "
                                         f"{self.id_count}) is outside 1 .. 2**32-2")
        if self.id_count < 1:
            raise ConfigurationError("IsolationConfig.id_count: must be >= 1")
        if not 0 < len(self.hostname.encode()) <= 64:
            raise ConfigurationError("IsolationConfig.hostname: 1 to 64 bytes")

    def enabled(self, layer: str) -> bool:
        """Whether ``layer`` (one of :data:`LAYERS`) is switched on."""
        value = getattr(self, layer)
        assert isinstance(value, bool)
        return value


@dataclass(frozen=True)
class LayerStatus:
    """One layer in an :class:`IsolationReport`."""

    available: bool   # the kernel and our privileges allow it
    enabled: bool     # it will be applied (requested and available)
    reason: str       # why not, or what exactly (e.g. "landlock ABI 7: fs, tcp, scopes")


@dataclass(frozen=True)
class IsolationReport:
    """What :func:`detect` found; ``effective`` is the config workers must be given."""

    mode: Mode
    layers: Mapping[str, LayerStatus]
    effective: IsolationConfig
    kernel: str
    machine: str
    root: bool
    landlock_abi: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for the API, the CLI and logs."""
        return {
            "mode": self.mode, "kernel": self.kernel, "machine": self.machine,
            "root": self.root, "landlock_abi": self.landlock_abi,
            "layers": {name: {"available": s.available, "enabled": s.enabled,
                              "reason": s.reason} for name, s in self.layers.items()},
        }


class PostureError(IsolationUnavailable):
    """The posture self-check found the worker less confined than its config says."""

    def __init__(self, mismatches: Sequence[str]) -> None:
        self.mismatches = list(mismatches)
        super().__init__("isolation posture check failed: " + "; ".join(self.mismatches))


@dataclass(frozen=True)
class WorkerIds:
    """The credentials a worker ends with (:func:`worker_ids`)."""

    uid: int
    gid: int
    change: bool   # True: setresuid/setresgid to these; False: keep ours (user-ns path)


def worker_ids(config: IsolationConfig, slot: int) -> WorkerIds:
    """The uid/gid of worker ``slot``: ``base + slot`` when root, our own otherwise."""
    if not 0 <= slot < config.id_count:
        raise ConfigurationError(f"worker slot {slot} is outside 0 .. {config.id_count - 1}")
    if os.geteuid() == 0 and config.credentials:
        return WorkerIds(config.uid_base + slot, config.gid_base + slot, True)
    return WorkerIds(os.getuid(), os.getgid(), False)


# --------------------------------------------------------------------------------------------
# Supervisor / zygote helpers
# --------------------------------------------------------------------------------------------

def namespace_ids(pid: int | str = "self") -> dict[str, int]:
    """Namespace inode ids of ``pid`` keyed by layer name (``mount_ns`` ...)."""
    return {layer: os.stat(f"/proc/{pid}/ns/{name}").st_ino for layer, name in _NS_FILE.items()}


def create_empty_netns() -> int:
    """Create an empty network namespace (loopback down) and return an O_CLOEXEC fd to it.

    Done in a short-lived thread (``unshare(CLONE_NEWNET)`` is per task and allowed in a
    threaded process), so it neither forks nor changes the caller's namespaces. The fd keeps
    the namespace alive; close it to let the kernel free it. Call it in the supervisor, not
    in the zygote (which must never start a thread).
    """
    result: list[int | BaseException] = []

    def make() -> None:
        try:
            _unshare(CLONE_NEWNET)
            result.append(os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC))
        except BaseException as exc:  # reported to the caller below
            result.append(exc)

    import threading  # the supervisor's; never imported into a zygote

    thread = threading.Thread(target=make, name="sandbox-netns", daemon=True)
    thread.start()
    thread.join()
    outcome = result[0]
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def enter_user_namespace() -> None:
    """Move the (single-threaded, non-root) caller into a new user namespace.

    Our uid and gid map to themselves; setgroups is denied. Inside it we hold every capability
    *over namespaces it owns* (so we can then create pid, mount, net... namespaces and mount
    tmpfs/proc), but nothing over the host: files keep their real owners, our uid is still our
    uid outside, and every worker of this zygote shares it (no per-worker uid: workers could
    signal each other but for the Landlock signal scope, and share RLIMIT_NPROC). Mapping only
    one id means setresuid to any other uid fails.
    """
    _unshare(CLONE_NEWUSER)
    _write_id_maps()


#: Set in a zygote that entered namespaces of its own (:func:`enter_zygote_namespaces`): how
#: its ids map; None elsewhere (root, or a zygote in the supervisor's namespaces).
zygote_namespaces: dict[str, Any] | None = None
#: Why :func:`enter_zygote_namespaces` failed in this zygote ("" when it was not tried).
zygote_namespaces_error = ""


def enter_zygote_namespaces() -> dict[str, Any]:
    """Without root: make the calling zygote pid 1 of a pid namespace owned by a user
    namespace of its own. Call it single-threaded, before anything is preloaded.

    The caller unshares a user namespace (its uid and gid map to themselves: the only ids an
    ordinary user may map) and a pid namespace owned by it, then forks. The child returns,
    as pid 1 of the new pid namespace: it holds every capability over its own namespaces
    (none over the host), so it can give each worker a nested pid namespace, mounts and a
    sealed template exactly as root does, and setns back into its own pid namespace after
    each such fork. The parent never returns: it closes every fd but stdio, waits for the
    child and exits with its status. Its death (the supervisor SIGKILLs it, or dies) kills
    the child through the death signal, and when a pid namespace's pid 1 dies the kernel
    kills every process in it: nothing a worker started can outlive the zygote.

    Returns what :data:`zygote_namespaces` then holds. Raises OSError when the kernel
    refuses (unprivileged user namespaces disabled by a sysctl or an AppArmor policy).
    """
    global zygote_namespaces
    import signal

    uid, gid = os.geteuid(), os.getegid()
    _unshare(CLONE_NEWUSER | CLONE_NEWPID)
    _write_id_maps(uid, gid)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:  # the outer process: wait for pid 1, then exit as it did
        os.close(read_end)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _linux.close_fds_except({0, 1, 2, write_end})
        code = 1
        try:
            while True:
                try:
                    _, status = os.waitpid(pid, 0)
                    break
                except InterruptedError:
                    continue
            code = os.waitstatus_to_exitcode(status)
            code = code if code >= 0 else 128 - code
        finally:
            os._exit(code)
    os.close(write_end)
    _linux.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    # The outer process may have died before the death signal was armed: its end of the
    # pipe is then closed (getppid() is 0 in here whatever happens).
    ready, _, _ = select.select([read_end], [], [], 0)
    if ready:
        os._exit(0)
    # Kept: readable (end of file) once the outer process is gone, which the zygote checks
    # before each fork (the death signal is not instantaneous).
    os.set_inheritable(read_end, False)
    zygote_namespaces = {"uid": uid, "gid": gid, "ids": 1, "outer_fd": read_end,
                         "map": f"uid {uid} -> {uid}, gid {gid} -> {gid}"}
    return zygote_namespaces


def host_pid(pidfd: int) -> int:
    """The pid of ``pidfd``'s process as the host numbers it. A zygote in a pid namespace of
    its own still has the host's /proc, and a pidfd's fdinfo shows the pid in the namespace
    of the /proc it is read through."""
    with open(f"/proc/self/fdinfo/{pidfd}", "rb") as f:
        for line in f:
            if line.startswith(b"Pid:"):
                return int(line[4:])
    raise OSError(f"no Pid in the fdinfo of pidfd {pidfd}")


def proc_pid(pid: int) -> int:
    """Our child ``pid`` as /proc names it (they differ in a zygote's own pid namespace)."""
    if zygote_namespaces is None:
        return pid
    pidfd = os.pidfd_open(pid)
    try:
        return host_pid(pidfd)
    finally:
        os.close(pidfd)


def _write_id_maps(uid: int | None = None, gid: int | None = None) -> None:
    uid = os.geteuid() if uid is None else uid
    gid = os.getegid() if gid is None else gid
    # After a uid change the kernel made us non-dumpable, which makes /proc/self/* owned by
    # (host) root and unwritable to us: be dumpable while writing the maps.
    dumpable = _prctl(PR_GET_DUMPABLE)
    _prctl(PR_SET_DUMPABLE, 1)
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1\n"),
                           ("gid_map", f"{gid} {gid} 1\n")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    finally:
        _prctl(PR_SET_DUMPABLE, dumpable)


def _check_pid_namespace_restorable(own: int) -> None:
    # setns into the namespace we are already in: a no-op that tells whether the setns back
    # after the fork will be allowed (it needs CAP_SYS_ADMIN over the namespace's owner).
    try:
        _setns(own, CLONE_NEWPID)
    except OSError as exc:
        raise IsolationUnavailable(
            f"pid_ns: cannot re-enter our own pid namespace ({exc.strerror}); without root "
            "the zygote must live in a pid namespace owned by a user namespace of its own "
            + (f"and could not: {zygote_namespaces_error}" if zygote_namespaces_error
               else "(enter_zygote_namespaces)")) from exc


def fork_in_new_pid_namespace() -> int:
    """``os.fork()`` whose child is pid 1 of a new pid namespace. Call it in the zygote.

    Returns 0 in the child and the child's pid in the parent, like ``os.fork``. The parent's
    own pid namespace and ``pid_for_children`` are unchanged afterwards. The supervisor tracks
    and kills the returned pid (a pidfd from the zygote): SIGKILL to it kills the whole
    namespace; its exit status comes from the zygote's ``waitpid`` as for any child.

    Needs CAP_SYS_ADMIN in the caller's user namespace (root, or after
    :func:`enter_user_namespace`).
    """
    own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check_pid_namespace_restorable(own)
        _unshare(CLONE_NEWPID)
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid != 0:
                # Back to our own namespace for the next child (a second unshare would fail).
                _setns(own, CLONE_NEWPID)
        return pid
    finally:
        os.close(own)


def userns_refusal(error: str) -> str:
    """Why unprivileged user namespaces are refused here, and the switch that allows them."""
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return None

    switches = []
    if read("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        switches.append("sysctl kernel.unprivileged_userns_clone=1")
    if read("/proc/sys/user/max_user_namespaces") == "0":
        switches.append("sysctl user.max_user_namespaces=15000")
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        switches.append("an AppArmor profile allowing userns for this program, or sysctl "
                        "kernel.apparmor_restrict_unprivileged_userns=0")
    hint = " or ".join(switches) if switches else (
        "check kernel.unprivileged_userns_clone, user.max_user_namespaces and any AppArmor "
        "or seccomp policy of the container")
    return f"unprivileged user namespaces refused ({error}); to allow them: {hint}"


def end_namespace_processes() -> int:
    """In pid 1 of a pid namespace (a worker between two invocations): SIGKILL every other
    process of the namespace and reap them all; returns how many were reaped.

    ``kill(-1)`` from pid 1 reaches every process of its namespace (and of namespaces below
    it) but itself; orphans are reparented to pid 1, so waiting until there is no child left
    waits for the last of them. A process forking meanwhile only adds a round.
    """
    import signal

    reaped = 0
    while True:
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return reaped
        except InterruptedError:
            continue
        reaped += 1


# --------------------------------------------------------------------------------------------
# Worker layers
# --------------------------------------------------------------------------------------------

def enter_namespaces(config: IsolationConfig, *, netns_fd: int | None = None) -> None:
    """Layer 1: enter new mount, IPC, UTS (and, non-root, user) namespaces; join or make netns.

    ``netns_fd`` (from :func:`create_empty_netns`): join that shared namespace; without it a
    fresh empty one is created. With ``pid_ns`` the caller must already be pid 1 of a new pid
    namespace (:func:`fork_in_new_pid_namespace`); this only verifies it.
    """
    if config.pid_ns and os.getpid() != 1:
        raise IsolationUnavailable("pid_ns: this worker is not pid 1 of its own pid namespace; "
                                   "fork it with fork_in_new_pid_namespace()")
    template = _template_for(config)
    if template is not None:
        # The zygote's sealed template (see prepare()): join it, then copy it below.
        _setns(template.fd, CLONE_NEWNS)
    flags = 0
    for layer in ("mount_ns", "ipc_ns", "uts_ns"):
        if config.enabled(layer):
            flags |= _NS_FLAG[layer]
    if config.net_ns and netns_fd is None:
        flags |= CLONE_NEWNET
    if config.user_ns and os.geteuid() != 0 and zygote_namespaces is None:
        # Everything in one call: the user namespace is created first and owns the others.
        uid, gid = os.geteuid(), os.getegid()
        _unshare(flags | CLONE_NEWUSER)
        _write_id_maps(uid, gid)
    elif flags:
        _unshare(flags)
    if config.net_ns and netns_fd is not None:
        _setns(netns_fd, CLONE_NEWNET)
    if config.uts_ns:
        host = config.hostname.encode()
        _check(int(_libc.sethostname(host, ctypes.c_size_t(len(host)))), "sethostname")


def setup_filesystem(config: IsolationConfig, ids: WorkerIds) -> str:
    """Layer 2a: private propagation, fresh /proc, private tmpfs (cwd, HOME), /dev/shm hidden.

    Must follow :func:`enter_namespaces` (a private mount namespace). Returns the tmp dir.
    Everything here is in our mount namespace only: propagation is made private first, so no
    mount or unmount reaches the host. Follow it with :func:`seal_filesystem`.
    """
    if not config.filesystem:
        return os.getcwd()
    template = _template_for(config)
    if template is not None:
        # A copy of the sealed template (enter_namespaces): everything is private and
        # read-only already; add what must be this worker's own, each mount born sealed.
        if config.pid_ns:
            _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        return _private_tmp(config, ids, seal=True)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _expose(config.expose)
    if config.pid_ns:
        # A proc of *our* pid namespace: the host's processes disappear from /proc.
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _hide_dev_shm(config)
    return _private_tmp(config, ids, seal=False)


_under_tmp: dict[tuple[tuple[str, ...], str], tuple[str, ...]] = {}


def _exposed_under_tmp(config: IsolationConfig) -> tuple[str, ...]:
    """The outermost exposed paths under the tmp dir (resolved once per zygote: realpath
    walks every component, and a birth should not)."""
    key = (config.expose, config.tmp_dir)
    found = _under_tmp.get(key)
    if found is None:
        real_tmp = os.path.realpath(config.tmp_dir)
        under = sorted({os.path.realpath(p) for p in config.expose
                        if os.path.realpath(p).startswith(real_tmp + "/")
                        and os.path.exists(p)})
        found = _under_tmp[key] = tuple(
            p for p in under if not any(p.startswith(q + "/") for q in under if q != p))
    return found


def _hide_dev_shm(config: IsolationConfig) -> None:
    if os.path.isdir("/dev/shm") and os.path.realpath(config.tmp_dir) != "/dev/shm":
        # Writes to the shared /dev/shm outlive their writer, charged to nobody: hide it
        # under an empty, read-only, one-inode tmpfs (POSIX shm/semaphores then fail).
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=4k,nr_inodes=1,mode=0555")


def _private_tmp(config: IsolationConfig, ids: WorkerIds, *, seal: bool) -> str:
    """Mount the worker's private tmpfs (cwd, HOME, TMPDIR) and bind back what it covers.

    ``seal``: the binds are made read-only and nosuid here (no :func:`seal_filesystem`
    follows, as in a copy of the sealed template).
    """
    tmp = config.tmp_dir
    # Exposed paths under the tmp dir (a checkout or venv in /tmp, say) would vanish under the
    # private tmpfs: hold them open, and bind them back (read-only once sealed) on top of it.
    held = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in _exposed_under_tmp(config)}
    try:
        _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={config.tmp_size_bytes},nr_inodes={config.tmp_max_inodes},mode=0700,"
               f"uid={ids.uid},gid={ids.gid}")
        for path, fd in held.items():
            _bind_fd(fd, path)
            if seal:
                _seal(path, recursive=True)
    finally:
        for fd in held.values():
            os.close(fd)
    os.chdir(tmp)
    os.environ["HOME"] = tmp
    os.environ["TMPDIR"] = tmp
    return tmp


def _expose(paths: Iterable[str]) -> None:
    """Make ``paths`` reachable past ancestors that others cannot search (see ``expose``)."""
    plans: dict[str, list[str]] = {}
    for path in paths:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            continue
        parts = real.split("/")
        for i in range(1, len(parts)):
            ancestor = "/".join(parts[:i]) or "/"
            if not os.stat(ancestor).st_mode & 0o001:
                plans.setdefault(ancestor, []).append(real)
                break
    for blocker, targets in plans.items():
        fds = {target: os.open(target, os.O_PATH | os.O_CLOEXEC) for target in targets}
        try:
            _mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
            for target, fd in fds.items():
                _bind_fd(fd, target)
        finally:
            for fd in fds.values():
                os.close(fd)


def _bind_fd(fd: int, dest: str) -> None:
    """Bind-mount (recursively) what the O_PATH ``fd`` holds at ``dest``, making the mount
    point first (a directory, or an empty file for a file)."""
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(dest, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        os.close(os.open(dest, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
    _mount(f"/proc/self/fd/{fd}", dest, None, MS_BIND | MS_REC)


def _unescape(text: str) -> str:
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _mount_points() -> list[tuple[str, set[str]]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # Field 5 is the mount point (octal-escaped), field 6 the per-mount options.
            points.append((_unescape(fields[4]), set(fields[5].split(","))))
    return points


def seal_filesystem(config: IsolationConfig) -> None:
    """Layer 2b: make every mount read-only and nosuid, except the private tmpfs.

    One recursive ``mount_setattr`` (Linux 5.12+); older kernels get a bind-remount per mount
    point (deepest first, keeping each mount's nodev/noexec). Join cgroups *before* this:
    /sys/fs/cgroup is read-only afterwards.
    """
    if not config.filesystem or _template_for(config) is not None:
        return  # a copy of the sealed template: sealed already (setup_filesystem)
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    clear = _MountAttr(attr_clr=MOUNT_ATTR_RDONLY)
    try:
        _syscall("mount_setattr", ctypes.c_int(AT_FDCWD), b"/", ctypes.c_uint(AT_RECURSIVE),
                 ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
        _syscall("mount_setattr", ctypes.c_int(AT_FDCWD), os.fsencode(config.tmp_dir),
                 ctypes.c_uint(0), ctypes.byref(clear), ctypes.c_size_t(ctypes.sizeof(clear)))
        return
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
    tmp = os.path.normpath(config.tmp_dir)
    keep = {"nodev": MS_NODEV, "noexec": MS_NOEXEC}
    for point, options in sorted(_mount_points(), key=lambda p: -len(p[0])):
        if point == tmp:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for name, bit in keep.items():
            if name in options:
                flags |= bit
        try:
            _mount(None, point, None, flags)
        except OSError as exc:
            # A point hidden by a later mount on top (or gone) cannot be reached: the mount
            # covering it is remounted instead.
            if exc.errno not in (errno.ENOENT, errno.EINVAL):
                raise


def drop_privileges(config: IsolationConfig, ids: WorkerIds) -> None:
    """Layer 3: no groups, our own uid/gid, no capabilities at all, no new privileges.

    Root: empty the bounding set (needs CAP_SETPCAP, so first), ``setgroups([])``,
    ``setresgid``, ``setresuid`` (which clears the permitted and effective sets), then clear
    ambient and inheritable. User namespace: same minus the id change. Always
    PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE 0 (setresuid already blocks ptrace and reading
    ``/proc/<supervisor>/mem``; dumpable 0 also hides our own /proc files from our uid).
    """
    if config.credentials:
        if not _bounding_set_dropped or zygote_namespaces is not None:
            for cap in range(_last_cap() + 1):
                _prctl(PR_CAPBSET_DROP, cap)
        if ids.change:
            # The kernel clears the parent-death signal when the credentials change: keep it.
            death_signal = ctypes.c_int(0)
            _prctl(PR_GET_PDEATHSIG, ctypes.addressof(death_signal))
            os.setgroups([])
            os.setresgid(ids.gid, ids.gid, ids.gid)
            os.setresuid(ids.uid, ids.uid, ids.uid)
            if death_signal.value:
                _prctl(PR_SET_PDEATHSIG, death_signal.value)
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        _syscall("capset", ctypes.byref(header), data)
        _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


_cap_last: list[int] = []
#: True once :func:`prepare` emptied the bounding set of this process (the zygote): its
#: forks inherit the empty set and need not drop 41 capabilities one by one.
_bounding_set_dropped = False


def _last_cap() -> int:
    if not _cap_last:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            _cap_last.append(int(f.read()))
    return _cap_last[0]


def _seal(path: str, *, recursive: bool) -> None:
    attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    _syscall("mount_setattr", ctypes.c_int(AT_FDCWD), os.fsencode(path),
             ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
             ctypes.c_size_t(ctypes.sizeof(attr)))


@dataclass(frozen=True)
class _Template:
    """A sealed mount namespace held open by ``fd``, built for one filesystem view."""

    fd: int
    key: tuple[Any, ...]


_template: _Template | None = None


def _template_key(config: IsolationConfig) -> tuple[Any, ...]:
    return (config.expose, config.tmp_dir, config.minimal_view, config.hide)


def _template_for(config: IsolationConfig) -> _Template | None:
    """The zygote's template, if it was built for this config's filesystem view."""
    if _template is None or not config.filesystem or not config.mount_ns:
        return None
    return _template if _template.key == _template_key(config) else None


def template_fd() -> int:
    """The template's fd (a worker keeps it open until it has joined), or -1."""
    return _template.fd if _template is not None else -1


#: Host paths a worker sees read-only (those that exist), besides the interpreter, the import
#: path and what the operator exposes: what Python, its C extensions and the programs it may
#: run need, plus SSL certificates, time zones and name-service configuration files. Nothing
#: else of the host: no /home, /root, /srv, /opt, /var, /run, /mnt, no other file of /etc.
SYSTEM_VIEW: tuple[str, ...] = (
    "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/usr/local/lib", "/usr/bin",
    "/usr/share/zoneinfo", "/usr/share/ca-certificates", "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf", "/etc/localtime", "/etc/timezone", "/etc/ld.so.cache",
    "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/nsswitch.conf", "/etc/hosts",
    "/etc/host.conf", "/etc/resolv.conf", "/etc/gai.conf", "/etc/protocols", "/etc/services",
    "/etc/mime.types", "/sys/devices/system/cpu",
)
#: Top-level links of a merged-/usr system (``/lib -> usr/lib``), recreated as links.
_TOP_LINKS = ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
#: Device nodes a worker sees (bound from the host's /dev).
_DEVICES = ("null", "zero", "full", "random", "urandom")
MNT_DETACH = 2


def view_paths(config: IsolationConfig) -> list[str]:
    """What a worker of ``config`` sees of the host, read-only, outermost paths only, sorted
    (the minimal view; see :data:`SYSTEM_VIEW`). Its own /proc, /tmp and /dev come on top."""
    wanted = {os.path.realpath(p) for p in (*SYSTEM_VIEW, *config.expose)
              if p and os.path.exists(p)}
    wanted.discard("/")
    paths = sorted(wanted)
    return [p for p in paths if not any(p.startswith(q + "/") for q in paths if q != p)]


def _view_links(config: IsolationConfig) -> dict[str, str]:
    """Symbolic links among the view's paths (``/etc/localtime``, a venv's symlinked
    prefix): recreated as links in the new root, their targets being in the view."""
    links = {p: os.readlink(p) for p in _TOP_LINKS if os.path.islink(p)}
    for path in (*SYSTEM_VIEW, *config.expose):
        if path and os.path.islink(path) and os.path.exists(path):
            links.setdefault(os.path.normpath(path), os.readlink(path))
    return links


def _build_minimal_root(config: IsolationConfig) -> None:
    """In a private mount namespace: make a fresh tmpfs the root, holding only the view
    (:func:`view_paths`, bound read-only later by the seal), /dev with a few devices, and
    empty /proc and /tmp for each worker's own. The old root is detached."""
    links = _view_links(config)
    # Open every source first: the new root is mounted over tmp_dir, which may hold some.
    sources = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in view_paths(config)}
    devices = {d: os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC) for d in _DEVICES
               if os.path.exists(f"/dev/{d}")}
    proc_fd = (os.open("/proc", os.O_PATH | os.O_CLOEXEC)
               if zygote_namespaces is not None and config.pid_ns else -1)
    new = os.path.realpath(config.tmp_dir)
    try:
        _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=16384,mode=0755")
        for path, target in sorted(links.items()):
            os.makedirs(os.path.dirname(new + path), mode=0o755, exist_ok=True)
            if not os.path.lexists(new + path):
                os.symlink(target, new + path)
        for path, fd in sources.items():
            dest = new + path
            _bind_fd(fd, dest)
        dev = new + "/dev"
        os.makedirs(dev, mode=0o755, exist_ok=True)
        _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
        for name, fd in devices.items():
            os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            _mount(f"/proc/self/fd/{fd}", f"{dev}/{name}", None, MS_BIND)
        for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"{dev}/{name}")
        os.makedirs(f"{dev}/shm", mode=0o755)
        _mount("tmpfs", f"{dev}/shm", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
               "size=4k,nr_inodes=1,mode=0555")
        os.makedirs(new + "/proc", mode=0o555, exist_ok=True)
        if proc_fd >= 0:
            # Outside the initial user namespace the kernel lets a worker mount a proc only
            # where one is already fully visible in its mount namespace: the host's, bound
            # here and always covered by the worker's own before any user code runs.
            _bind_fd(proc_fd, new + "/proc")
        os.makedirs(new + os.path.normpath(config.tmp_dir), mode=0o755, exist_ok=True)
    finally:
        for fd in (*sources.values(), *devices.values(), *([proc_fd] if proc_fd >= 0 else [])):
            os.close(fd)
    os.chdir(new)
    _syscall("pivot_root", b".", b".")  # the old root now sits on top of the new one
    _syscall("umount2", b".", ctypes.c_int(MNT_DETACH))
    os.chdir("/")


def view_report(config: IsolationConfig) -> dict[str, Any]:
    """What a worker of this zygote sees of the filesystem (for ``doctor``, ``info()`` and
    ``GetInfo``): ``minimal`` (its own root, see :data:`SYSTEM_VIEW`) with the ``paths``
    visible read-only, the ``hidden`` ones, and its ``private`` writable ones; or the host's
    whole filesystem (``paths`` ``["/"]``), read-only with the filesystem layer."""
    minimal = config.minimal_view and _template_for(config) is not None
    return {
        "minimal": minimal,
        "read_only": config.filesystem,
        "paths": view_paths(config) if minimal else ["/"],
        "devices": [f"/dev/{d}" for d in _DEVICES if os.path.exists(f"/dev/{d}")]
        if minimal else [],
        "hidden": list(config.hide) if config.filesystem else [],
        "private": [os.path.normpath(config.tmp_dir), "/proc"] if config.filesystem else [],
    }


def _hide(paths: Iterable[str]) -> None:
    for path in paths:
        if path and os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "size=4k,nr_inodes=1,mode=0555")


def _build_template(config: IsolationConfig) -> _Template:
    """Build, in a short-lived child, the mount namespace every worker starts from: private
    propagation, the exposed paths reachable, ``/dev/shm`` covered, and everything sealed
    read-only and nosuid (what :func:`setup_filesystem` and :func:`seal_filesystem` would do
    in each worker). The child waits until we hold its namespace open, then exits; the
    namespace lives as long as the fd (the zygote's life)."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(report_r)
            os.close(go_w)
            try:
                _unshare(CLONE_NEWNS)
                _mount(None, "/", None, MS_REC | MS_PRIVATE)
                if config.minimal_view:
                    _build_minimal_root(config)
                else:
                    _expose(config.expose)
                    _hide_dev_shm(config)
                _hide(config.hide)
                _seal("/", recursive=True)
                os.write(report_w, b"ok")
            except BaseException as exc:
                os.write(report_w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    os.close(go_r)
    try:
        answer = os.read(report_r, 4096)
        if answer != b"ok":
            raise IsolationUnavailable("filesystem: cannot build the template mount "
                                       f"namespace: {answer.decode(errors='replace')}")
        opened = os.open(f"/proc/{proc_pid(pid)}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        # Above 0-3, which a worker's birth rearranges (stdio and its channel).
        fd = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(opened)
    finally:
        os.close(report_r)
        os.close(go_w)  # the child exits
        os.waitpid(pid, 0)
    return _Template(fd, _template_key(config))


def prepare(config: IsolationConfig) -> None:
    """Once per zygote, before its first fork: do what every worker would otherwise repeat.

    Builds the seccomp programs and reads ``cap_last_cap``. As root with ``filesystem``, it
    builds the sealed template mount namespace that workers copy (:func:`_build_template`):
    a birth then mounts only its own ``/proc`` and ``/tmp``. As root with ``credentials``, it
    also empties the zygote's own capability bounding set: the zygote keeps its effective
    and permitted capabilities (it still creates namespaces and mounts for its workers), it
    never executes a program, and every worker starts with the empty set it would otherwise
    make itself (the posture check still verifies ``CapBnd`` 0 in each).
    """
    global _bounding_set_dropped, _template
    _last_cap()
    if config.filesystem:
        _exposed_under_tmp(config)
    if config.filesystem and config.mount_ns and _privileged() and _template is None:
        _template = _build_template(config)
    if config.seccomp:
        _seccomp_program(config.allow_network)
        _seccomp_program(True)
    if config.credentials and _privileged() and not _bounding_set_dropped:
        for cap in range(_last_cap() + 1):
            _prctl(PR_CAPBSET_DROP, cap)
        _bounding_set_dropped = True


def _privileged() -> bool:
    """Root, or a zygote holding every capability over namespaces of its own
    (:func:`enter_zygote_namespaces`): either can build the template and empty its
    bounding set for its workers."""
    return os.geteuid() == 0 or zygote_namespaces is not None


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when absent or disabled."""
    try:
        return _syscall("landlock_create_ruleset", None, ctypes.c_size_t(0),
                        ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except OSError:
        return 0


_threads = _linux.thread_count


def _landlock(config: IsolationConfig, writable: Iterable[str]) -> None:
    abi = landlock_abi()
    if abi < 1:
        raise IsolationUnavailable("landlock: not supported by this kernel")
    fs = _LL_FS_V1
    if abi >= 2:
        fs |= _LL_REFER
    if abi >= 3:
        fs |= _LL_TRUNCATE
    if abi >= 5:
        fs |= _LL_IOCTL_DEV
    net = 0
    if abi >= 4 and not config.allow_network:
        net = _LL_NET_BIND_TCP | _LL_NET_CONNECT_TCP   # handled, no rule: every port denied
    scoped = _LL_SCOPE_ABSTRACT_UNIX | _LL_SCOPE_SIGNAL if abi >= 6 else 0
    attr = _LandlockRulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall("landlock_create_ruleset", ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    try:
        rules: list[tuple[str, int]] = [("/", _LL_READ_FILE | _LL_READ_DIR | _LL_EXECUTE)]
        rules += [(path, fs) for path in writable]
        if os.path.exists("/dev/null"):
            rules.append(("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE))
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                if not os.path.isdir(f"/proc/self/fd/{fd}"):
                    access &= _LL_FILE_RIGHTS
                rule = _LandlockPathBeneath(access & fs, fd)
                _syscall("landlock_add_rule", ctypes.c_int(ruleset),
                         ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                         ctypes.c_uint32(0))
            finally:
                os.close(fd)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall("landlock_restrict_self", ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)


def seccomp_filter(*, allow_network: bool) -> list[tuple[int, int, int, int]]:
    """The seccomp program for this architecture as ``(code, jt, jf, k)`` instructions.

    Arch check first (a foreign arch, and x32 on x86_64, is KILL_PROCESS); then the
    :data:`_DENIED` syscalls -> EPERM; ``clone3`` -> ENOSYS (its flags live in memory a filter
    cannot read: libc falls back to ``clone``); ``clone`` with namespace flags -> EPERM;
    ``ioctl`` TIOCSTI/TIOCLINUX on the low 32 bits of the request -> EPERM (CVE-2019-10063);
    ``socket`` -> EPERM unless the network is allowed (then AF_UNIX/INET/INET6);
    ``socketpair`` of a family other than AF_UNIX -> EPERM. Default ALLOW. KILL_THREAD is never
    used (a killed thread holding the GIL hangs the process).
    """
    if _MACHINE not in _AUDIT_ARCH:
        raise IsolationUnavailable(f"seccomp: no syscall table for {_MACHINE}")
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    nr_off, arch_off = 0, 4

    def arg_lo(i: int) -> int:  # low 32 bits of args[i] (little-endian)
        return 16 + 8 * i

    prog: list[tuple[int, int, int, int]] = [
        (ld, 0, 0, arch_off),
        (jeq, 1, 0, _AUDIT_ARCH[_MACHINE]),
        (ret, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (ld, 0, 0, nr_off),
    ]
    if _MACHINE == "x86_64":
        prog += [(jge, 0, 1, _X32_SYSCALL_BIT), (ret, 0, 0, SECCOMP_RET_KILL_PROCESS)]
    rules = [(name, eperm) for name in _DENIED if name in _NR]
    rules.append(("clone3", SECCOMP_RET_ERRNO | errno.ENOSYS))
    for name, action in rules:
        prog += [(jeq, 0, 1, _NR[name]), (ret, 0, 0, action)]

    def block(nr: int, body: list[tuple[int, int, int, int]]) -> None:
        prog.append((jeq, 0, len(body), nr))
        prog.extend(body)

    # clone: deny any namespace flag.
    block(_NR["clone"], [(ld, 0, 0, arg_lo(0)), (jset, 1, 0, _CLONE_NS_FLAGS),
                         (ret, 0, 0, SECCOMP_RET_ALLOW), (ret, 0, 0, eperm)])

    def match_any(values: Sequence[int], on_match: int, otherwise: int,
                  arg: int) -> list[tuple[int, int, int, int]]:
        n = len(values)
        body = [(ld, 0, 0, arg_lo(arg))]
        body += [(jeq, n - i, 0, v) for i, v in enumerate(values)]
        return [*body, (ret, 0, 0, otherwise), (ret, 0, 0, on_match)]

    block(_NR["ioctl"], match_any([TIOCSTI, TIOCLINUX], eperm, SECCOMP_RET_ALLOW, 1))
    # socket(): nothing at all without the network. AF_UNIX included: a pathname socket of
    # the host (a 0666 one under /run, say) is reachable through the read-only view of /, and
    # neither DAC nor Landlock stops connect(2). socketpair() stays (asyncio needs it): its
    # sockets are born connected to each other and can reach nothing else.
    families = [AF_UNIX, AF_INET, AF_INET6] if allow_network else []
    block(_NR["socket"], match_any(families, SECCOMP_RET_ALLOW, eperm, 0))
    block(_NR["socketpair"], match_any([AF_UNIX], SECCOMP_RET_ALLOW, eperm, 0))
    prog.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    return prog


#: Loaded seccomp programs by ``allow_network``: built once (in the zygote, by
#: :func:`prepare`) and inherited by every fork, so a birth only loads one.
_seccomp_programs: dict[bool, tuple[Any, _SockFprog]] = {}


def _seccomp_program(allow_network: bool) -> _SockFprog:
    cached = _seccomp_programs.get(allow_network)
    if cached is None:
        prog = seccomp_filter(allow_network=allow_network)
        insns = (_SockFilter * len(prog))(*(_SockFilter(*insn) for insn in prog))
        fprog = _SockFprog(len(prog), ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
        cached = _seccomp_programs[allow_network] = (insns, fprog)
    return cached[1]


def _seccomp(config: IsolationConfig) -> None:
    fprog = _seccomp_program(config.allow_network)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    tid = _syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                   ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))
    if tid != 0:
        raise IsolationUnavailable(f"seccomp: thread {tid} could not be synchronised")


def restrict(config: IsolationConfig, *, writable: Collection[str] = (),
             mark: Callable[[str], None] | None = None) -> None:
    """Layers 4 and 5: Landlock (writes only under ``writable``), then seccomp with TSYNC.

    Refuses to run with more than one thread: Landlock before ABI 8 restricts only the
    calling thread. Call after :func:`drop_privileges` (NO_NEW_PRIVS is set here anyway).
    """
    if (config.landlock or config.seccomp) and _threads() != 1:
        raise IsolationUnavailable("landlock/seccomp: the worker has more than one thread")
    if config.landlock:
        _landlock(config, writable)
        if mark is not None:
            mark("landlock")
    if config.seccomp:
        _seccomp(config)
        if mark is not None:
            mark("seccomp")


def _status_text(path: str) -> dict[str, str]:
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def check_status(status: Mapping[str, str], config: IsolationConfig, ids: WorkerIds,
                 where: str) -> list[str]:
    """Mismatches between one ``/proc/<pid>/task/<tid>/status`` and what ``config`` promises.

    Shared by :func:`posture_check` (inside) and tests or a supervisor looking from outside.
    """
    bad = []
    if config.credentials:
        for key, want in (("Uid", ids.uid), ("Gid", ids.gid)):
            got = [int(x) for x in status.get(key, "").split()]
            if got != [want] * 4:
                bad.append(f"{where}: {key} {got} != {want}")
        if status.get("Groups", "").strip() and ids.change:
            bad.append(f"{where}: Groups {status['Groups'].strip()!r} not empty")
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            if int(status.get(key, "1"), 16) != 0:
                bad.append(f"{where}: {key} {status.get(key)} != 0")
    if (config.credentials or config.landlock or config.seccomp) \
            and status.get("NoNewPrivs") != "1":
        bad.append(f"{where}: NoNewPrivs {status.get('NoNewPrivs')} != 1")
    if config.seccomp and status.get("Seccomp") != "2":
        bad.append(f"{where}: Seccomp {status.get('Seccomp')} != 2 (filter)")
    return bad


def posture_check(config: IsolationConfig, ids: WorkerIds, *,
                  host_namespaces: Mapping[str, int],
                  allowed_fds: Collection[int]) -> None:
    """Layer 6: verify from inside that every layer took effect; raise :class:`PostureError`.

    Checks every thread's status (ids, capability sets, NoNewPrivs, Seccomp), that each
    enabled namespace differs from ``host_namespaces`` (:func:`namespace_ids` of the
    supervisor), that only ``allowed_fds`` are open, and that / is read-only with the
    private tmp writable.
    """
    bad: list[str] = []
    for tid in sorted(os.listdir("/proc/self/task"), key=int):
        try:
            status = _status_text(f"/proc/self/task/{tid}/status")
        except FileNotFoundError:
            continue
        bad += check_status(status, config, ids, f"thread {tid}")
    ours = namespace_ids()
    for layer in ("mount_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns"):
        if config.enabled(layer) and layer in host_namespaces \
                and ours[layer] == host_namespaces[layer]:
            bad.append(f"{layer}: still the supervisor's ({ours[layer]})")
    if config.pid_ns and os.getpid() != 1:
        bad.append(f"pid_ns: pid is {os.getpid()}, not 1")
    open_fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:  # the directory fd listdir used, closed by now
            continue
        open_fds.append(fd)
    extra = sorted(set(open_fds) - set(allowed_fds))
    if extra:
        bad.append(f"fds: {extra} open beyond the allowed {sorted(allowed_fds)}")
    if config.filesystem:
        # statvfs reports the flags of the mount a path is on (as mountinfo does, without
        # parsing it): / must be read-only, tmp a mount of its own and writable.
        if not os.statvfs("/").f_flag & os.ST_RDONLY:
            bad.append("filesystem: / is not read-only")
        tmp = os.path.normpath(config.tmp_dir)
        if not os.path.ismount(tmp) or os.statvfs(tmp).f_flag & os.ST_RDONLY:
            bad.append(f"filesystem: no private writable mount at {tmp}")
    if bad:
        raise PostureError(bad)


def apply_layers(config: IsolationConfig, ids: WorkerIds, *,
                 netns_fd: int | None = None,
                 host_namespaces: Mapping[str, int],
                 allowed_fds: Collection[int],
                 join_cgroups: Callable[[], None] | None = None,
                 after_drop: Callable[[], None] | None = None,
                 mark: Callable[[str], None] | None = None) -> str:
    """Every layer in order; ``join_cgroups`` runs first (the host's cgroupfs is read-only
    in our mount namespace);
    ``after_drop`` right after the credentials change (e.g. to check that the parent is still
    there: its death signal could not fire while being re-armed); ``mark(phase)`` after each
    step (the birth's phase timestamps).

    ``netns_fd`` is closed after use when it is not in ``allowed_fds``. Returns the tmp dir.
    """
    def step(phase: str) -> None:
        if mark is not None:
            mark(phase)

    if join_cgroups is not None:
        # First, while the host's /sys/fs/cgroup is still reachable and writable.
        join_cgroups()
        step("cgroups")
    enter_namespaces(config, netns_fd=netns_fd)
    if netns_fd is not None and netns_fd not in allowed_fds:
        os.close(netns_fd)
    template = template_fd()
    if template >= 0 and template not in allowed_fds:
        os.close(template)
    step("namespaces")
    tmp = setup_filesystem(config, ids)
    step("mounts")
    seal_filesystem(config)
    step("seal")
    if zygote_namespaces is not None and config.user_ns:
        # A user namespace of the worker's own below the zygote's, now that its mounts are
        # made (they stay owned by the zygote's): the kernel counts RLIMIT_NPROC per user
        # namespace and uid, so without it every worker of the zygote would share one count
        # and a fork bomb would starve its siblings' forks. No id is mapped in it (the map
        # is written through a /proc that is now read-only): the worker's ids stay the
        # caller's outside and read as the overflow id (65534) inside. It starts with a full
        # bounding set again, which drop_privileges empties.
        _unshare(CLONE_NEWUSER)
        ids = WorkerIds(os.getuid(), os.getgid(), False)
    drop_privileges(config, ids)
    if after_drop is not None:
        after_drop()
    step("credentials")
    restrict(config, writable=[tmp] if config.filesystem else [], mark=mark)
    posture_check(config, ids, host_namespaces=host_namespaces, allowed_fds=allowed_fds)
    step("posture")
    return tmp


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

def _probe(config: IsolationConfig, netns_fd: int | None) -> dict[str, str]:
    """In a forked child: try each layer's key operation; '' means it worked."""
    results: dict[str, str] = {}

    def attempt(layer: str, action: Callable[[], object]) -> None:
        try:
            action()
            results[layer] = ""
        except OSError as exc:
            results[layer] = f"{exc.strerror or exc}"

    root = os.geteuid() == 0
    if not root and zygote_namespaces is None:
        attempt("user_ns", enter_user_namespace)
    def pid_ns() -> None:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_pid_namespace_restorable(own)
        except IsolationUnavailable as exc:
            raise OSError(errno.EPERM, str(exc)) from None
        finally:
            os.close(own)
        _unshare(CLONE_NEWPID)

    attempt("pid_ns", pid_ns)
    attempt("ipc_ns", lambda: _unshare(CLONE_NEWIPC))
    attempt("uts_ns", lambda: _unshare(CLONE_NEWUTS))
    if netns_fd is not None:
        attempt("net_ns", lambda: _setns(netns_fd, CLONE_NEWNET))
    else:
        attempt("net_ns", lambda: _unshare(CLONE_NEWNET))
    attempt("mount_ns", lambda: _unshare(CLONE_NEWNS))

    def filesystem() -> None:
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("tmpfs", config.tmp_dir, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k")
        attr = _MountAttr(attr_set=MOUNT_ATTR_RDONLY)
        try:
            _syscall("mount_setattr", ctypes.c_int(AT_FDCWD), b"/",
                     ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr),
                     ctypes.c_size_t(ctypes.sizeof(attr)))
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise

    if results["mount_ns"] == "":
        attempt("filesystem", filesystem)
    else:
        results["filesystem"] = "needs a mount namespace"

    def credentials() -> None:
        if root:
            _prctl(PR_CAPBSET_DROP, 0)
            ids = worker_ids(config, 0)
            os.setgroups([])
            os.setresgid(ids.gid, ids.gid, ids.gid)
            os.setresuid(ids.uid, ids.uid, ids.uid)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)

    attempt("credentials", credentials)

    def seccomp() -> None:
        prog = [(0x06, 0, 0, SECCOMP_RET_ALLOW)]
        insns = (_SockFilter * 1)(_SockFilter(*prog[0]))
        fprog = _SockFprog(1, ctypes.cast(insns, ctypes.POINTER(_SockFilter)))
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall("seccomp", ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
                 ctypes.c_uint(SECCOMP_FILTER_FLAG_TSYNC), ctypes.byref(fprog))

    if _MACHINE in _AUDIT_ARCH:
        attempt("seccomp", seccomp)
    else:
        results["seccomp"] = f"no syscall table for {_MACHINE}"
    return results


def _run_probe(config: IsolationConfig, netns_fd: int | None) -> dict[str, str]:
    import json
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(_probe(config, netns_fd)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], 10.0)
            if not ready:
                os.kill(pid, 9)
                raise IsolationUnavailable("isolation probe child did not answer in 10 s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    try:
        result: dict[str, str] = json.loads(b"".join(chunks))
    except ValueError:
        raise IsolationUnavailable("isolation probe child died without a report") from None
    return result


def detect(config: IsolationConfig, *, netns_fd: int | None = None) -> IsolationReport:
    """Find which layers this kernel and our privileges allow; a few ms (forks one probe).

    Raises :class:`~sandbox.errors.IsolationUnavailable` in strict mode when an enabled layer
    is unavailable, naming every such layer. Call it before the process has threads (it
    forks), e.g. in the supervisor before the gRPC server starts.
    """
    root = os.geteuid() == 0
    probe = _run_probe(config, netns_fd)
    abi = landlock_abi()
    layers: dict[str, LayerStatus] = {}
    for layer in LAYERS:
        wanted = config.enabled(layer)
        if layer == "user_ns":
            if root:
                layers[layer] = LayerStatus(True, False, "not needed: running as root")
                continue
            if zygote_namespaces is not None:
                available, reason = True, (
                    f"the zygote's own ({zygote_namespaces['map']}), and each worker's own "
                    "below it (the caller's uid outside, 65534 inside)")
            else:
                available = probe["user_ns"] == ""
                reason = ("each worker's own (uid -> same uid)" if available
                          else userns_refusal(probe["user_ns"]))
        elif layer == "landlock":
            parts = ["fs"] + (["tcp"] if abi >= 4 else []) + (["scopes"] if abi >= 6 else [])
            available = abi >= 1
            reason = f"ABI {abi}: {', '.join(parts)}" if available else "not in this kernel"
        else:
            available = probe[layer] == ""
            reason = probe[layer]
            if available and layer == "credentials":
                reason = (f"uid/gid {config.uid_base}+slot" if root
                          else "user namespace: all capabilities dropped, host uid kept")
            elif available and layer == "net_ns":
                reason = "shared empty netns" if netns_fd is not None else "fresh empty netns"
            elif available and layer == "seccomp":
                reason = "filter with TSYNC, KILL_PROCESS"
            elif available and layer == "pid_ns":
                reason = ("each worker is pid 1 of its own"
                          + (", inside the zygote's" if zygote_namespaces is not None else ""))
        if not wanted:
            reason = "disabled by config" + (f" ({reason})" if reason else "")
        layers[layer] = LayerStatus(available, wanted and available, reason)
    if not root and not layers["user_ns"].available:
        # Without root and without a user namespace no namespace or mount is possible.
        for layer in ("mount_ns", "pid_ns", "net_ns", "ipc_ns", "uts_ns", "filesystem"):
            s = layers[layer]
            layers[layer] = LayerStatus(False, False, s.reason or "needs a user namespace")
    missing = [f"{name} ({s.reason})" for name, s in layers.items()
               if config.enabled(name) and not s.available
               and (name != "user_ns" or not root)]
    if missing and config.mode == "strict":
        raise IsolationUnavailable("isolation layers required but unavailable: "
                                   + ", ".join(missing))
    off = {name for name, s in layers.items()
           if config.enabled(name) and not s.available and (name != "user_ns" or not root)}
    if "mount_ns" in off:
        off.add("filesystem")
    changes: dict[str, Any] = dict.fromkeys(off, False)
    effective = replace(config, **changes)
    return IsolationReport(mode=config.mode, layers=layers, effective=effective,
                           kernel=os.uname().release, machine=_MACHINE, root=root,
                           landlock_abi=abi)
