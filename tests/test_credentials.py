"""The credentials source's pieces without a bus: cache names, the inotify
wrapper on a real inotify fd, the signal's bytes, the unix rules, the settings.

The source end to end (a real KDC, sssd-kcm, the daemon, clients as other uids)
is tests/test_credentials_bus.py.
"""

import errno
import os

import pytest
from dbus_fast import Message, MessageType, Variant

from wqd.errors import InvalidArgument, NotSupported
from wqd.events import CredentialsChanged, Typed
from wqd.kernel import inotify
from wqd.kernel.errors import KernelError
from wqd.peer import PeerCredentials
from wqd.policy import unix_credentials
from wqd.settings import SettingError
from wqd.bus.signals import encode, marshal_body, signal_header
from wqd.sources import credentials
from wqd.sources.credentials import access_probe, parse_cache_name

pytestmark = []


@pytest.mark.parametrize(("name", "parsed"), [
    ("FILE:/tmp/krb5cc_1000", ("FILE", "/tmp", "krb5cc_1000")),
    ("file:/tmp//x/../krb5cc", ("FILE", "/tmp", "krb5cc")),
    ("DIR:/run/user/1000/krb5cc", ("DIR", "/run/user/1000/krb5cc", None)),
    ("DIR::/run/user/1000/krb5cc/tkt", ("DIR", "/run/user/1000/krb5cc", "tkt")),
    ("KCM:", ("KCM", None, None)),
    ("KCM:1000", ("KCM", None, None)),
    ("KEYRING:persistent:1000", ("KEYRING", None, None)),
    ("KEYRING:persistent:1000:krb_ccache_x", ("KEYRING", None, None)),
])
def test_cache_names_give_the_directory_to_watch(name, parsed):
    assert parse_cache_name(name) == parsed


def test_the_access_probe_of_a_collection_is_its_primary():
    assert access_probe("DIR:/home/u/cc") == "/home/u/cc/primary"
    assert access_probe("DIR::/home/u/cc/tkt3") == "/home/u/cc/tkt3"
    assert access_probe("FILE:/tmp/krb5cc_5") == "/tmp/krb5cc_5"
    assert access_probe("KCM:") is None


@pytest.mark.parametrize(("name", "error", "text"), [
    ("krb5cc", InvalidArgument, "cache name TYPE:RESIDUAL"),
    ("FILE:relative", InvalidArgument, "absolute path"),
    ("DIR:", InvalidArgument, "absolute path"),
    ("KEYRING:session:x", NotSupported, "only KEYRING:persistent:UID is served"),
    ("KEYRING:persistent:", InvalidArgument, "needs the uid"),
    ("MEMORY:x", NotSupported, "cache type MEMORY is not served"),
])
def test_names_it_does_not_serve_get_a_named_error(name, error, text):
    with pytest.raises(error, match=text):
        parse_cache_name(name)


def test_inotify_reports_a_rename_over_a_name_and_an_unlink(tmp_path):
    """kinit's and kdestroy's own steps on a real inotify fd: the records the
    source filters by name."""
    fd = inotify.init()
    try:
        wd = inotify.add_watch(fd, str(tmp_path), inotify.IN_MOVED_TO | inotify.IN_DELETE | inotify.IN_ONLYDIR)
        (tmp_path / "cc.XXXX").write_text("new")
        os.rename(tmp_path / "cc.XXXX", tmp_path / "cc")
        os.unlink(tmp_path / "cc")
        events = inotify.decode(os.read(fd, inotify.READ_SIZE))
        assert [(e.wd, e.mask, e.name) for e in events] == [
            (wd, inotify.IN_MOVED_TO, "cc"), (wd, inotify.IN_DELETE, "cc")]
        with pytest.raises(BlockingIOError):
            os.read(fd, inotify.READ_SIZE)  # non-blocking
        inotify.rm_watch(fd, wd)
        assert inotify.decode(os.read(fd, inotify.READ_SIZE))[0].mask == inotify.IN_IGNORED
    finally:
        os.close(fd)


