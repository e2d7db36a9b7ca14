"""The Debian package: built with `make deb`, clean under lintian, laid out like
`make install`, and installed, run, removed and purged in a scratch root.

The scratch root is the host's own root under an overlay (a tmpfs upper layer,
in a private mount namespace), so dpkg, the maintainer scripts
(deb-systemd-helper, py3compile) and the installed wqd run for real against
Debian's python3-dbus-fast / python3-pyudev / python3-systemd, and whatever the
package leaves behind after purge is exactly what the upper layer holds.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from support import REPO

CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "lintian", "dpkg-deb")
DEBIAN_DEPENDENCIES = ("python3-dbus-fast", "python3-pyudev", "python3-systemd", "dbus")


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def version() -> str:
    return pyproject()["project"]["version"]


def need_build_tools() -> None:
    missing = [tool for tool in BUILD_TOOLS if not shutil.which(tool, path=CLEAN_ENV["PATH"])]
    if missing:
        pytest.skip(f"the Debian build tools are not installed ({', '.join(missing)}): run scripts/setup")
    if not (REPO / ".git").exists():
        pytest.skip("`make deb` builds from what git tracks: not a git checkout")


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """`make deb` once for this module, into a scratch directory."""
    need_build_tools()
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["make", "--no-print-directory", "deb", f"DEB_BUILD={out}/build", f"DEB_DIST={out}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = out / f"wqd_{version()}_all.deb"
    assert path.is_file(), f"make deb did not leave {path.name}: {sorted(p.name for p in out.iterdir())}"
    return path


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True).stdout.strip()


def contents(deb: Path) -> set[str]:
    """Paths of the files and symlinks in *deb*, absolute."""
    out = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    paths = set()
    for line in out.splitlines():
        if line.startswith("d"):
            continue
        path = line.split(None, 5)[5].split(" -> ")[0]
        paths.add(path.removeprefix("."))
    return paths


def test_package_is_architecture_all_with_the_pyproject_version(deb):
    assert field(deb, "Package") == "wqd"
    assert field(deb, "Version") == version()
    assert field(deb, "Architecture") == "all"


def test_package_depends_on_the_declared_range_of_debians_packages(deb):
    """pyproject.toml, constraints/lowest.txt and the package's Depends say the same floors and ceilings."""
    depends = field(deb, "Depends")
    relations = dict.fromkeys(DEBIAN_DEPENDENCIES)
    for name in relations:
        relations[name] = re.findall(rf"(?:^|, ){re.escape(name)}(?: \(([<>=]+) ([^)]+)\))?(?=,|$)", depends)
        assert relations[name], f"Depends has no {name}: {depends}"
    lowest = dict(line.split("==") for line in (REPO / "constraints/lowest.txt").read_text().split()
                  if "==" in line and not line.startswith("#"))
    debian_name = {"dbus-fast": "python3-dbus-fast", "pyudev": "python3-pyudev", "systemd-python": "python3-systemd"}
    for requirement in pyproject()["project"]["dependencies"]:
        name, spec = re.match(r"([A-Za-z0-9_.-]+)(.*)", requirement).groups()
        bounds = dict(re.findall(r"(>=|<)\s*([^,\s]+)", spec))
        assert set(bounds) == {">=", "<"}, f"{requirement}: wants a floor and a ceiling"
        assert lowest.get(name) == bounds[">="], f"constraints/lowest.txt pins {name}=={lowest.get(name)}, " \
                                                 f"pyproject.toml's floor is {bounds['>=']}"
        assert (">=", bounds[">="]) in relations[debian_name[name]], f"{debian_name[name]}: {depends}"
        assert ("<<", bounds["<"]) in relations[debian_name[name]], f"{debian_name[name]}: {depends}"


