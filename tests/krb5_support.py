"""A real MIT Kerberos realm on loopback, and a real sssd-kcm, for tests.

``start_realm()`` makes realm ``WQD.TEST`` in a fresh directory under /tmp (0755,
so uids 1000/1001 can read its krb5.conf): a KDC database made by
``kdb5_util create``, principals ``user<uid>`` and ``user<uid>/alt`` with the
passwords ``Realm.password(principal)``, renewable for a day, tickets of at
most an hour (``kinit -l 90s`` for short ones), and ``krb5kdc -n`` listening on
127.0.0.1 only, on a free port, UDP and TCP. Nothing outside that directory is
read or written: ``KRB5_CONFIG``/``KRB5_KDC_PROFILE`` point at its files.

``start_kcm(realm)`` runs ``/usr/libexec/sssd/sssd_kcm`` as Debian's unit does
(``--uid 0 --gid 0``), without systemd: in a private mount namespace whose
``/var/lib/sss/db`` and ``/var/lib/sss/secrets`` are bind mounts of the realm
directory's ``kcm/db`` and ``kcm/secrets`` (so the host's sssd state is never
touched and nothing outlives the process), its confdb made first by
``sssd -c sssd.conf --genconf-section=kcm`` (the unit's ExecStartPre), and the
socket at ``[kcm] socket_path`` in the realm directory (the realm's krb5.conf
names it as ``kcm_socket``). Not socket-activated, sssd_kcm binds that socket
itself and stays up (no idle timeout).

Every client command runs as the given uid through ``setpriv`` with
``KRB5_CONFIG`` and ``KRB5CCNAME`` set: ``Realm.kinit``, ``kinit -R``,
``kswitch``, ``kdestroy``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from support import terminate

REALM = "WQD.TEST"
KRB5_TOOLS = ("kdb5_util", "kadmin.local", "krb5kdc", "kinit", "klist", "kswitch", "kdestroy")
SSSD_KCM = "/usr/libexec/sssd/sssd_kcm"
SSSD = "/usr/sbin/sssd"
UIDS = (1000, 1001)


def missing_tools() -> list[str]:
    """What start_realm needs that this machine lacks (Debian: krb5-kdc,
    krb5-admin-server, krb5-user)."""
    return [t for t in KRB5_TOOLS if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin")]


def kcm_missing() -> str | None:
    if not os.path.exists(SSSD_KCM) or not os.path.exists(SSSD):
        return "sssd-kcm is not installed (Debian package sssd-kcm)"
    if not os.path.isdir("/var/lib/sss/secrets") or not os.path.isdir("/var/lib/sss/db"):
        return "/var/lib/sss/{db,secrets} missing (sssd-common)"
    return None


def _free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free loopback port for the KDC")


def _wait_connect(family: int, address, proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    """Wait until *address* accepts a stream connection (the server has no
    readiness notification); fail early if *proc* died."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(address)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening within {timeout} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        terminate(proc)


class Krb5CommandError(Exception):
    pass