def test_inotify_decode_drops_a_truncated_tail(tmp_path):
    fd = inotify.init()
    try:
        inotify.add_watch(fd, str(tmp_path), inotify.IN_CREATE)
        (tmp_path / "a-rather-long-name").write_text("")
        data = os.read(fd, inotify.READ_SIZE)
    finally:
        os.close(fd)
    assert [e.name for e in inotify.decode(data)] == ["a-rather-long-name"]
    assert inotify.decode(data[:-1]) == [] and inotify.decode(data[:10]) == []


def test_a_watch_on_a_missing_directory_is_a_named_kernel_error(tmp_path):
    fd = inotify.init()
    try:
        with pytest.raises(KernelError) as caught:
            inotify.add_watch(fd, str(tmp_path / "absent"), inotify.IN_CREATE)
        assert caught.value.errno == errno.ENOENT
    finally:
        os.close(fd)


def test_the_signal_has_the_same_bytes_as_dbus_fast_writes():
    event = CredentialsChanged("FILE:/tmp/krb5cc_1000", "renewed", "user1000@WQD.TEST", 1_800_000_000,
                               1_800_086_400, 1000)
    body = event.body()
    assert body[2] == {"principal": Typed("s", "user1000@WQD.TEST"), "expires": Typed("t", 1_800_000_000),
                       "renew_until": Typed("t", 1_800_086_400)}
    reference = [body[0], body[1], {k: Variant(v.signature, v.value) for k, v in body[2].items()}]
    path = "/io/wqd/WatchQueue1/subscription/17"
    expected = Message(message_type=MessageType.SIGNAL, destination=":1.5", path=path,
                       interface="io.wqd.Subscription1", member=event.signal, signature=event.signature,
                       body=reference, serial=9)._marshall(False)
    got = encode(signal_header(":1.5", path, "io.wqd.Subscription1", event.signal, event.signature),
                 marshal_body(event.signature, body), 9)
    assert bytes(got) == bytes(expected)
    assert event.route == (1000, "FILE:/tmp/krb5cc_1000", ())
    read_by = CredentialsChanged(*[getattr(event, f) for f in ("cache", "change", "principal", "expires",
                                                              "renew_until", "uid")], reader=(1000, (1000, 27)))
    assert read_by.route == (1000, "FILE:/tmp/krb5cc_1000", (1000, (1000, 27)))  # its own credential set's
    assert read_by.body() == body


def peer(uid: int) -> PeerCredentials:
    return PeerCredentials(unique_name=f":1.{uid}", uid=uid, pid=1, gids=frozenset({uid}))


@pytest.mark.asyncio
async def test_unix_rules_give_a_uid_its_own_caches_only():
    own = credentials.CredentialsTarget("credentials", "KCM:", uid=1000, cache="KCM:", kind="KCM")
    assert (await unix_credentials.watch(peer(1000), own, {})).allowed
    assert (await unix_credentials.watch(peer(0), own, {})).allowed
    assert not (await unix_credentials.watch(peer(1001), own, {})).allowed
    event = CredentialsChanged("KCM:", "created", "user1000@WQD.TEST", 2, 3, 1000)
    assert unix_credentials.post(peer(1000), event, {}) is event
    assert unix_credentials.post(peer(1001), event, {}) is None
    assert unix_credentials.decision_key(peer(1000), event, {}) != unix_credentials.decision_key(peer(1001), event, {})


def test_settings_have_defaults_and_name_what_they_refuse():
    assert credentials.check_settings({}) == {"expiring_lead": 300, "kcm_store": "/var/lib/sss/secrets/secrets.ldb",
                                              "helper_timeout": 30.0, "watch_rate": 20.0, "watch_burst": 40,
                                              "caches_per_uid": 32, "read_interval": 0.2}
    for key, bad in (("watch_rate", 0), ("watch_burst", 0), ("caches_per_uid", 0), ("read_interval", -1)):
        with pytest.raises(SettingError) as caught:
            credentials.check_settings({key: bad})
        assert (caught.value.section, caught.value.key) == ("credentials", key)
    with pytest.raises(SettingError) as caught:
        credentials.check_settings({"expiring_lead": -1})
    assert (caught.value.section, caught.value.key) == ("credentials", "expiring_lead")
    with pytest.raises(SettingError):
        credentials.check_settings({"kcm_store": "relative/secrets.ldb"})


