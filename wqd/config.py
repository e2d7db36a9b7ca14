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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from wqd.settings import SettingError, read_settings
from wqd.sources import keys, registry

DEFAULT_PATH = "/etc/wqd/wqd.conf"
DEFAULT_RULES = ["/etc/wqd/rules.d"]
RULES_CONSUMERS = frozenset({"rules", "sandbox"})  # plugins that need the rules files read


class ConfigError(Exception):
    """A configuration problem, with the file (and where known, the line)."""


def _setting_error(path: str, text: str, exc: SettingError) -> ConfigError:
    """*exc* as ``FILE:LINE: message``, the line found from its section and key."""
    if exc.line is None and text:
        exc.line = _line_of(text, exc.section, exc.key)
    return ConfigError(f"{path}:{exc.line or '?'}: {exc}")


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


# The sections wqd.config reads itself, each with its schema (wqd.settings) and the
# prefix of its keys' attributes on Config. The sources' own sections are read by the
# source (its check_settings, wqd.sources.registry) when it opens, but [keys] is read
# here: bad [keys] settings stop wqd, as they always have.
DAEMON = {
    "queue_length": (int, 1024, lambda v: 2 <= v <= 1_000_000, "2..1000000"),
    "subscriptions_per_peer": (int, 4096, lambda v: v >= 1, ">= 1"),
    "subscriptions_per_uid": (int, 16384, lambda v: v >= 1, ">= 1"),
    "subscriptions_total": (int, 65536, lambda v: v >= 1, ">= 1"),
    "connect_timeout": ((int, float), 25.0, lambda v: 0 < v <= 3600, "0..3600"),
    "bytes_per_uid": (int, 64 << 20, lambda v: 65536 <= v <= 1 << 40, "65536..2^40 bytes"),
}
POLICY = {
    "plugins": (list, ["unix"], lambda v: v and all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v),
                "a non-empty list of distinct plugin names"),
    "rules": (list, [], lambda v: all(isinstance(x, str) and x and "\0" not in x for x in v), "a list of paths"),
    "timeout": ((int, float), 5.0, lambda v: 0 < v <= 600, "0..600"),
}
SECTIONS = {"daemon": (DAEMON, ""), registry.KEYS: (keys.SETTINGS, "keys_"), "policy": (POLICY, "policy_")}
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
        if section not in SECTIONS:
            continue  # a source's own section: checked by the source (check_source_settings)
        schema, prefix = SECTIONS[section]
        table = values
        if section == "policy":  # [policy.NAME]: a plugin's own settings
            table = {k: v for k, v in values.items() if not (k not in schema and isinstance(v, dict))}
            for name, settings in values.items():
                if name not in table:
                    _check_plugin_settings(text, path, name, settings)
        try:
            read_settings(section, table, schema)
        except SettingError as exc:
            raise _setting_error(path, text, exc) from None
        for key, value in table.items():  # only what the file sets: the rest keeps Config's defaults
            setattr(cfg, prefix + key, value)
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
        from wqd.policy.polkit import SETTINGS

        try:
            read_settings("policy.polkit", settings, SETTINGS)
        except SettingError as exc:
            raise _setting_error(path, text, exc) from None


def check_source_settings(cfg: Config, checks: dict) -> None:
    """Each source's section (``[devices]``, ...) by the source's own checker
    (*checks*: section -> callable raising ``SettingError``), as ``ConfigError``
    with the file and line. The daemon itself does not stop for these: the source
    reports itself unavailable and the log says why."""
    text = ""
    if cfg.path and not cfg.path.startswith("<"):
        try:
            text = Path(cfg.path).read_text()
        except OSError:
            pass
    for section, check in checks.items():
        try:
            check(cfg.raw.get(section, {}))
        except SettingError as exc:
            raise _setting_error(cfg.path or "<config>", text, exc) from None


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