@dataclass
class Realm:
    directory: Path
    port: int
    kdc: subprocess.Popen | None = None
    kcm: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)

    @property
    def krb5_conf(self) -> Path:
        return self.directory / "krb5.conf"

    @property
    def kcm_socket(self) -> Path:
        return self.directory / "kcm" / "run" / "kcm.socket"

    @property
    def kcm_store(self) -> Path:
        """sssd-kcm's store as seen from the host: bind-mounted over
        /var/lib/sss/secrets inside sssd_kcm's namespace, same inode."""
        return self.directory / "kcm" / "secrets" / "secrets.ldb"

    @staticmethod
    def password(principal: str) -> str:
        return "pw-" + principal.replace("/", "-")

    def user_dir(self, uid: int) -> Path:
        """A 0700 directory of *uid*'s own, for its FILE:/DIR: caches."""
        d = self.directory / f"home{uid}"
        if not d.exists():
            d.mkdir()
            os.chown(d, uid, uid)
            d.chmod(0o700)
        return d

    def as_uid(self, uid: int, *cmd: str, ccache: str | None = None, stdin: str | None = None,
               check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "KRB5_CONFIG": str(self.krb5_conf), "LANG": "C"}
        if ccache is not None:
            env["KRB5CCNAME"] = ccache
        env.update(extra_env or {})
        wrap = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        proc = subprocess.run([*wrap, *cmd], input=stdin, capture_output=True, text=True, env=env, timeout=60)
        if check and proc.returncode != 0:
            raise Krb5CommandError(f"{' '.join(cmd)} as uid {uid} (KRB5CCNAME={ccache}): rc={proc.returncode}: {proc.stderr.strip()}")
        return proc

    def kinit(self, uid: int, ccache: str, principal: str | None = None, lifetime: str = "10m",
              renewable: str = "1d") -> None:
        principal = principal or f"user{uid}"
        self.as_uid(uid, "kinit", "-l", lifetime, "-r", renewable, principal, ccache=ccache,
                    stdin=self.password(principal) + "\n")

    def renew(self, uid: int, ccache: str) -> None:
        self.as_uid(uid, "kinit", "-R", ccache=ccache)

    def kswitch(self, uid: int, ccache: str, principal: str) -> None:
        self.as_uid(uid, "kswitch", "-p", principal, ccache=ccache)

    def kdestroy(self, uid: int, ccache: str, all_caches: bool = False) -> None:
        self.as_uid(uid, "kdestroy", *(["-A"] if all_caches else []), ccache=ccache, check=False)

    def read_as(self, uid: int, function: str, *args) -> dict:
        """Call ``wqd.krb5cache.<function>(*args)`` in a process of *uid* (as the
        credential helper will); the result comes back as JSON, an error as
        ``{"error": class name}``."""
        code = (
            "import dataclasses, json, sys\n"
            "import wqd.krb5cache as k\n"
            "args = json.loads(sys.argv[1])\n"
            "try:\n"
            f"    r = k.{function}(*args)\n"
            "    out = dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r\n"
            "except k.CacheError as e:\n"
            "    out = {'error': type(e).__name__, 'code': e.code}\n"
            "print(json.dumps(out))\n"
        )
        proc = self.as_uid(uid, sys.executable, "-c", code, json.dumps(list(args)))
        return json.loads(proc.stdout)

    def stop(self) -> None:
        _stop(self.kcm)
        _stop(self.kdc)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_realm(uids=UIDS) -> Realm:
    directory = Path(tempfile.mkdtemp(prefix="wqd-krb5-", dir="/tmp"))
    directory.chmod(0o755)
    port = _free_port()
    realm = Realm(directory, port)
    kcm_socket = realm.kcm_socket
    (directory / "krb5.conf").write_text(
        f"""[libdefaults]
  default_realm = {REALM}
  dns_lookup_kdc = false
  dns_lookup_realm = false
  rdns = false
  ignore_acceptor_hostname = true
  kcm_socket = {kcm_socket}

[realms]
  {REALM} = {{
    kdc = 127.0.0.1:{port}
  }}
"""
    )
    (directory / "krb5.conf").chmod(0o644)
    kdc_dir = directory / "kdc"
    kdc_dir.mkdir(mode=0o700)
    (kdc_dir / "kadm5.acl").write_text("")
    (kdc_dir / "kdc.conf").write_text(
        f"""[kdcdefaults]
  kdc_listen = 127.0.0.1:{port}
  kdc_tcp_listen = 127.0.0.1:{port}

[realms]
  {REALM} = {{
    database_name = {kdc_dir}/principal
    key_stash_file = {kdc_dir}/stash
    acl_file = {kdc_dir}/kadm5.acl
    max_life = 1h
    max_renewable_life = 1d
    supported_enctypes = aes256-cts-hmac-sha1-96:normal
  }}

[logging]
  kdc = FILE:{kdc_dir}/kdc.log
"""
    )
    realm.env = {
        "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
        "KRB5_CONFIG": str(directory / "krb5.conf"),
        "KRB5_KDC_PROFILE": str(kdc_dir / "kdc.conf"),
    }

    def admin(*cmd: str) -> None:
        subprocess.run(cmd, env=realm.env, check=True, capture_output=True, timeout=60)

    try:
        admin("kdb5_util", "create", "-s", "-r", REALM, "-P", "master-" + directory.name)
        admin("kadmin.local", "-r", REALM, "-q", f"modprinc -maxrenewlife 1day krbtgt/{REALM}")
        for uid in uids:
            for principal in (f"user{uid}", f"user{uid}/alt"):
                admin("kadmin.local", "-r", REALM, "-q",
                      f"addprinc -pw {realm.password(principal)} -maxrenewlife 1day {principal}")
        with open(kdc_dir / "kdc.stderr", "w") as log:
            realm.kdc = subprocess.Popen(["krb5kdc", "-n", "-r", REALM], env=realm.env,
                                         stdout=subprocess.DEVNULL, stderr=log)
        _wait_connect(socket.AF_INET, ("127.0.0.1", port), realm.kdc, "krb5kdc")
    except BaseException:
        realm.stop()
        raise
    return realm


def start_kcm(realm: Realm) -> subprocess.Popen:
    """Start sssd_kcm for *realm* (see the module docstring). Root only."""
    base = realm.directory / "kcm"
    for sub in ("db", "secrets", "run"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "run").chmod(0o755)
    (base).chmod(0o755)
    conf = base / "sssd.conf"
    conf.write_text(f"[sssd]\nservices = kcm\n\n[kcm]\nsocket_path = {realm.kcm_socket}\n")
    conf.chmod(0o600)  # sssd refuses a config others can read
    script = (
        "set -e\n"
        f"mount --bind {base}/db /var/lib/sss/db\n"
        f"mount --bind {base}/secrets /var/lib/sss/secrets\n"
        f"{SSSD} -c {conf} --genconf-section=kcm --logger=stderr\n"
        f"exec {SSSD_KCM} --uid 0 --gid 0 --logger=stderr\n"
    )
    with open(base / "sssd_kcm.log", "w") as log:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=log, env=realm.env,
        )
    realm.kcm = proc
    try:
        _wait_connect(socket.AF_UNIX, str(realm.kcm_socket), proc, "sssd_kcm")
    except BaseException:
        _stop(proc)
        raise
    return proc
