"""errno -> typed exceptions, the one error checker for every syscall wrapper."""

from __future__ import annotations

import ctypes
import errno
import os


class KernelError(OSError):
    """A syscall failed; ``errno`` says why."""


class NotPackaged(KernelError):
    """ENOPKG: the kernel was built without the facility (e.g. CONFIG_WATCH_QUEUE)."""


class NoSuchKey(KernelError):
    """ENOKEY: no such key, or it was garbage-collected."""


class KeyRevoked(KernelError):
    """EKEYREVOKED: the key has been revoked."""


class KeyExpired(KernelError):
    """EKEYEXPIRED: the key has expired."""


class PermissionDenied(KernelError):
    """EACCES / EPERM."""


class Busy(KernelError):
    """EBUSY / EAGAIN: a resource is in use or a quota is exhausted."""


class NotSupported(KernelError):
    """EOPNOTSUPP / ENOSYS / EINVAL for an unknown operation."""


class UnsupportedArchitecture(NotSupported):
    """wqd declares no syscall number or struct layout *what* for this *machine*
    (``wqd.kernel.libc``): raised when it is used, never at import."""

    def __init__(self, what: str, machine: str) -> None:
        super().__init__(errno.ENOSYS, f"{what}: not declared for {machine or 'this machine'} in wqd.kernel.libc")
        self.what = what
        self.machine = machine

    def __str__(self) -> str:  # the reason a source shows as unavailable: no "[Errno 38]"
        return self.strerror

    def __reduce__(self):
        return type(self), (self.what, self.machine)


_BY_ERRNO: dict[int, type[KernelError]] = {
    errno.ENOPKG: NotPackaged,
    errno.ENOKEY: NoSuchKey,
    errno.EKEYREVOKED: KeyRevoked,
    errno.EKEYEXPIRED: KeyExpired,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EBUSY: Busy,
    errno.EAGAIN: Busy,
    errno.EOPNOTSUPP: NotSupported,
    errno.ENOSYS: NotSupported,
}


def error_for(err: int, what: str) -> KernelError:
    cls = _BY_ERRNO.get(err, KernelError)
    return cls(err, f"{what}: {os.strerror(err)}")


def check(result: int, what: str) -> int:
    """Return *result*, or raise the typed error for ``errno`` if it is -1."""
    if result == -1:
        raise error_for(ctypes.get_errno(), what)
    return result


def typed(exc: OSError, what: str) -> KernelError:
    """Turn an OSError raised by the stdlib (os.pipe2, fcntl.ioctl) into ours."""
    if isinstance(exc, KernelError):
        return exc
    return error_for(exc.errno or errno.EIO, what)
