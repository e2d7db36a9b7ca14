"""Rules files: syntax, wildcards, first match, abstain, file:line errors, loading order."""

from __future__ import annotations

import grp
import os
import pwd
import textwrap

import pytest

from wqd import config as configuration
from wqd.events import WatchTarget
from wqd.peer import PeerCredentials, Sandbox
from wqd.policy import PluginContext
from wqd.policy.rules import RulesPolicy
from wqd.policy.rules_file import RuleSet, RulesError, load_rules, parse_rules
from wqd.policy.sandbox import SandboxPolicy


def peer(uid=1000, gid=None, gids=(), app=None, confirmed=True, verified=True) -> PeerCredentials:
    sandbox = Sandbox("flatpak", app, confirmed) if app is not None else None
    return PeerCredentials(f":1.{uid}", uid, frozenset(gids), 4242, None, 1, 1, 1, 1, verified,
                           gid=uid if gid is None else gid, sandbox=sandbox)


def target(source="keys", spec="@u", object_id=0) -> WatchTarget:
    return WatchTarget(source, spec, object_id)


def decide(text: str, p: PeerCredentials, t: WatchTarget, plugin=RulesPolicy) -> str:
    rules = RuleSet(tuple(parse_rules(textwrap.dedent(text), "test.rules")))
    return plugin(PluginContext(plugin.name, rules=rules)).watch(p, t.source, t).verdict


def test_first_match_wins_and_no_match_abstains():
    text = """
        # the first rule that matches decides
        deny  keys  @u  uid:1001
        allow keys  *   world
        deny  keys  *   uid:1000   # never reached for keys
    """
    assert decide(text, peer(1001), target()) == "deny"
    assert decide(text, peer(1000), target()) == "allow"
    assert decide(text, peer(1001), target(spec="123")) == "allow"
    assert decide(text, peer(1000), target("devices", "usb")) == "abstain"


def test_wildcards_in_source_and_target():
    text = """
        deny  *       /media/*  world
        allow devices usb       world
        allow devices ""        uid:0
        allow mounts  /srv/?    world
        allow mounts  /data/[ab]* world
    """
    assert decide(text, peer(), target("mounts", "/media/usb0")) == "deny"
    assert decide(text, peer(), target("fs-errors", "/media/usb0/deep/er")) == "deny"  # * spans /
    assert decide(text, peer(), target("devices", "usb")) == "allow"
    assert decide(text, peer(), target("devices", "usbmisc")) == "abstain"
    assert decide(text, peer(0), target("devices", "")) == "allow"
    assert decide(text, peer(1000), target("devices", "")) == "abstain"
    assert decide(text, peer(), target("mounts", "/srv/x")) == "allow"
    assert decide(text, peer(), target("mounts", "/srv/xy")) == "abstain"
    assert decide(text, peer(), target("mounts", "/data/b2")) == "allow"
    assert decide(text, peer(), target("mounts", "/data/c2")) == "abstain"


def test_key_rules_match_the_resolved_serial_too():
    text = "deny keys 555 world\nallow keys * world\n"
    assert decide(text, peer(), target(spec="@u", object_id=555)) == "deny"
    assert decide(text, peer(), target(spec="@u", object_id=556)) == "allow"
    # only for keys: a device target is never compared with a number
    assert decide("deny * 0 world\n", peer(), target("devices", "usb", 0)) == "abstain"


def test_subjects_uid_gid_groups_world_app():
    text = """
        allow keys a uid:1000
        allow keys b gid:1234
        allow keys c world
        allow keys d app:org.example.App
    """
    assert decide(text, peer(1000), target(spec="a")) == "allow"
    assert decide(text, peer(1001), target(spec="a")) == "abstain"
    assert decide(text, peer(1001, gid=1234), target(spec="b")) == "allow"  # primary group
    assert decide(text, peer(1001, gids=(5, 1234)), target(spec="b")) == "allow"  # supplementary
    assert decide(text, peer(1001, gids=(5,)), target(spec="b")) == "abstain"
    assert decide(text, peer(65534), target(spec="c")) == "allow"
    assert decide(text, peer(1000, app="org.example.App"), target(spec="d")) == "allow"
    assert decide(text, peer(1000, app="org.example.Other"), target(spec="d")) == "abstain"
    # an unconfirmed sandbox has no app id to match
    assert decide(text, peer(1000, app="org.example.App", confirmed=False), target(spec="d")) == "abstain"
    assert decide(text, peer(1000), target(spec="d")) == "abstain"


def test_user_and_group_names_resolve_when_read():
    user = pwd.getpwuid(os.getuid())
    group = grp.getgrgid(os.getgid())
    rules = parse_rules(f"allow keys * user:{user.pw_name}\nallow keys * group:{group.gr_name}\n")
    assert (rules[0].subject.kind, rules[0].subject.value) == ("uid", user.pw_uid)
    assert (rules[1].subject.kind, rules[1].subject.value) == ("gid", group.gr_gid)


