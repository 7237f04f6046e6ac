"""OS isolation a sandbox applies to itself after it is forked and before it imports tenant code.

Three layers, each used where the kernel and our privileges allow, each reported in the sandbox's hello:

1. **Always** (any Linux): a clean process (forked from a zygote that holds no secrets, no inherited file
   descriptors but its channel and arena, a clean environment), its own session, death with its parent,
   rlimits (address space, CPU time, open files, file size, tasks, no core dumps), a lower priority,
   ``no_new_privs``.
2. **Namespaces** (root, or unprivileged user namespaces): a user namespace (so even a root server's sandbox
   holds no capability on the host), PID (the sandbox is init of its own namespace: killing it kills every
   process it made, and it sees only those), network (no interface but a down loopback: no TCP, UDP or
   abstract unix sockets to anywhere), IPC, UTS and mount. In the mount namespace, fresh tmpfs mounts cover
   /tmp (private, size-limited, the only writable place), /dev/shm (the host store's home) and /run, the
   function directory is bound read-only at ``/run/function`` (the sandbox's working directory) and every
   ``deny_paths`` entry (the node's home, its shared-memory directory) is covered by an empty read-only mount.
   Capabilities are dropped afterwards, so none of that can be undone.
3. **Landlock** (Linux >= 5.13, unprivileged): an allow-list for files, enforced by the kernel whatever the
   mounts: read-only the Python runtime and site-packages, system libraries, the function directory, a few
   /dev nodes and the sandbox's own /proc entry; read-write only the private /tmp; no execve anywhere. From
   ABI 4 TCP bind/connect is denied, from ABI 5 device ioctls, from ABI 6 signals to and abstract sockets of
   processes outside the sandbox.

Landlock is what enforces file isolation (mounts alone can be escaped by a path we did not think to cover);
``isolation="strict"`` refuses to run handlers without it. See docs/handlers.md for what is not covered.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from swapserve.sandbox.config import SandboxLimits

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
_NS_NAMES = {CLONE_NEWUSER: "user", CLONE_NEWPID: "pid", CLONE_NEWNET: "net", CLONE_NEWIPC: "ipc",
             CLONE_NEWUTS: "uts", CLONE_NEWNS: "mount"}

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECURE_ALL_BITS_LOCKED = 0x2F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS: set and locked (KEEP_CAPS itself off)

SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
FS_MAKE_SYM, FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

FUNCTION_MOUNT = "/run/function"
"""Where the function directory appears inside a sandbox that has a mount namespace."""
SYSTEM_READ_PATHS = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d",
                     "/etc/localtime", "/proc/cpuinfo", "/sys/devices/system/cpu")
"""Beside the interpreter's own: shared libraries, and what torch's CPU detection reads."""
DEV_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _fail(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _prctl(option: int, arg: int = 0) -> int:
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                       ctypes.c_ulong(0))


def die_with_parent() -> None:
    """SIGKILL this process when the process that forked it exits."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# --- namespaces ---------------------------------------------------------------------------------


def unshare_namespaces() -> list[str]:
    """Enter new namespaces: all of them with a user namespace if we may, else (root) without one, else
    none. Must run single-threaded (right after fork). Returns the names entered."""
    uid, gid = os.geteuid(), os.getegid()
    rest = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNS
    tries = [CLONE_NEWUSER | rest] + ([rest] if uid == 0 else [])
    for flags in tries:
        if _libc.unshare(ctypes.c_int(flags)) == 0:
            if flags & CLONE_NEWUSER:
                # The same ids inside: file ownership reads the same, but capabilities now count only in
                # the new namespace.
                Path("/proc/self/setgroups").write_text("deny")
                Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
                Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
            return [name for bit, name in _NS_NAMES.items() if flags & bit]
    return []


def become_init() -> None:
    """After entering a PID namespace: fork its init (which returns, and runs the sandbox) while this
    process stays behind as a shim that waits and exits with the same status. Killing the shim kills the
    sandbox (death signal), and with it every process in its namespace."""
    pid = os.fork()
    if pid == 0:
        die_with_parent()
        return
    os.closerange(0, _max_fd())  # the channel and arena belong to the sandbox alone: EOF when it dies
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                   data and data.encode()) != 0:
        raise _fail(f"mount {target}")