def test_lintian_finds_no_errors(deb):
    proc = subprocess.run(["lintian", "--display-info", "--pedantic", str(deb)], capture_output=True, text=True,
                          timeout=300, env=CLEAN_ENV)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    print("lintian:", *tags, sep="\n  ")
    errors = [tag for tag in tags if tag.startswith("E: ")]
    assert not errors, "\n".join(errors)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_package_and_make_install_lay_out_the_same_files(deb, tmp_path):
    """One list: debian/rules installs with scripts/install, so `make install PREFIX=/usr`
    gives the same files, but for what dh adds (docs, compressed man pages) and the
    system unit's directory (bookworm's debhelper wants /lib/systemd/system)."""
    proc = subprocess.run(["make", "--no-print-directory", "install", f"DESTDIR={tmp_path}", "PREFIX=/usr"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=CLEAN_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = {"/" + str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if not p.is_dir()}
    packaged = set()
    for path in contents(deb):
        if path.startswith("/usr/share/doc/wqd/"):
            continue
        if path.startswith("/usr/share/man/"):
            path = path.removesuffix(".gz")
        packaged.add(path.replace("/lib/systemd/system/", "/usr/lib/systemd/system/", 1)
                     if path.startswith("/lib/") else path)
    assert packaged == installed, f"only in the package: {sorted(packaged - installed)}; " \
                                  f"only from make install: {sorted(installed - packaged)}"
    expected = {
        "/usr/bin/wqd", "/usr/bin/wqctl",
        "/usr/share/dbus-1/system.d/io.wqd.WatchQueue1.conf",
        "/usr/share/dbus-1/system-services/io.wqd.WatchQueue1.service",
        "/usr/share/dbus-1/services/io.wqd.WatchQueue1.service",
        "/usr/share/dbus-1/interfaces/io.wqd.WatchQueue1.xml",
        "/usr/lib/systemd/system/wqd.service", "/usr/lib/systemd/user/wqd.service",
        "/usr/share/polkit-1/actions/io.wqd.policy",
        "/usr/share/man/man8/wqd.8", "/usr/share/man/man1/wqctl.1", "/usr/share/man/man5/wqd.conf.5",
        "/usr/share/man/man5/io.wqd.WatchQueue1.5",
        "/usr/lib/python3/dist-packages/wqd/daemon.py",
        "/usr/lib/python3/dist-packages/wqd/bus/io.wqd.WatchQueue1.xml",
    }
    assert expected <= packaged, sorted(expected - packaged)


def test_maintainer_scripts_enable_both_units_the_debian_way(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], check=True)
    postinst = (tmp_path / "control/postinst").read_text()
    postrm = (tmp_path / "control/postrm").read_text()
    assert "deb-systemd-helper enable 'wqd.service'" in postinst
    assert "deb-systemd-helper --user enable 'wqd.service'" in postinst
    assert "deb-systemd-helper purge 'wqd.service'" in postrm
    assert "deb-systemd-helper --user purge 'wqd.service'" in postrm
    assert "py3compile -p wqd" in postinst


# --- installed for real, in an overlay of the host's root ---------------------------------

# Runs inside `unshare -m`: the host's / under an overlay whose upper layer (a
# tmpfs at $SCRATCH, gone with the namespace) takes every write; dpkg -i, the
# installed wqd on a private bus answering the installed wqctl, dpkg -r, dpkg -P.
# Evidence, and a copy of the upper layer after each step, go to $REPORT.
SCRATCH_SCRIPT = r"""
set -eu
S=$SCRATCH
mount -t tmpfs -o mode=0755 wqd-scratch "$S"
mkdir "$S/upper" "$S/work" "$S/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$S/upper,workdir=$S/work" "$S/root"
R=$S/root
mount -t proc proc "$R/proc"
mount --bind /dev "$R/dev"
mount -t sysfs sysfs "$R/sys"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
cp "$DEB" "$R/tmp/wqd.deb"
in_root() { chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root "$@"; }
snapshot() { cp -a "$S/upper" "$REPORT/upper-$1"; }

in_root dpkg -i /tmp/wqd.deb > "$REPORT/install.log" 2>&1
snapshot installed
in_root dpkg-query -W -f '${Status}' wqd > "$REPORT/status-installed"
in_root wqd --version > "$REPORT/version" 2>&1
in_root wqd --help > "$REPORT/wqd-help" 2>&1
in_root wqctl --help > "$REPORT/wqctl-help" 2>&1
in_root python3 -c 'import sys, dbus_fast, pyudev, systemd.daemon; print(dbus_fast.__file__, pyudev.__version__, sys.executable)' > "$REPORT/dependencies" 2>&1

# the installed wqd on a private bus, asked by the installed wqctl
in_root dbus-daemon --session --fork --nopidfile --print-address=3 --print-pid=4 3>"$REPORT/bus-address" 4>"$REPORT/bus-pid"
ADDRESS=$(head -n1 "$REPORT/bus-address")
WQD=
trap 'kill -TERM $WQD "$(head -n1 "$REPORT/bus-pid")" 2>/dev/null || true' EXIT  # whatever fails below
chroot "$R" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
  wqd --address "$ADDRESS" --connect-timeout 30 --log-target stderr > "$REPORT/wqd.log" 2>&1 &
WQD=$!  # chroot and env exec: this is wqd
rc=1
for i in $(seq 1 120); do
  if in_root wqctl --address "$ADDRESS" --timeout 30 status > "$REPORT/status" 2>&1; then rc=0; break; fi
  sleep 0.5
done
echo $rc > "$REPORT/status-rc"
kill -TERM $WQD || true
wqd_rc=0; wait $WQD || wqd_rc=$?
echo $wqd_rc > "$REPORT/wqd-rc"
kill -TERM "$(head -n1 "$REPORT/bus-pid")" || true
trap - EXIT

in_root dpkg -r wqd > "$REPORT/remove.log" 2>&1
snapshot removed
in_root dpkg -P wqd > "$REPORT/purge.log" 2>&1
snapshot purged
in_root dpkg-query -W -f '${Status}' wqd > "$REPORT/status-purged" 2>&1 || true
"""

# What dpkg keeps of any package's life (its database, its log) and the man-db
# index its trigger rebuilds: not the package's leftovers.
DPKG_OWN = ("var/lib/dpkg", "var/log", "var/cache/man", "var/cache/debconf")


def upper_layer(upper: Path) -> dict[str, str]:
    """Path -> what the overlay's upper layer holds there that the host's root does
    not: a new or changed file or symlink, a new directory, a deletion (whiteout)."""
    left = {}
    for path in sorted(upper.rglob("*")):
        rel = str(path.relative_to(upper))
        if rel.startswith(DPKG_OWN) or any(own.startswith(rel + "/") for own in DPKG_OWN):
            continue
        lower = Path("/") / rel
        st = path.lstat()
        if path.is_char_device() and st.st_rdev == 0:
            left[rel] = "deleted"
        elif path.is_symlink():
            if not lower.is_symlink() or os.readlink(lower) != os.readlink(path):
                left[rel] = f"symlink to {os.readlink(path)}"
        elif path.is_dir():
            if not lower.is_dir():
                left[rel] = "new directory"
        elif not lower.is_file() or lower.read_bytes() != path.read_bytes():
            left[rel] = "new file" if not lower.exists() else "changed file"
    return left


@pytest.fixture(scope="module")
def scratch_install(deb, tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (a mount namespace, an overlay of / and chroot)")
    missing = [p for p in DEBIAN_DEPENDENCIES
               if "install ok installed" not in subprocess.run(["dpkg-query", "-W", "-f", "${Status}", p],
                                                                capture_output=True, text=True).stdout]
    if missing:
        pytest.skip(f"the package's dependencies are not installed here ({', '.join(missing)}): run scripts/setup")
    base = tmp_path_factory.mktemp("scratch-root")
    (base / "ns").mkdir()
    (base / "report").mkdir()
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", SCRATCH_SCRIPT],
                          env={**CLEAN_ENV, "SCRATCH": str(base / "ns"), "REPORT": str(base / "report"),
                               "DEB": str(deb)},
                          capture_output=True, text=True, timeout=600)
    report = base / "report"
    logs = "".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(report.glob("*.log")))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert not any((base / "ns").iterdir()), "the scratch tmpfs leaked out of its mount namespace"
    return report