@pytest.mark.parametrize("line, message", [
    ("allow keys *", "got 3 word(s)"),
    ("allow keys * world extra", "got 5 word(s)"),
    ("permit keys * world", "unknown verdict 'permit'"),
    ("allow key * world", "unknown source 'key'"),
    ("allow keys * uid:abc", "uid must be a number"),
    ("allow keys * uid:4294967295", "uid must be a number"),
    ("allow keys * gid:", "bad subject"),
    ("allow keys * everyone", "bad subject 'everyone'"),
    ("allow keys * user:no-such-user-wqd", "unknown user 'no-such-user-wqd'"),
    ("allow keys * group:no-such-group-wqd", "unknown group 'no-such-group-wqd'"),
    ("allow keys * app:../../etc", "bad app id"),
    ('allow keys "unterminated world', "unterminated quote"),
    ('allow keys "a"b world', "must end at a blank"),
])
def test_syntax_errors_name_file_and_line(line, message):
    text = f"# header\n\nallow keys * world\n{line}\n"
    with pytest.raises(RulesError) as info:
        parse_rules(text, "/etc/wqd/rules.d/50-site.rules")
    assert str(info.value).startswith("/etc/wqd/rules.d/50-site.rules:4: ")
    assert message in str(info.value)
    assert info.value.line == 4


def test_quotes_and_comments():
    rules = parse_rules('allow mounts "/mnt/a dir" world # trailing\nallow devices "" world\n'
                        'allow mounts /x#y world\n')
    assert [r.target for r in rules] == ["/mnt/a dir", "", "/x#y"]


def test_directories_are_read_in_lexical_order(tmp_path):
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "20-b.rules").write_text("allow keys * world\n")
    (d / "10-a.rules").write_text("deny keys * uid:1000\n")
    (d / "30-c.rules.disabled").write_text("this is not read\n")
    (d / ".hidden.rules").write_text("this is not read either\n")
    extra = tmp_path / "extra.conf"
    extra.write_text("deny keys * world\n")
    rs = load_rules([str(d), str(extra)])
    assert [os.path.basename(f) for f in rs.files] == ["10-a.rules", "20-b.rules", "extra.conf"]
    assert [r.origin.rsplit("/", 1)[1] for r in rs.rules] == ["10-a.rules:1", "20-b.rules:1", "extra.conf:1"]
    ctx = PluginContext("rules", rules=rs)
    assert RulesPolicy(ctx).watch(peer(1000), "keys", target()).verdict == "deny"
    assert RulesPolicy(ctx).watch(peer(1001), "keys", target()).verdict == "allow"


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(RulesError, match="no such file"):
        load_rules([str(tmp_path / "nope.rules")])
    assert len(load_rules([str(tmp_path / "nope.d")], missing_ok=True)) == 0
    bad = tmp_path / "bad.rules"
    bad.write_bytes(b"allow keys * world\n\xff\xfe\n")
    with pytest.raises(RulesError, match=r"bad.rules:2: not UTF-8"):
        load_rules([str(bad)])


def test_config_load_reads_rules_and_reports_file_line(tmp_path):
    d = tmp_path / "rules.d"
    d.mkdir()
    (d / "10-ok.rules").write_text("allow keys * world\n")
    conf = tmp_path / "wqd.conf"
    conf.write_text('[policy]\nplugins = ["unix", "rules"]\nrules = ["rules.d"]\n')
    cfg = configuration.load(str(conf))
    assert cfg.policy_rules == [str(d)]  # relative to the configuration file
    assert len(cfg.policy_ruleset) == 1
    (d / "20-bad.rules").write_text("\n\nallow keys *\n")
    with pytest.raises(configuration.ConfigError, match=r"20-bad.rules:3: want"):
        configuration.load(str(conf))


@pytest.mark.parametrize("toml, message", [
    ('plugins = []', "non-empty list"),
    ('plugins = ["unix", "unix"]', "distinct"),
    ('rules = "/etc/wqd/rules.d"', "a list of paths"),
    ('colour = "blue"', "unknown setting policy.colour"),
    ('[policy.polkit]\ndefault = "sometimes"', "policy.polkit.default must be"),
    ('[policy.polkit]\ncache_ttl = -1', "policy.polkit.cache_ttl"),
    ('[policy.polkit]\nretries = 3', "unknown setting policy.polkit.retries"),
])
def test_policy_section_errors_name_the_line(toml, message):
    text = f'[daemon]\nqueue_length = 64\n\n[policy]\n{toml}\n'
    with pytest.raises(configuration.ConfigError) as info:
        configuration.parse(text, "/etc/wqd/wqd.conf")
    assert message in str(info.value)
    line = int(str(info.value).split(":")[1])
    assert text.splitlines()[line - 1].split("=")[0].strip() in toml


def test_sandbox_only_counts_app_rules():
    text = """
        allow keys *  world
        allow keys @u app:org.example.Allowed
        deny  keys *  app:org.example.Allowed
    """
    app = peer(1000, app="org.example.Allowed")
    assert decide(text, app, target(spec="@u"), SandboxPolicy) == "abstain"
    assert decide(text, app, target(spec="@us"), SandboxPolicy) == "deny"
    assert decide(text, peer(1000, app="org.example.Other"), target(), SandboxPolicy) == "deny"
    assert decide(text, peer(1000, app="org.example.Allowed", confirmed=False), target(), SandboxPolicy) == "deny"
    assert decide(text, peer(1000), target(), SandboxPolicy) == "abstain"  # not sandboxed
    assert decide(text, peer(1000, verified=False), target(), SandboxPolicy) == "deny"  # cannot tell
