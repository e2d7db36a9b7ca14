"""Start a command as a given PID: ``spawn_at_pid.py PID CMD...`` (root).

``clone3()`` with ``set_tid`` (Linux 5.5+, include/uapi/linux/sched.h) picks the
child's PID in our PID namespace; it needs CAP_SYS_ADMIN over that namespace and
the PID to be free. The child execs CMD at once (this process is single-threaded,
nothing else runs between clone and exec). Prints the child's PID, then waits for
it and exits with its status.
"""

import ctypes
import os
import signal
import struct
import sys

SYS_CLONE3 = 435  # arch/x86/entry/syscalls/syscall_64.tbl
# struct clone_args, CLONE_ARGS_SIZE_VER2: flags, pidfd, child_tid, parent_tid, exit_signal,
# stack, stack_size, tls, set_tid, set_tid_size, cgroup (all __aligned_u64)
CLONE_ARGS = struct.Struct("=11Q")


def main() -> None:
    pid, cmd = int(sys.argv[1]), sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    tids = (ctypes.c_int * 1)(pid)
    args = ctypes.create_string_buffer(CLONE_ARGS.pack(0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0,
                                                       ctypes.addressof(tids), 1, 0))
    child = libc.syscall(ctypes.c_long(SYS_CLONE3), args, ctypes.c_size_t(CLONE_ARGS.size))
    if child == 0:
        try:
            os.execvp(cmd[0], cmd)
        finally:
            os._exit(127)
    if child < 0:
        err = ctypes.get_errno()
        sys.exit(f"clone3(set_tid={pid}): {os.strerror(err)}")
    print(child, flush=True)
    _, status = os.waitpid(child, 0)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