def setup_mounts(function_dir: str, deny_paths: Iterable[str], tmp_bytes: int, new_proc: bool) -> tuple[str, list[str]]:
    """In a fresh mount namespace: a private /tmp, an empty /dev/shm and /run, the function directory at
    :data:`FUNCTION_MOUNT` read-only, deny paths covered. Returns the function directory's path inside and
    the problems met (paths that could not be covered)."""
    problems: list[str] = []
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    safe = MS_NOSUID | MS_NODEV | MS_NOEXEC
    inside = function_dir
    if os.path.isdir("/run"):
        # Held open so that it can be bound even if the mounts below cover where it lives (/tmp, /run).
        fd = os.open(function_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _mount("tmpfs", "/run", "tmpfs", safe, "size=64k,mode=755")
            os.mkdir(FUNCTION_MOUNT)
            _mount(f"/proc/self/fd/{fd}", FUNCTION_MOUNT, None, MS_BIND | MS_REC)
        finally:
            os.close(fd)
        _mount(None, FUNCTION_MOUNT, None, MS_REMOUNT | MS_BIND | MS_RDONLY | safe)
        _mount(None, "/run", None, MS_REMOUNT | MS_RDONLY | safe, "size=64k,mode=755")
        inside = FUNCTION_MOUNT
    covers = [("/tmp", f"size={tmp_bytes},mode=1777" if tmp_bytes > 0 else "size=4k,mode=755", tmp_bytes <= 0),
              ("/dev/shm", "size=4k,mode=755", True)]
    covers += [(p, "size=4k,mode=755", True) for p in deny_paths]
    for path, options, readonly in covers:
        if inside != FUNCTION_MOUNT and _is_within(function_dir, path):
            problems.append(f"{path} holds the function directory and stays visible (no /run to move it to)")
            continue
        try:
            if os.path.isdir(path):
                _mount("tmpfs", path, "tmpfs", safe | (MS_RDONLY if readonly else 0), options)
            elif os.path.exists(path):
                _mount("/dev/null", path, None, MS_BIND)
        except OSError as e:
            problems.append(f"could not cover {path}: {e.strerror}")
    if new_proc:
        try:
            _mount("proc", "/proc", "proc", safe)
        except OSError as e:
            problems.append(f"no private /proc: {e.strerror}")
    return inside, problems


def set_hostname(name: str) -> None:
    _libc.sethostname(name.encode(), ctypes.c_size_t(len(name)))


# --- limits and privileges ----------------------------------------------------------------------


def set_limits(limits: SandboxLimits, own_user_namespace: bool) -> dict[str, int]:
    """Hard rlimits (the handler cannot raise them) and a lower priority. The address-space limit counts
    from what is mapped now (Python, torch, the arena), so ``memory_bytes`` is the handler's to use. The
    task limit only in a user namespace of our own: elsewhere it would count every process of the user."""
    base = _vm_size()
    values = {
        "RLIMIT_AS": base + limits.memory_bytes,
        "RLIMIT_CPU": limits.cpu_seconds,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_FSIZE": limits.file_bytes,
        "RLIMIT_CORE": 0,
    }
    if own_user_namespace:
        values["RLIMIT_NPROC"] = limits.tasks
    for name, v in values.items():
        resource.setrlimit(getattr(resource, name), (v, v))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead
    os.nice(limits.nice)
    return values


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmSize in /proc/self/status")


def no_new_privs() -> None:
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        raise _fail("prctl(PR_SET_NO_NEW_PRIVS)")


def drop_capabilities() -> bool:
    """Drop every capability (bounding, ambient, effective, permitted, inheritable) and lock root's special
    treatment off. True if capset succeeded."""
    for cap in range(64):
        if _prctl(PR_CAPBSET_DROP, cap) != 0 and ctypes.get_errno() == errno.EINVAL:
            break
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_SECUREBITS, SECURE_ALL_BITS_LOCKED)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = Header(0x20080522, 0), (Data * 2)()
    return _libc.capset(ctypes.byref(header), ctypes.byref(data)) == 0


