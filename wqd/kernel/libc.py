"""The one libc loader and the one table of what differs between architectures.

Everything in ``wqd/kernel/`` that calls libc goes through ``LIBC`` (``function``)
and ``syscall``; everything whose number or layout depends on the machine is
declared below, per architecture (``platform.machine()``), and looked up when it
is *used*. Nothing here fails at import: on a machine the table does not
declare, the lookup raises ``UnsupportedArchitecture`` (a ``NotSupported``
naming the syscall and the machine), so the sources that need it report
unavailable with that reason and the others run (``require``, ``wqd.daemon``).

Sources of the numbers:

- x86_64: arch/x86/entry/syscalls/syscall_64.tbl (asm/unistd_64.h).
- aarch64: include/uapi/asm-generic/unistd.h, which arm64 uses as is
  (``/* security/keys/keyctl.c */`` add_key 217, request_key 218, keyctl 219;
  statmount 457 and listmount 458 are the same on every architecture since 6.8).
- ioctl numbers: the generic encoding of include/uapi/asm-generic/ioctl.h.
- struct statfs (fstatfs(2), for the fanotify ``fsid``): include/uapi/asm-generic/statfs.h
  on a 64-bit ``__kernel_long_t``, which x86_64 and arm64 share: seven 8-byte
  words, then ``__kernel_fsid_t f_fsid`` at byte 56, 120 bytes in all.
"""

from __future__ import annotations

import ctypes
import platform

from wqd.kernel.errors import UnsupportedArchitecture, check

MACHINE = platform.machine()

LIBC = ctypes.CDLL(None, use_errno=True)  # the process's libc; resolving symbols is arch-neutral
_syscall = LIBC["syscall"]  # indexing gives a function object of our own (attributes are shared)
_syscall.restype = ctypes.c_long

# architecture -> syscall name -> number
SYSCALL_NUMBERS: dict[str, dict[str, int]] = {
    "x86_64": {"add_key": 248, "request_key": 249, "keyctl": 250, "statmount": 457, "listmount": 458},
    "aarch64": {"add_key": 217, "request_key": 218, "keyctl": 219, "statmount": 457, "listmount": 458},
}

# architecture -> ioctl name -> request number. Both use the generic _IOC encoding
# (include/uapi/asm-generic/ioctl.h); powerpc, mips, sparc and alpha do not.
IOCTLS: dict[str, dict[str, int]] = {
    "x86_64": {"NS_GET_MNTNS_ID": 0x8008B705},  # include/uapi/linux/nsfs.h: _IOR(0xb7, 0x5, __u64)
    "aarch64": {"NS_GET_MNTNS_ID": 0x8008B705},
}

# architecture -> layout name -> (size, field offsets...)
LAYOUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "x86_64": {"statfs": (120, 56)},  # (sizeof(struct statfs), offsetof f_fsid)
    "aarch64": {"statfs": (120, 56)},
}


def syscall_number(name: str) -> int:
    """The number of syscall *name* here; ``UnsupportedArchitecture`` if undeclared."""
    number = SYSCALL_NUMBERS.get(MACHINE, {}).get(name)
    if number is None:
        raise UnsupportedArchitecture(name, MACHINE)
    return number


def ioctl_number(name: str) -> int:
    """The request number of ioctl *name* here; ``UnsupportedArchitecture`` if undeclared."""
    number = IOCTLS.get(MACHINE, {}).get(name)
    if number is None:
        raise UnsupportedArchitecture(name, MACHINE)
    return number


def layout(name: str) -> tuple[int, ...]:
    """The declared layout *name* (see ``LAYOUTS``) here; ``UnsupportedArchitecture`` if undeclared."""
    found = LAYOUTS.get(MACHINE, {}).get(name)
    if found is None:
        raise UnsupportedArchitecture(f"struct {name}", MACHINE)
    return found


def require(*names: str) -> None:
    """Raise ``UnsupportedArchitecture`` for the first of *names* (syscalls, or
    ``struct NAME`` layouts) this machine has no entry for: a source checks what it
    needs when it opens, so it is unavailable with the reason rather than failing later."""
    for name in names:
        if name.startswith("struct "):
            layout(name[len("struct "):])
        else:
            syscall_number(name)


def function(name: str, restype, *argtypes):
    """The libc function *name* with its prototype declared (a function object of the caller's own)."""
    func = LIBC[name]
    func.restype = restype
    func.argtypes = list(argtypes)
    return func


def syscall(name: str, *args) -> int:
    """Call syscall *name*; raise the typed error on -1 (``UnsupportedArchitecture``
    without a number for this machine)."""
    return check(_syscall(ctypes.c_long(syscall_number(name)), *args), name)
