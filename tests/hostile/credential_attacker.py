"""Run as the attacking uid: ``credential_attacker.py WQD_PID SECONDS``.

For SECONDS, on wqd and every process under it, and on every thread of each, tries
what a local user may: tgkill and kill with SIGSTOP, setpriority, sched_setaffinity,
opening /proc/PID/mem, ptrace attach, SIGKILL. Prints JSON: the processes seen with
their [real, effective, saved, fs] uids, every attempt that succeeded, the count of
attempts. Also imported by the tests for ``descendants``.
"""

import ctypes
import json
import os
import signal
import sys
import time

SYS_tgkill, PTRACE_ATTACH, PTRACE_DETACH = 234, 16, 17


def uids(pid: int) -> list[int] | None:
    """[real, effective, saved, fs] uid of *pid*, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return [int(x) for x in line.split()[1:]]
    except OSError:
        pass
    return None


def descendants(root: int) -> dict[int, list[int]]:
    """Processes under *root* (not itself): pid -> uids."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, frontier = {}, [root]
    while frontier:
        p = frontier.pop()
        for child, pp in parent.items():
            if pp == p and (u := uids(child)) is not None:
                out[child] = u
                frontier.append(child)
    return out


def attack(root: int, seconds: float) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

    def ptrace(pid):
        if libc.ptrace(PTRACE_ATTACH, pid, None, None) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
        libc.ptrace(PTRACE_DETACH, pid, None, None)

    seen, won, tries = {}, [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        targets = {root: uids(root), **descendants(root)}
        for pid, u in targets.items():
            if u is None:
                continue
            seen[pid] = u
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                tids = []
            for tid in tids:
                tries += 1
                if libc.syscall(SYS_tgkill, pid, tid, signal.SIGSTOP) == 0:
                    won.append([pid, "tgkill SIGSTOP", u])
            for what, act in (
                ("SIGSTOP", lambda: os.kill(pid, signal.SIGSTOP)),
                ("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, pid, 19)),
                ("sched_setaffinity", lambda: os.sched_setaffinity(pid, {0})),
                ("/proc/PID/mem", lambda: open(f"/proc/{pid}/mem", "rb").close()),
                ("ptrace", lambda: ptrace(pid)),
                ("SIGKILL", lambda: os.kill(pid, signal.SIGKILL)),
            ):
                tries += 1
                try:
                    act()
                except OSError:
                    continue
                won.append([pid, what, u])
        time.sleep(0.002)
    return {"seen": seen, "won": won, "tries": tries}


if __name__ == "__main__":
    print(json.dumps(attack(int(sys.argv[1]), float(sys.argv[2]))))