# --- Landlock -----------------------------------------------------------------------------------


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where there is none (old kernel, or not enabled at boot)."""
    try:
        v = _libc.syscall(ctypes.c_long(SYS_landlock_create_ruleset), None, ctypes.c_size_t(0),
                          ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    except (AttributeError, OSError):
        return 0
    return max(0, int(v))


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


def apply_landlock(abi: int, read: Iterable[str], read_write: Iterable[str], devices: Iterable[str]) -> list[str]:
    """Restrict this process (and what it forks) to the given paths. ``read``: files and directories
    readable beneath; ``read_write``: directories with full access but execute; ``devices``: character
    devices readable and writable (no ioctl). Everything else, execve included, is denied. Returns the
    paths that were skipped (missing)."""
    handled = _fs_rights(abi)
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rfd = _libc.syscall(ctypes.c_long(SYS_landlock_create_ruleset), ctypes.byref(attr), ctypes.c_size_t(size),
                        ctypes.c_uint32(0))
    if rfd < 0:
        raise _fail("landlock_create_ruleset")
    skipped: list[str] = []
    rw = (FS_READ_FILE | FS_READ_DIR | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG
          | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE) & handled
    try:
        for paths, rights in ((read, FS_READ_FILE | FS_READ_DIR), (read_write, rw),
                              (devices, FS_READ_FILE | FS_WRITE_FILE)):
            for p in paths:
                try:
                    fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    skipped.append(p)
                    continue
                try:
                    allowed = rights if os.path.isdir(p) else rights & FILE_RIGHTS
                    rule = _PathBeneathAttr(allowed & handled, fd)
                    if _libc.syscall(ctypes.c_long(SYS_landlock_add_rule), ctypes.c_int(rfd),
                                     ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)):
                        raise _fail(f"landlock_add_rule({p})")
                finally:
                    os.close(fd)
        no_new_privs()
        if _libc.syscall(ctypes.c_long(SYS_landlock_restrict_self), ctypes.c_int(rfd), ctypes.c_uint32(0)):
            raise _fail("landlock_restrict_self")
    finally:
        os.close(rfd)
    return skipped


def runtime_read_paths() -> list[str]:
    """What the sandbox must read to run Python: the interpreter's prefixes, sys.path, this package's
    source, system libraries."""
    import swapserve

    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    package = Path(swapserve.__file__).resolve().parent
    # A source checkout is on sys.path as its root (the launcher puts it there): of it, only the package.
    checkout = str(package.parent) if not any(_is_within(str(package), p) for p in prefixes) else None
    paths = {*prefixes, str(package), *SYSTEM_READ_PATHS}
    paths.update(p for p in sys.path if p and os.path.isabs(p) and p != checkout)
    return sorted(p for p in paths if os.path.exists(p))


def _is_within(path: str, parent: str) -> bool:
    p, q = os.path.realpath(path), os.path.realpath(parent)
    return p == q or p.startswith(q.rstrip("/") + "/")


def drop_covering(paths: Iterable[str], deny_paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """Read paths that do not contain any deny path (a Landlock rule grants everything beneath), and the
    ones dropped."""
    keep, dropped = [], []
    deny = list(deny_paths)
    for p in paths:
        (dropped if any(_is_within(d, p) for d in deny) else keep).append(p)
    return keep, dropped


def _max_fd() -> int:
    return min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 16)


def describe(report: dict[str, Any]) -> str:
    """One line a server log can carry: what a sandbox is isolated by, and what it is not."""
    parts = []
    abi = report.get("landlock_abi", 0)
    if report.get("mode") == "off":
        return "sandbox isolation OFF (isolation='off'): handler code runs with rlimits only"
    if abi:
        parts.append(f"Landlock ABI {abi} (files" + (", TCP" if abi >= 4 else "") + (", signals" if abi >= 6 else "") + ")")
    ns = report.get("namespaces") or []
    parts.append(f"namespaces {'+'.join(ns)}" if ns else "no namespaces")
    parts.append(f"rlimits, nice {report.get('nice', '?')}")
    missing = list(report.get("problems") or [])
    if not abi:
        missing.insert(0, "NO FILE ISOLATION: Landlock is unavailable (kernel < 5.13 or not enabled), so handler "
                          "code can read any file the server's user can except the covered paths")
    if not ns:
        missing.append("no namespaces (neither root nor unprivileged user namespaces): handler code shares the "
                       "network, and its child processes are not confined to a PID namespace")
    line = "sandbox isolation: " + ", ".join(parts)
    return line + ("; missing: " + "; ".join(missing) if missing else "")
