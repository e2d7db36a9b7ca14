"""Helpers for the policy tests: configuration, sd_notify socket, keyrings, peers, groups.

All real: a datagram socket for NOTIFY_SOCKET, keyrings made with keyctl, peers as
processes under setpriv/unshare.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import sysconfig
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

from support import PYTHON, REPO, ForeignClient, keyctl, wait_for_name

POLICY_CONFIG = """
[keys]
backend = "proc-keys"
poll_interval = 0.05

[policy]
plugins = {plugins}
rules = ["{rules}"]
{extra}
"""


def policy_config(rules: Path, plugins=("unix", "namespace", "sandbox", "rules"), extra: str = "") -> str:
    quoted = "[" + ", ".join(f'"{p}"' for p in plugins) + "]"
    return POLICY_CONFIG.format(plugins=quoted, rules=rules, extra=textwrap.dedent(extra))


def write_rules(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    async def next(self, key: str, timeout: float = 20.0) -> dict[str, str]:
        """The next message carrying *key* (e.g. ``READY``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {key}= from the daemon; got {self.messages}")
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), remaining)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            if key in fields:
                return fields

    def close(self) -> None:
        self.sock.close()


@contextmanager
def world_keyring(name: str, perm: str = "0x3f3f0101"):
    """A keyring in root's @u whose other bits grant View (and Search)."""
    serial = keyctl("newring", name, "@u")
    keyctl("setperm", serial, perm)
    try:
        yield int(serial)
    finally:
        keyctl("unlink", serial, "@u")


def spare_group(exclude=(0, 1000, 1001, 1002, 1003)) -> grp.struct_group:
    """A named group that none of the test uids has as its primary group."""
    for g in sorted(grp.getgrall(), key=lambda g: g.gr_gid):
        if 100 <= g.gr_gid < 60000 and g.gr_gid not in exclude:
            return g
    pytest.skip("no named group to use in a group: rule")


class Peers:
    """Bus clients as other uids, in other namespaces; closed at teardown."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.clients: dict[str, ForeignClient] = {}

    def start(self, label: str, uid: int, **kw) -> ForeignClient:
        client = ForeignClient(self.address, uid, **kw)
        self.clients[label] = client
        return client

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def pid_of(client: ForeignClient) -> int:
    """The peer_client's PID (setpriv and unshare exec it in place)."""
    return client.proc.pid


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (setpriv to other uids, namespaces)")


class CommandPeer(ForeignClient):
    """A peer client started under an arbitrary command prefix (``unshare ...``,
    ``setpriv ... unshare ...``): ForeignClient's protocol, any process layout."""

    def __init__(self, address: str, prefix: list[str], python: list[str] | None = None) -> None:
        cmd = [*prefix, *(python or [PYTHON]), str(REPO / "tests" / "peer_client.py"), address]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd="/")


def userns_python() -> list[str]:
    """An interpreter command an unprivileged user namespace can execute.

    Inside ``unshare -U -r`` as uid 1000, paths that uid 1000 reaches outside may be
    out of reach (the venv's interpreter may live under a 0700 home); the system's
    python3 of the same version with the venv's site-packages works the same.
    """
    system = "/usr/bin/python3"
    probe = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip(f"no system python {sys.version_info[:2]} for a user-namespace peer")
    return ["env", f"PYTHONPATH={sysconfig.get_paths()['purelib']}", system]


def as_uid(uid: int, groups: tuple[int, ...] = ()) -> list[str]:
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}"]
    return cmd + ([f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"])


async def watch(peer: ForeignClient, source: str, target: str) -> str:
    """``A`` allowed, else the error's last name component (``AccessDenied``, ``NotSupported``...)."""
    out = await peer.request("watch", source=source, target=target)
    if out["ok"]:
        return "A"
    watch.texts.append((source, target, out["error"], out["text"]))
    return out["error"].rsplit(".", 1)[-1]


watch.texts = []  # (source, target, error, text) of every refusal, for failure messages


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


# -- the real polkitd on a private bus (test_polkit.py, hostile/) -----------------
POLKITD = "/usr/lib/polkit-1/polkitd"


POLKIT_NAME = "org.freedesktop.PolicyKit1"


# keys: only uid 1000's user; every other wqd action: no. (polkitd itself always
# authorizes uid 0.)
JS_RULE = """
polkit.addRule(function(action, subject) {
    if (action.id.indexOf("io.wqd.") != 0) return polkit.Result.NOT_HANDLED;
    if (action.id == "io.wqd.watch-keys" && subject.user == "%s") return polkit.Result.YES;
    return polkit.Result.NO;
});
"""

START_POLKITD = r"""
set -e
mount --make-rprivate /
mount --bind "$1/actions" /usr/share/polkit-1/actions
mount --bind "$1/rules" /etc/polkit-1/rules.d
mount --bind "$1/empty" /usr/share/polkit-1/rules.d
exec "$2" --no-debug
"""



async def start_polkitd(tmp_path, address: str):
    """The real polkitd on the bus at *address*, owning org.freedesktop.PolicyKit1, and
    its log file (the caller ends both); skips where it cannot run."""
    if not os.access(POLKITD, os.X_OK):
        pytest.skip(f"{POLKITD} is not installed (Debian package polkitd)")
    try:
        user = pwd.getpwuid(1000).pw_name
    except KeyError:
        pytest.skip("uid 1000 has no name for the polkit rule")
    conf = tmp_path / "polkit"
    for d in ("actions", "rules", "empty"):
        (conf / d).mkdir(parents=True)
    shutil.copy(REPO / "data" / "polkit-1" / "actions" / "io.wqd.policy", conf / "actions")
    (conf / "rules" / "10-wqd-test.rules").write_text(JS_RULE % user)
    log = open(tmp_path / "polkitd.log", "w")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", START_POLKITD, "sh", str(conf), POLKITD],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address})
    try:
        await wait_for_name(address, POLKIT_NAME, proc, timeout=15)
    except RuntimeError as exc:
        proc.kill()
        proc.wait()
        log.close()
        pytest.skip(f"polkitd cannot run here: {exc}: {(tmp_path / 'polkitd.log').read_text()}")
    return proc, log


# -- a peer inside a fake Flatpak sandbox (test_sandbox.py, hostile/) -------------
APP = "org.wqd.TestApp"



# Run as root in a new mount namespace: a tmpfs root with all the host's top-level trees bound in
# and a .flatpak-info on top, then chroot into it and drop to the peer's uid.
FLATPAK_ROOT = r"""
set -e
R=$1; APP=$2; shift 2
mount --make-rprivate /
mount -t tmpfs -o size=1m,mode=755 wqd-flatpak "$R"
for d in /*; do  # every top-level tree, wherever the checkout lives (/work, /check, /home, ...)
    [ -d "$d" ] && [ ! -L "$d" ] || continue
    mkdir -p "$R$d"; mount --rbind "$d" "$R$d"
done
for l in bin sbin lib lib32 lib64 libx32; do
    [ -L "/$l" ] && ln -s "$(readlink "/$l")" "$R/$l"
done
printf '[Application]\nname=%s\nruntime=runtime/org.freedesktop.Platform/x86_64/23.08\n\n[Instance]\ninstance-id=1\n' \
    "$APP" > "$R/.flatpak-info"
chmod 444 "$R/.flatpak-info"
mount -o remount,ro "$R"
exec chroot "$R" "$@"
"""
