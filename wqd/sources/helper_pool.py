"""Key operations with another user's credentials, out of the event loop and out of
that user's reach: the daemon's pool of credential helper processes.

The key subsystem has no capability that lets root see every user's keys: a key is
visible to whoever its permission word grants View. So to describe a key as a peer
would see it, poll it, or arm a watch on a key only the peer may view, the daemon
acts with the peer's credentials and lets the kernel judge.

What the kernel reads (security/keys/permission.c ``key_task_permission``): the
*fsuid*, *fsgid* and supplementary groups of the acting task, plus possession
(searching its thread, process and session keyrings). What it reads to resolve
``@u``/``@us`` (security/keys/process_keys.c ``look_up_user_keyrings``): the real
uid's ``user_struct`` (``cred->user``); ``@p`` (``KEYCTL_GET_PERSISTENT`` with -1):
the real uid too. Checked on this host: with only the fsuid changed, ``@u`` is
root's ``_uid.0``; with the real uid changed it is the peer's ``_uid.N``.

Design, and why:

- **One long-lived helper process per credential set** (uid, gid, groups), started
  by exec (``python -I -S`` running ``wqd.kernel.cred_helper`` only: 80 ms on this
  host idle, 0.2-0.5 s loaded, seconds under qemu TCG; once per credential set,
  with its own allowance ``SPAWN_TIMEOUT``), talked to over a socketpair with
  asyncio streams: the loop never blocks on it. Its real, effective and saved uid
  stay 0; only ``setfsuid``/``setfsgid``/``setgroups`` take the peer's values. So
  the peer may not signal it (kill(2) compares the sender's real/effective uid with
  the target's real/saved uid), renice or re-schedule it (setpriority(2),
  sched_setaffinity(2) compare with the target's real/effective uid), nor trace it
  or read its memory (ptrace access needs all three uids equal, and the helper is
  not dumpable). It joins a fresh anonymous session keyring, so it possesses
  nothing of root's (no root session keys lent to the peer's checks).
- **``@u``/``@us``/``@p`` without the real uid**: ``@p`` names the uid explicitly
  (root may); ``@u``/``@us`` are found in the kernel's register of user keyrings
  (see ``op_resolve``). Only a user keyring that does not exist yet needs the
  kernel's own lookup, which reads the real uid: for that one syscall the helper
  sets its real uid to the peer's (effective and saved stay 0, so it can switch
  back) and restores it, the fsuid, its nice value, scheduling policy and CPU mask
  right after. During those microseconds (once per uid and boot) the peer *may*
  signal it; all catchable signals are ignored, a SIGSTOP or SIGKILL then hits the
  peer's own helper only (one per credential set), which the deadline below
  replaces. No other peer shares it.
- Threads with per-thread credentials (raw ``setfsuid`` in a worker thread) were
  rejected: a thread cannot be killed when a call hangs, and a thread whose real uid
  is the peer's (needed for ``@u``) may be ``tgkill``-ed by the peer, which stops or
  kills the whole daemon.
- Every call has a **deadline** (``[keys] helper_timeout``): past it the helper is
  killed (SIGKILL: root owns it), every call queued on it is answered
  ``Failed``, and the next call starts a new one. A helper that dies answers its
  calls at once.
- Helpers are bounded: a few per uid (``PER_UID``), ``[keys] helpers_max`` in all,
  at most ``MAX_PENDING`` queued calls each; beyond that ``LimitsExceeded``. To make
  room, one unused for ``EVICTABLE_AFTER`` seconds is stopped (never one in use, so
  credential sets taking turns cannot make wqd start a helper per call); one idle
  ``IDLE`` seconds is stopped anyway. Each is a ~17 MiB process (RSS measured here).

The helper runs only the operations in ``cred_helper.OPS`` (no arbitrary code):
requests and replies are length-prefixed pickles between two root processes on a
private socketpair; what a helper returns comes from the kernel through code
written here.

The pure parts, ``Credentials`` and the framing, are ``wqd.kernel.credentials``'s;
this module is the asyncio side, so it sits with the sources that use it (keys),
above the kernel layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterable

from wqd.errors import LimitsExceeded, WqdError
from wqd.kernel import errors as kerr
from wqd.kernel.cred_helper import READY
from wqd.kernel.credentials import FRAME, MAX_MESSAGE, Credentials

log = logging.getLogger(__name__)

PER_UID = 4  # credential sets (helpers) of one uid at once
MAX_PENDING = 256  # calls queued on one helper
IDLE = 30.0  # seconds an unused helper lives
EVICTABLE_AFTER = 5.0  # seconds unused before a helper may be stopped to make room for another
SPAWN_TIMEOUT = 60.0  # for a helper to start (Python under qemu TCG takes seconds); not the peer's to slow
SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


class HelperFailed(WqdError):
    """The helper did not answer (deadline, death): answered ``Failed``."""


class Helper:
    """One helper process and the calls waiting on it."""

    def __init__(self, creds: Credentials | None, timeout: float, pass_fds: Iterable[int],
                 root_fd: int = -1, preload: str = "") -> None:
        self.creds = creds
        self.timeout = timeout
        self.pass_fds = tuple(pass_fds)
        self.root_fd = root_fd
        self.preload = preload
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.next = 1
        self.last_used = time.monotonic()
        self.dead = False
        self._started: asyncio.Task | None = None
        self._ready: asyncio.Future | None = None
        self._reader_task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    async def _start(self) -> None:
        """Exec the helper and wait for its "ready" (it has taken the credentials)."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            c = self.creds
            if c is None:
                ids = [str(os.geteuid()), str(os.getegid()), "-", "self"]
            else:
                ids = [str(c.uid), str(c.gid), ",".join(map(str, c.groups)) or "-", "peer"]
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                    "from wqd.kernel.cred_helper import helper_main; helper_main(sys.argv[2:])")
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", "-c", code, root, str(child.fileno()), *ids, str(self.root_fd), self.preload or "-",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                pass_fds=(child.fileno(), *self.pass_fds, *([self.root_fd] if self.root_fd >= 0 else [])),
                env=SPAWN_ENV, cwd="/")
        finally:
            child.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=parent)
        self._reader_task = loop.create_task(self._read(reader))
        await self._ready
        log.debug("credential helper %d started for %s", self.proc.pid, self.creds or "the daemon")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                (n,) = FRAME.unpack(await reader.readexactly(FRAME.size))
                if n > MAX_MESSAGE:
                    raise ValueError("oversized reply")
                number, ok, value = pickle.loads(await reader.readexactly(n))
                if number == READY:
                    if not self._ready.done():
                        self._ready.set_result(value)
                    continue
                fut = self.pending.pop(number, None)
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, pickle.UnpicklingError) as exc:
            if not self.dead:
                log.warning("credential helper %s for %s ended: %s", self.pid, self.creds or "the daemon",
                            exc.__class__.__name__)
            self.kill("the credential helper ended")
        except asyncio.CancelledError:
            pass

    def start(self) -> asyncio.Task:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
            self._started.add_done_callback(lambda t: t.cancelled() or t.exception())  # seen by callers
        return self._started

    async def call(self, op: str, *args):
        if self.dead:
            raise HelperFailed("the credential helper ended; try again")
        if len(self.pending) >= MAX_PENDING:
            raise LimitsExceeded("too many key operations queued for this caller")
        self.last_used = time.monotonic()
        loop = asyncio.get_running_loop()
        number, self.next = self.next, self.next + 1
        fut = loop.create_future()
        self.pending[number] = fut
        try:
            try:  # starting has its own allowance: nobody but the machine's load can slow it
                async with asyncio.timeout(max(SPAWN_TIMEOUT, self.timeout)):
                    await asyncio.shield(self.start())
            except TimeoutError:
                self.kill("the credential helper did not start")
                raise HelperFailed(f"the credential helper did not start within {SPAWN_TIMEOUT:g} s") from None
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # we are cancelled, not the start
                raise HelperFailed("the credential helper ended while starting; try again") from None
            if fut.done():  # failed while starting (killed)
                return fut.result()
            async with asyncio.timeout(self.timeout):
                data = pickle.dumps((number, op, args))
                self.writer.write(FRAME.pack(len(data)) + data)
                return await fut
        except TimeoutError:
            log.warning("credential helper %s for %s did not answer %s within %.1f s: replaced",
                        self.pid, self.creds or "the daemon", op, self.timeout)
            self.kill(f"the credential helper did not answer within {self.timeout:g} s")
            raise HelperFailed(f"the credential helper did not answer {op} within {self.timeout:g} s") from None
        except OSError as exc:
            if isinstance(exc, kerr.KernelError) or fut.done():
                raise
            self.kill("the credential helper could not be started")
            raise HelperFailed("the credential helper could not be started") from None
        finally:
            self.pending.pop(number, None)
            self.last_used = time.monotonic()

    def kill(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(HelperFailed(why))
        self.pending.clear()
        if self._started is not None and not self._started.done():
            self._started.cancel()
        if self.proc is not None and self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        if self.writer is not None:
            self.writer.close()
        if self._reader_task is not None and self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()


class HelperPool:
    """Helpers by credential set (``None``: the daemon's own), bounded and reaped."""

    def __init__(self, *, timeout: float = 5.0, limit: int = 64, pass_fds: Iterable[int] = (),
                 root_fd: int = -1, preload: str = "") -> None:
        self.timeout = timeout
        self.limit = limit
        self.pass_fds = tuple(pass_fds)
        self.root_fd = root_fd  # >= 0: the helpers' working directory (relative paths: the host's)
        # the krb5 binding's directory: imported at start (SPAWN_TIMEOUT), not in a call's deadline
        self.preload = preload
        self.helpers: dict[Credentials | None, Helper] = {}
        self._reaper: asyncio.TimerHandle | None = None

    def _get(self, creds: Credentials | None) -> Helper:
        helper = self.helpers.get(creds)
        if helper is not None and not helper.dead:
            return helper
        self.helpers.pop(creds, None)
        if creds is not None:
            same_uid = [h for h in self.helpers.values() if h.creds is not None and h.creds.uid == creds.uid]
            if len(same_uid) >= PER_UID:
                self._evict(same_uid, f"uid {creds.uid} has {PER_UID} credential sets in use")
        if len(self.helpers) >= self.limit:
            self._evict(list(self.helpers.values()), "too many credential sets in use")
        helper = self.helpers[creds] = Helper(creds, self.timeout, self.pass_fds, self.root_fd, self.preload)
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().call_later(IDLE / 2, self._reap)
        return helper

    def _evict(self, candidates: list[Helper], why: str) -> None:
        """Make room by stopping the longest-unused helper, if one has been unused a
        while: never one in use (a poller's, every interval), or credential sets that
        take turns would start a helper per call."""
        now = time.monotonic()
        idle = [h for h in candidates if not h.pending and now - h.last_used >= EVICTABLE_AFTER]
        if not idle:
            raise LimitsExceeded(why)
        victim = min(idle, key=lambda h: h.last_used)
        self.helpers.pop(victim.creds, None)
        victim.kill("replaced by another credential set")

    def prestart(self, creds: Credentials | None) -> None:
        """Start the helper for *creds* now, so the first call does not wait for it."""
        self._get(creds).start()

    async def run(self, creds: Credentials | None, op: str, *args):
        """Run ``OPS[op](*args)`` with *creds*; kernel errors are re-raised as such."""
        return await self._get(creds).call(op, *args)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        for creds, helper in list(self.helpers.items()):
            if helper.dead or (not helper.pending and now - helper.last_used > IDLE):
                del self.helpers[creds]
                helper.kill("idle")
        if self.helpers:
            self._reaper = asyncio.get_running_loop().call_later(IDLE / 2, self._reap)

    def pids(self) -> list[int]:
        return [h.pid for h in self.helpers.values() if h.pid is not None and not h.dead]

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        procs = [h.proc for h in self.helpers.values() if h.proc is not None]
        for helper in self.helpers.values():
            helper.kill("daemon stopping")
        self.helpers.clear()
        for proc in procs:
            try:
                async with asyncio.timeout(2):
                    await proc.wait()
            except TimeoutError:
                pass
