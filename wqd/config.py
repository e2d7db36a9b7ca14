"""Configuration: TOML, ``--config FILE`` (default /etc/wqd/wqd.conf, optional).

::

    [daemon]
    queue_length = 1024            # events queued per subscriber before Lost
    subscriptions_per_peer = 4096
    subscriptions_per_uid = 16384  # all connections of one uid (root: no cap)
    subscriptions_total = 65536
    connect_timeout = 25.0         # seconds to reach the bus and get Hello answered
    bytes_per_uid = 67108864       # memory one uid (not root) may hold: options, targets, queued events

    [keys]
    backend = "auto"               # auto | watch_queue | proc-keys | replay
    poll_interval = 1.0            # proc-keys, seconds
    queue_pages = 4                # watch_queue: notification pipe size in pages
    replay_path = ""               # replay: file or FIFO of kernel-format records
    helper_timeout = 5.0           # seconds a credential helper may take per operation
    helpers_max = 64               # credential helper processes at once
    watch_rate = 20.0              # keys Watch calls a second per non-root uid ...
    watch_burst = 40               # ... and how many may come at once

    [policy]
    plugins = ["unix"]             # in order; any deny wins (docs/policy-plugins.md)
    timeout = 5.0                  # seconds a plugin may take to decide a Watch
    rules = ["/etc/wqd/rules.d"]   # rules files and directories of *.rules (rules, sandbox)

    [policy.polkit]                # a plugin's own settings: [policy.NAME]
    default = "deny"               # when polkitd is absent: deny | abstain | allow
    timeout = 2.0
    cache_ttl = 30.0

Relative ``rules`` paths are taken from the configuration file's directory. The
rules files are read and checked when the configuration is loaded (``load``,
``validate``): errors name the file and line.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from wqd.sources import registry

DEFAULT_PATH = "/etc/wqd/wqd.conf"
DEFAULT_RULES = ["/etc/wqd/rules.d"]
RULES_CONSUMERS = frozenset({"rules", "sandbox"})  # plugins that need the rules files read


class ConfigError(Exception):
    """A configuration problem, with the file (and where known, the line)."""


@dataclass
class Config:
    queue_length: int = 1024
    subscriptions_per_peer: int = 4096
    subscriptions_per_uid: int = 16384
    subscriptions_total: int = 65536
    connect_timeout: float = 25.0
    bytes_per_uid: int = 64 << 20
    keys_backend: str = "auto"
    keys_poll_interval: float = 1.0
    keys_queue_pages: int = 4
    keys_replay_path: str = ""
    keys_helper_timeout: float = 5.0
    keys_helpers_max: int = 64
    keys_watch_rate: float = 20.0
    keys_watch_burst: int = 40
    policy_plugins: list[str] = field(default_factory=lambda: ["unix"])
    policy_timeout: float = 5.0
    policy_rules: list[str] | None = None  # None: DEFAULT_RULES, and missing is fine
    policy_ruleset: object = None  # wqd.policy.rules_file.RuleSet, once validate() read the files
    raw: dict = field(default_factory=dict)
    path: str | None = None


# (section, key) -> (attribute, type, check, what the check wants)
_SCHEMA = {
    ("daemon", "queue_length"): ("queue_length", int, lambda v: 2 <= v <= 1_000_000, "2..1000000"),
    ("daemon", "subscriptions_per_peer"): ("subscriptions_per_peer", int, lambda v: v >= 1, ">= 1"),
    ("daemon", "subscriptions_per_uid"): ("subscriptions_per_uid", int, lambda v: v >= 1, ">= 1"),
    ("daemon", "subscriptions_total"): ("subscriptions_total", int, lambda v: v >= 1, ">= 1"),
    ("daemon", "connect_timeout"): ("connect_timeout", (int, float), lambda v: 0 < v <= 3600, "0..3600"),
    ("daemon", "bytes_per_uid"): ("bytes_per_uid", int, lambda v: 65536 <= v <= 1 << 40, "65536..2^40 bytes"),
    ("keys", "backend"): ("keys_backend", str, lambda v: v in ("auto", "watch_queue", "proc-keys", "replay"),
                          "auto, watch_queue, proc-keys or replay"),
    ("keys", "poll_interval"): ("keys_poll_interval", (int, float), lambda v: 0.01 <= v <= 3600, "0.01..3600"),
    ("keys", "queue_pages"): ("keys_queue_pages", int, lambda v: 1 <= v <= 16, "1..16"),
    ("keys", "replay_path"): ("keys_replay_path", str, lambda v: True, "a path"),
    ("keys", "helper_timeout"): ("keys_helper_timeout", (int, float), lambda v: 0.1 <= v <= 600, "0.1..600"),
    ("keys", "helpers_max"): ("keys_helpers_max", int, lambda v: 1 <= v <= 4096, "1..4096"),
    ("keys", "watch_rate"): ("keys_watch_rate", (int, float), lambda v: 0.01 <= v <= 1e6, "0.01..1000000"),
    ("keys", "watch_burst"): ("keys_watch_burst", int, lambda v: 1 <= v <= 1_000_000, "1..1000000"),
    ("policy", "plugins"): ("policy_plugins", list,
                            lambda v: v and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v),
                            "a non-empty list of distinct plugin names"),
    ("policy", "rules"): ("policy_rules", list, lambda v: all(isinstance(x, str) and x and "\0" not in x for x in v),
                          "a list of paths"),
    ("policy", "timeout"): ("policy_timeout", (int, float), lambda v: 0 < v <= 600, "0..600"),
}
KNOWN_SECTIONS = {"daemon", "policy", *registry.NAMES}


def _line_of(text: str, section: str, key: str) -> int | None:
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            current = s.strip("[]").strip()
        elif current == section and s.split("=", 1)[0].strip() == key:
            return n
    return None


def parse(text: str, path: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    cfg = Config(raw=data, path=path)
    for section, values in data.items():
        if section not in KNOWN_SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in values.items():
            entry = _SCHEMA.get((section, key))
            if entry is None and section == "policy" and isinstance(value, dict):
                _check_plugin_settings(text, path, key, value)
                continue
            if entry is None:
                if section in ("daemon", "keys", "policy"):
                    line = _line_of(text, section, key)
                    raise ConfigError(f"{path}:{line or '?'}: unknown setting {section}.{key}")
                continue  # sections owned by other components are checked there
            attr, typ, check, want = entry
            if isinstance(value, bool) or not isinstance(value, typ) or not check(value):
                line = _line_of(text, section, key)
                raise ConfigError(f"{path}:{line or '?'}: {section}.{key} must be {want}, not {value!r}")
            setattr(cfg, attr, value)
    if cfg.keys_backend == "replay" and not cfg.keys_replay_path:
        raise ConfigError(f"{path}: keys.backend = \"replay\" needs keys.replay_path")
    if cfg.policy_rules is not None and not path.startswith("<"):
        base = os.path.dirname(os.path.abspath(path))
        cfg.policy_rules = [os.path.join(base, p) for p in cfg.policy_rules]
        data["policy"]["rules"] = list(cfg.policy_rules)  # plugins reading [policy] see the same paths
    return cfg


def _check_plugin_settings(text: str, path: str, name: str, settings: dict) -> None:
    """``[policy.NAME]``: the built-ins' settings are checked here; others' by their plugin."""
    if name == "polkit":
        from wqd.policy import PluginError
        from wqd.policy.polkit import validate_settings

        try:
            validate_settings(settings)
        except PluginError as exc:
            setting = next((k for k in settings if f"policy.polkit.{k}" in str(exc)), None)
            line = _line_of(text, "policy.polkit", setting) if setting else None
            raise ConfigError(f"{path}:{line or '?'}: {exc}") from None


def check_source_settings(cfg: Config, checks: dict) -> None:
    """Each source's section (``[devices]``, ...) by the source's own checker
    (*checks*: section -> callable raising ValueError that names ``section.key``),
    as ``ConfigError`` with the file and line. The daemon itself does not stop
    for these: the source reports itself unavailable and the log says why."""
    text = ""
    if cfg.path and not cfg.path.startswith("<"):
        try:
            text = Path(cfg.path).read_text()
        except OSError:
            pass
    for section, check in checks.items():
        try:
            check(cfg.raw.get(section, {}))
        except ValueError as exc:
            named = re.search(rf"{re.escape(section)}\.([A-Za-z0-9_-]+)", str(exc))
            line = _line_of(text, section, named.group(1)) if named and text else None
            raise ConfigError(f"{cfg.path or '<config>'}:{line or '?'}: {exc}") from None


def validate(cfg: Config) -> Config:
    """Read and check what the configuration points to: the rules files.

    Sets ``cfg.policy_ruleset`` when a configured plugin uses rules (or ``rules``
    is set). Raises ``ConfigError`` naming the file and line. Idempotent.
    """
    if cfg.policy_ruleset is not None:
        return cfg
    if cfg.policy_rules is None and not RULES_CONSUMERS & set(cfg.policy_plugins):
        return cfg
    from wqd.policy.rules_file import RulesError, load_rules

    try:
        if cfg.policy_rules is None:
            cfg.policy_ruleset = load_rules(DEFAULT_RULES, missing_ok=True)
        else:
            cfg.policy_ruleset = load_rules(cfg.policy_rules)
    except RulesError as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def load(path: str | None) -> Config:
    """Read *path*; with ``None``, the default file if it exists, else defaults."""
    if path is None:
        if not Path(DEFAULT_PATH).exists():
            return Config()
        path = DEFAULT_PATH
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return validate(parse(text, path))
