"""The sandbox's syscall filter, compiled by libseccomp (the system library, through ctypes).

:func:`filter_bpf` returns a classic-BPF seccomp program that the bootstrap
(:mod:`.sandbox_child`) installs just before it execs the untrusted program, in every mode. The
filter allows everything except the syscalls below, which fail with ``EPERM``:

* namespaces and mounts: ``unshare``, ``setns``, ``clone`` with any ``CLONE_NEW*`` flag,
  ``mount`` and the new mount API, ``pivot_root``, ``chroot`` (so no nested user namespace,
  which is where most kernel privilege-escalation bugs are reached from);
* keys: ``keyctl``, ``add_key``, ``request_key`` (no keyring is reachable at all);
* other processes' memory: ``ptrace``, ``process_vm_readv/writev``, ``kcmp``, ``pidfd_getfd``;
* large kernel attack surface a test program never needs: ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring_*``, ``open_by_handle_at``, ``personality``;
* host administration: modules, kexec, reboot, swap, clocks, hostname, quotas, ``syslog``,
  ``acct``, ``iopl``/``ioperm``;
* ``ioctl(TIOCSTI / TIOCLINUX)``: no typing into a terminal;
* with ``deny_ipc`` (modes without an IPC namespace): SysV shared memory, semaphores and
  message queues, and POSIX message queues.

``clone3`` fails with ``ENOSYS`` instead: its flags live in memory a filter cannot read, and
ENOSYS makes glibc fall back to ``clone``, whose flags it can. Syscalls of another ABI (i386,
x32 on x86_64) kill the process (libseccomp's default for a foreign architecture).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000  # SCMP_ACT_ERRNO(e) = _ERRNO | e
_MASKED_EQ = 7  # enum scmp_compare
_CLONE_NEW = {  # CLONE_NEWNS .. CLONE_NEWNET (CLONE_NEWTIME exists only for unshare/clone3)
    "ns": 0x00020000,
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
}
_TIOCSTI, _TIOCLINUX = 0x5412, 0x541C
DENIED = (
    *("unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot"),
    *("open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr"),
    *("keyctl", "add_key", "request_key"),
    *("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd"),
    *("bpf", "perf_event_open", "userfaultfd", "open_by_handle_at", "personality"),
    *("io_uring_setup", "io_uring_enter", "io_uring_register"),
    *("init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load"),
    *("reboot", "swapon", "swapoff", "syslog", "acct", "quotactl", "quotactl_fd"),
    *("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
    *("sethostname", "setdomainname", "iopl", "ioperm", "vhangup", "uselib"),
)
IPC = (
    *("shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl"),
    *("msgget", "msgsnd", "msgrcv", "msgctl", "ipc"),
    *("mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr"),
)


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def _lib() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def syscall_number(name: str) -> int | None:
    """The native number of syscall ``name`` (None without libseccomp or on another arch)."""
    lib = _lib()
    nr = lib.seccomp_syscall_resolve_name(name.encode()) if lib else -1
    return nr if nr >= 0 else None


@functools.cache
def filter_bpf(deny_ipc: bool = False) -> bytes:
    """The filter as raw ``struct sock_filter`` entries; raises OSError without libseccomp."""
    lib = _lib()
    if lib is None:
        raise OSError(errno.ENOENT, "libseccomp.so.2 not found (Debian: libseccomp2)")
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        for name in DENIED + (IPC if deny_ipc else ()):
            _rule(lib, ctx, errno.EPERM, name)
        for flag in _CLONE_NEW.values():
            _rule(lib, ctx, errno.EPERM, "clone", (0, flag, flag))
        for request in (_TIOCSTI, _TIOCLINUX):
            _rule(lib, ctx, errno.EPERM, "ioctl", (1, 0xFFFFFFFF, request))
        _rule(lib, ctx, errno.ENOSYS, "clone3")
        fd = os.memfd_create("opd-seccomp")
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "seccomp_export_bpf")
            os.lseek(fd, 0, os.SEEK_SET)
            bpf = b"".join(iter(lambda: os.read(fd, 1 << 16), b""))
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
    assert bpf and len(bpf) % 8 == 0, len(bpf)
    return bpf


def _rule(lib: ctypes.CDLL, ctx: int, err: int, name: str, masked_eq: tuple = ()) -> None:
    """``name`` fails with ``err`` (when ``arg & mask == value`` for ``(arg, mask, value)``)."""
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp; other arches get pseudo-numbers
        return
    cmp = (_ArgCmp * 1)(_ArgCmp(masked_eq[0], _MASKED_EQ, *masked_eq[1:])) if masked_eq else None
    _check(lib.seccomp_rule_add_array(ctx, _ERRNO | err, nr, len(masked_eq) > 0, cmp), name)


def _check(ret: int, what: str) -> None:
    if ret < 0:
        raise OSError(-ret, f"libseccomp {what}: {os.strerror(-ret)}")