def test_wqctl_prints_the_info_without_variants():
    from wqd.cli.wqctl import format_line, plain

    body = ["KCM:", "renewed", {"principal": Variant("s", "u@R"), "expires": Variant("t", 5),
                                "renew_until": Variant("t", 9)}]
    assert format_line("CredentialsChanged", ["cache", "change", "info"], body) == \
        "CredentialsChanged cache=KCM: change=renewed info={expires=5 principal=u@R renew_until=9}"
    assert plain(body[2]) == {"principal": "u@R", "expires": 5, "renew_until": 9}  # what --json prints


def test_keyring_caches_never_share_a_replay_capture_with_the_keys_source(tmp_path):
    """[keys] backend = "replay": a second reader of the FIFO would take the keys
    source's records (it did: the p1 benchmark starved), so KEYRING: is
    unavailable, and Sources says so by leaving keys/ out."""
    from wqd import config

    fifo = tmp_path / "replay"
    os.mkfifo(fifo)
    cfg = config.parse(f'[keys]\nbackend = "replay"\nreplay_path = "{fifo}"\n', str(tmp_path / "wqd.conf"))
    source = credentials.open_source(cfg)
    assert source.keyring is None and "replay" in source.keyring_reason
    assert "keys/" not in source.backend
    assert credentials.open_source(config.parse("", str(tmp_path / "wqd.conf"))).keyring is not None



@pytest.mark.asyncio
async def test_paced_reads_run_one_pass_at_a_time_per_uid_and_lose_no_wake():
    """A uid with two watches woken 200 times in 0.5 s (another uid's kinit
    loop against the KCM store) is read once per ``interval`` per read (two
    reads a pass: a pass every two intervals), never twice at once, and once
    more after the last wake; another uid's lane is not held up by it."""
    import asyncio

    from wqd.sources.credentials_reads import PacedReads

    loop = asyncio.get_running_loop()
    reads: list[tuple[str, float]] = []
    in_flight = {"n": 0, "most": 0}

    async def read(watch):
        in_flight["n"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["n"])
        reads.append((watch, loop.time()))
        await asyncio.sleep(0.01 if watch == "victim" else 0.03)
        in_flight["n"] -= 1

    paced = PacedReads(0.1, read)
    start = loop.time()
    for i in range(200):
        paced.wake(1001, "attacker-a")
        paced.wake(1001, "attacker-b")
        if i == 100:
            paced.wake(1000, "victim")
            woken = loop.time()
        await asyncio.sleep(0.0025)
    last_wake = loop.time()
    await asyncio.sleep(0.3)
    took = last_wake - start
    attacker = [t for w, t in reads if w == "attacker-a"]
    assert len(attacker) <= took / 0.2 + 2, attacker  # a read per interval, not one per wake
    assert attacker[-1] >= last_wake - 0.001  # the wakes of the last pass were read after them
    assert all(b - a >= 0.2 - 0.005 for a, b in zip(attacker, attacker[1:]))
    (victim,) = [t for w, t in reads if w == "victim"]
    assert victim - woken < 0.05  # its own lane: not behind the attacker's reads
    assert in_flight["most"] <= 2  # one read per lane at a time: two lanes
    assert not paced.pending(1001, "attacker-a")
    paced.wake(1000, "victim")
    paced.forget(1000, "victim")  # dropped before its pass: not read
    await asyncio.sleep(0.2)
    assert [w for w, _ in reads].count("victim") == 1
    await paced.close()


@pytest.mark.asyncio
async def test_a_read_that_raises_does_not_stop_its_lane(caplog):
    import asyncio

    from wqd.sources.credentials_reads import PacedReads

    done = []

    async def read(watch):
        if watch == "bad":
            raise RuntimeError("a bug")
        done.append(watch)

    paced = PacedReads(0, read)
    paced.wake(1000, "bad")
    paced.wake(1000, "good")
    await asyncio.sleep(0.05)
    assert done == ["good"]
    assert "re-reading a cache" in caplog.text
    await paced.close()