@pytest.mark.root
def test_installed_package_runs_on_debians_dependencies(scratch_install):
    report = scratch_install
    assert (report / "status-installed").read_text() == "install ok installed"
    assert (report / "version").read_text().strip() == f"wqd {version()}"
    assert "--connect-timeout" in (report / "wqd-help").read_text()
    assert "usage: wqctl" in (report / "wqctl-help").read_text()
    deps = (report / "dependencies").read_text()
    assert deps.startswith("/usr/lib/python3/dist-packages/dbus_fast/") and "/usr/bin/python3" in deps, deps
    status = (report / "status").read_text()
    assert (report / "status-rc").read_text().strip() == "0", status + (report / "wqd.log").read_text()
    assert "wqd API version 1" in status and "keys" in status, status
    assert (report / "wqd-rc").read_text().strip() == "0", (report / "wqd.log").read_text()  # SIGTERM: clean stop


@pytest.mark.root
def test_install_enables_the_units_and_compiles_the_modules(scratch_install):
    installed = upper_layer(scratch_install / "upper-installed")
    assert installed.get("etc/systemd/system/multi-user.target.wants/wqd.service") == \
        "symlink to /lib/systemd/system/wqd.service", sorted(installed)
    assert installed.get("etc/systemd/user/default.target.wants/wqd.service") == \
        "symlink to /usr/lib/systemd/user/wqd.service", sorted(installed)
    assert installed.get("usr/bin/wqd") == "new file"
    assert installed.get("usr/share/dbus-1/system.d/io.wqd.WatchQueue1.conf") == "new file"
    assert any(p.startswith("usr/lib/python3/dist-packages/wqd/__pycache__/daemon.") for p in installed), \
        "py3compile did not run"


@pytest.mark.root
def test_remove_then_purge_leaves_the_root_as_before(scratch_install):
    removed = upper_layer(scratch_install / "upper-removed")
    assert not [p for p in removed if p.startswith(("usr/", "lib/"))], \
        f"dpkg -r left files of the package: {sorted(removed)}"
    # removed, not purged: the units stay enabled (Debian keeps an admin's choice until purge)
    assert "etc/systemd/system/multi-user.target.wants/wqd.service" in removed, sorted(removed)
    purged = upper_layer(scratch_install / "upper-purged")
    assert purged == {}, f"after dpkg -P the root differs from before: {purged}"
    status = (scratch_install / "status-purged").read_text()
    assert "no packages found matching wqd" in status or "not-installed" in status, status
