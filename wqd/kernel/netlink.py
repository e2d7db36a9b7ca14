"""Netlink uevent sockets: the receive buffer and the kernel's drop counter.

Constants from include/uapi/asm-generic/socket.h (``SOL_SOCKET`` options) and
include/uapi/linux/netlink.h.
"""

from __future__ import annotations

import os
import socket
import struct

from wqd.kernel.errors import typed

NETLINK_KOBJECT_UEVENT = 15  # linux/netlink.h
SOL_SOCKET = 1  # asm-generic/socket.h
SO_RCVBUF = 8  # asm-generic/socket.h
SO_PASSCRED = 16  # asm-generic/socket.h
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: may exceed net.core.rmem_max; needs CAP_NET_ADMIN
SCM_CREDENTIALS = 2  # linux/socket.h: struct ucred {pid_t pid; uid_t uid; gid_t gid;}
UCRED_SIZE = 12
RECEIVE_BUFFER_MAX = 1 << 30  # the kernel clamps to INT_MAX / 2 (net/core/sock.c, __sock_set_rcvbuf)


def uevent_socket(fd: int) -> socket.socket:
    """A socket object of our own (a duplicate fd) for the netlink socket *fd*."""
    dup = os.dup(fd)
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT, fileno=dup)
    except OSError:
        os.close(dup)
        raise


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for *size* bytes of receive buffer; return what the socket now has.

    ``SO_RCVBUFFORCE`` first (root with ``CAP_NET_ADMIN``), else ``SO_RCVBUF``,
    which the kernel caps at ``net.core.rmem_max``. The kernel doubles the value
    for its bookkeeping; the figure returned is the usable half.
    """
    size = max(1, min(size, RECEIVE_BUFFER_MAX))
    try:
        sock.setsockopt(SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        try:
            sock.setsockopt(SOL_SOCKET, SO_RCVBUF, size)
        except OSError as exc:
            raise typed(exc, "setsockopt(SO_RCVBUF)") from None
    except OSError as exc:
        raise typed(exc, "setsockopt(SO_RCVBUFFORCE)") from None
    return sock.getsockopt(SOL_SOCKET, SO_RCVBUF) // 2


def sender_uid(ancdata: list) -> int | None:
    """The uid in the ``SCM_CREDENTIALS`` control message of a ``recvmsg``, if any."""
    for level, kind, data in ancdata:
        if level == SOL_SOCKET and kind == SCM_CREDENTIALS and len(data) >= UCRED_SIZE:
            return struct.unpack_from("=iII", data)[1]
    return None


def drops_table() -> str:
    """``/proc/self/net/netlink`` (parsed by ``wqd.parse.uevent.netlink_drops``)."""
    with open("/proc/self/net/netlink") as f:
        return f.read()
