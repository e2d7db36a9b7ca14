"""The uevent monitor of the ``devices`` source: one netlink socket, read on the event loop.

pyudev sets the socket up (``Monitor.from_netlink``: the multicast group,
``SO_PASSCRED``, non-blocking, and the BPF subsystem filter libudev builds in
``filter_by``) and enumerates devices (``Context.list_devices``). The datagrams
are read here, with ``recvmsg`` on a duplicate of the monitor's fd, by one
``add_reader`` callback, and parsed by ``wqd.parse.uevent`` with libudev's own
sender checks. Not through ``Monitor.poll``:

- ``poll()`` turns ``POLLERR`` into a bare ``OSError`` without an errno, and
  ``POLLERR`` is how the kernel says ``ENOBUFS``: loss could not be told from
  failure, and the error would never be cleared;
- ``udev_monitor_receive_device`` plus reading the properties through ctypes
  costs about 80 µs an event on this machine kind; ``recvmsg`` and the parser
  about 10 µs.

Backends: ``udev`` (group 2: events after systemd-udevd processed them, with the
properties its rules added) and ``uevent`` (group 1: the kernel's raw uevents).
libudev can push the subscription filter into the kernel only for ``udev``
messages (they carry a subsystem hash at a fixed offset); the kernel's own
format has none, so for ``uevent`` every uevent reaches wqd and is dropped by
subsystem in userspace.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Iterable

from wqd.kernel import errors as kerr
from wqd.kernel.netlink import RECEIVE_BUFFER_MAX, drops_table, sender_uid, set_receive_buffer, uevent_socket
from wqd.parse.uevent import Malformed, Untrusted, netlink_drops, parse_datagram, parse_uevent_file
from wqd.sources.reader import FdReader

log = logging.getLogger(__name__)

UDEV_CONTROL = "/run/udev/control"  # systemd-udevd's control socket (udev-ctrl.c)
DATAGRAM_MAX = 64 * 1024  # libudev takes 8 KiB; udevd's messages with many links can be longer
ANCILLARY = socket.CMSG_SPACE(12)  # struct ucred
READS_PER_WAKEUP = 64  # bounded work per callback: method calls are answered during a storm


def udevd_running(control: str = UDEV_CONTROL) -> bool:
    """Whether systemd-udevd serves this machine: its control socket exists and accepts.

    A socket left behind by a udevd that is gone refuses (``ECONNREFUSED``). An
    instance that may not connect (not root: the socket is 0600) trusts its existence.
    """
    try:
        st = os.stat(control)
    except OSError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(control)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # EACCES, EAGAIN (backlog full): it is there
        return True
    finally:
        probe.close()


class UeventMonitor:
    """One netlink uevent socket. *handler* gets ``uevent(event)``, ``overrun()``,
    ``malformed(why)`` and ``caught_up()``; *sink* says when to pause (back-pressure)."""

    def __init__(self, backend: str, receive_buffer: int, handler, sink) -> None:
        import pyudev

        self.backend = backend
        self.handler = handler
        self.sink = sink
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source="udev" if backend == "udev" else "kernel")
        self.monitor.start()  # bind, SO_PASSCRED, O_NONBLOCK
        self.sock = uevent_socket(self.monitor.fileno())
        try:
            self.sock.setblocking(False)
            self.buffer = set_receive_buffer(self.sock, receive_buffer)
            self.inode = os.fstat(self.sock.fileno()).st_ino
        except BaseException:
            self.sock.close()
            raise
        self.filter: frozenset[str] | None = None  # what the kernel lets through; None: everything
        self.drops_seen = self.drops() or 0
        self.closed = False
        self._errors = 0
        self.reader = FdReader(self.sock.fileno(), sink, self._read_one, "uevents", READS_PER_WAKEUP)
        log.debug("uevent monitor (%s) open, receive buffer %d bytes", backend, self.buffer)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.reader.close()
        self.sock.close()
        self.monitor = None  # libudev closes its socket when the monitor is released

    # -- the subsystem filter ------------------------------------------------

    def set_filter(self, subsystems: frozenset[str] | None) -> None:
        """Let only *subsystems* through (``None``: everything). ``udev`` only; see the module doc.

        libudev's filters are additive: growing the set adds to the kernel filter
        in place; anything else clears it first and rebuilds it, so that in between
        more passes, never less.
        """
        if self.backend != "udev" or subsystems == self.filter:
            return
        old = self.filter
        if subsystems is not None and old is not None and subsystems >= old:
            for name in sorted(subsystems - old):
                self.monitor.filter_by(name)
        else:
            try:
                self.monitor.remove_filter()
            except FileNotFoundError:  # SO_DETACH_FILTER: none was attached
                pass
            for name in sorted(subsystems or ()):
                self.monitor.filter_by(name)
        self.filter = subsystems
        log.debug("uevent filter: %s", "none" if subsystems is None else ", ".join(sorted(subsystems)))

    # -- reading -------------------------------------------------------------

    def _read_one(self) -> bool:
        """One datagram (FdReader pauses us while the hub is congested: uevents then wait
        in the socket's large buffer; if that overflows, ENOBUFS says so)."""
        handler = self.handler
        try:
            data, ancdata, flags, address = self.sock.recvmsg(DATAGRAM_MAX, ANCILLARY)
        except BlockingIOError:
            self._errors = 0
            handler.caught_up()
            return False
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                handler.overrun()
                return True
            self._errors += 1
            if self._errors == 1 or self._errors % 1000 == 0:
                log.error("reading uevents: %s (%d time(s))", exc, self._errors)
            return False
        if flags & socket.MSG_TRUNC:
            handler.malformed(f"a uevent longer than {DATAGRAM_MAX} bytes")
            return True
        try:
            event = parse_datagram(data, address[1], address[0], sender_uid(ancdata))
        except Untrusted as exc:
            log.debug("uevent ignored: %s", exc)
            return True
        except Malformed as exc:
            handler.malformed(str(exc))
            return True
        handler.uevent(event)
        return True

    # -- loss ------------------------------------------------------------------

    def drops(self) -> int | None:
        """The kernel's count of uevents it could not queue on this socket."""
        try:
            return netlink_drops(drops_table(), self.inode)
        except OSError:
            return None

    def new_drops(self) -> int | None:
        """Drops since the last call; ``None`` when the kernel's counter cannot be read."""
        now = self.drops()
        if now is None:
            return None
        new, self.drops_seen = max(0, now - self.drops_seen), now
        return new

    def enlarge(self) -> None:
        if self.buffer >= RECEIVE_BUFFER_MAX // 2:
            return
        try:
            granted = set_receive_buffer(self.sock, self.buffer * 2)
        except kerr.KernelError as exc:
            log.warning("cannot enlarge the uevent receive buffer: %s", exc)
            return
        if granted > self.buffer:
            log.info("uevent receive buffer enlarged from %d to %d bytes", self.buffer, granted)
        else:
            log.warning("uevent receive buffer stays at %d bytes (net.core.rmem_max; SO_RCVBUFFORCE needs "
                        "CAP_NET_ADMIN)", self.buffer)
        self.buffer = granted

    # -- enumeration ---------------------------------------------------------------

    def enumerate(self, subsystems: Iterable[str] | None) -> dict[str, tuple[str, dict[str, str]]]:
        """Devices that exist now: devpath -> (subsystem, properties), of *subsystems*
        (``None``: all). ``udev``: sysfs and udev's database, as udev events carry
        them; ``uevent``: the sysfs ``uevent`` file, as kernel uevents carry them."""
        listings = [self.context.list_devices()] if subsystems is None else [
            self.context.list_devices(subsystem=name) for name in sorted(subsystems)]
        table: dict[str, tuple[str, dict[str, str]]] = {}
        for listing in listings:
            for device in listing:
                try:
                    devpath, subsystem = device.device_path, device.subsystem
                    if not subsystem:
                        continue
                    if self.backend == "udev":
                        props = dict(device.properties)
                    else:
                        with open(f"/sys{devpath}/uevent", encoding="utf-8", errors="replace") as f:
                            props = parse_uevent_file(f.read(), devpath, subsystem)
                except (OSError, LookupError, ValueError):  # gone meanwhile (pyudev's DeviceNotFoundError)
                    continue
                table[devpath] = (subsystem, props)
        return table
