"""The raw syscalls wqd needs that the stdlib does not wrap.

Declared as a table: (name, syscall number on x86_64, argument types).
Numbers from arch/x86/entry/syscalls/syscall_64.tbl
(/usr/include/x86_64-linux-gnu/asm/unistd_64.h).
"""

from __future__ import annotations

import ctypes
import os

from wqd.kernel.errors import check

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

if os.uname().machine != "x86_64":  # pragma: no cover
    raise ImportError("wqd.kernel.libc: syscall numbers are declared for x86_64 only")

# name -> syscall number (asm/unistd_64.h)
SYSCALLS = {
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
}


def syscall(name: str, *args) -> int:
    """Call syscall *name*; raise the typed error on -1."""
    return check(_syscall(ctypes.c_long(SYSCALLS[name]), *args), name)
