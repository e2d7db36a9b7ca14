"""Rules files: the administrator's allow/deny list, parsed and matched.

One rule a line, ``#`` starts a comment (at the start of a line or of a word)::

    # verdict  source  target      subject
    allow      keys    *           group:krb-users
    deny       *       /media/*    uid:1001
    allow      devices usb         app:org.gnome.Shell.Extensions
    deny       mounts  ""          world

- verdict: ``allow`` or ``deny``.
- source: ``keys``, ``devices``, ``mounts``, ``fs-errors`` or ``*``.
- target: a shell-style glob (``fnmatch``: ``*``, ``?``, ``[...]``; ``*`` also
  matches ``/``) matched against the target the caller passed to ``Watch`` (for
  ``keys`` also against the resolved key serial, so ``@u`` cannot dodge a rule
  naming its serial). ``""`` is the empty target (all devices, the caller's own
  mount namespace). A word in double quotes may hold spaces or ``#``.
- subject: ``uid:N``, ``user:NAME``, ``gid:N``, ``group:NAME`` (the peer's
  primary or a supplementary group), ``app:APP_ID`` (a sandboxed app whose
  identity is confirmed, see ``wqd.peer.Sandbox``) or ``world`` (everyone).
  User and group names are resolved when the files are read (at start and on
  ``SIGHUP``); an unknown name is an error, so a typo cannot silently fail to match.

Files are taken in the configured order; a directory contributes its ``*.rules``
files in lexical order of their names. The first rule that matches decides; when
none does, the ``rules`` plugin abstains. Errors name the file and the line.
"""

from __future__ import annotations

import fnmatch
import grp
import os
import pwd
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wqd.events import WatchTarget
from wqd.peer import APP_ID, PeerCredentials
from wqd.sources.registry import KEYS, NAMES

SOURCES = NAMES  # wqd.sources.registry
VERDICTS = frozenset({"allow", "deny"})
MAX_FILE = 1 << 20  # bytes
MAX_ID = 2**32 - 2  # (uid_t)-1 is "no id"


class RulesError(Exception):
    """A rules file that cannot be used; the message starts with ``FILE:LINE:``."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path = path
        self.line = line
        self.message = message


@dataclass(frozen=True, slots=True)
class Subject:
    kind: str  # "uid" | "gid" | "app" | "world"
    value: int | str | None
    text: str  # as written, for logs

    def matches(self, peer: PeerCredentials) -> bool:
        kind = self.kind
        if kind == "world":
            return True
        if kind == "uid":
            return peer.uid == self.value
        if kind == "gid":
            return peer.in_group(self.value)
        return peer.app_id is not None and peer.app_id == self.value


@dataclass(frozen=True, slots=True)
class Rule:
    verdict: str
    source: str  # or "*"
    target: str  # the glob as written
    subject: Subject
    origin: str  # FILE:LINE
    pattern: re.Pattern

    def matches(self, peer: PeerCredentials, source: str, target: WatchTarget) -> bool:
        if self.source != "*" and self.source != source:
            return False
        match = self.pattern.match
        if match(target.spec) is None and not (
                source == KEYS and target.object_id and match(str(target.object_id)) is not None):
            return False
        return self.subject.matches(peer)

    def __str__(self) -> str:
        target = self.target if self.target else '""'
        return f"{self.verdict} {self.source} {target} {self.subject.text} ({self.origin})"


@dataclass(frozen=True, slots=True)
class RuleSet:
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()

    def first_match(self, peer: PeerCredentials, source: str, target: WatchTarget,
                    only: Callable[[Rule], bool] | None = None) -> Rule | None:
        for rule in self.rules:
            if only is not None and not only(rule):
                continue
            if rule.matches(peer, source, target):
                return rule
        return None

    def __len__(self) -> int:
        return len(self.rules)


def _words(line: str) -> list[str] | str:
    """Split on blanks; ``"..."`` groups; ``#`` at a word's start ends the line.

    Returns the words, or an error message.
    """
    words: list[str] = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in " \t":
            i += 1
        elif c == "#":
            break
        elif c == '"':
            end = line.find('"', i + 1)
            if end < 0:
                return "unterminated quote"
            words.append(line[i + 1:end])
            i = end + 1
            if i < n and line[i] not in " \t":
                return "a quoted word must end at a blank"
        else:
            j = i
            while j < n and line[j] not in " \t":
                j += 1
            words.append(line[i:j])
            i = j
    return words


def _number(text: str) -> int | None:
    if text.isascii() and text.isdigit() and len(text) <= 10:
        value = int(text)
        if value <= MAX_ID:
            return value
    return None


def parse_subject(text: str, lookup_user=pwd.getpwnam, lookup_group=grp.getgrnam) -> Subject:
    """Raises ``ValueError`` with a message for the caller."""
    if text == "world":
        return Subject("world", None, text)
    kind, sep, value = text.partition(":")
    if not sep or not value:
        raise ValueError(f"bad subject {text!r}: want uid:N, user:NAME, gid:N, group:NAME, app:APP_ID or world")
    if kind in ("uid", "gid"):
        number = _number(value)
        if number is None:
            raise ValueError(f"bad subject {text!r}: {kind} must be a number 0..{MAX_ID}")
        return Subject(kind, number, text)
    if kind == "user":
        try:
            return Subject("uid", lookup_user(value).pw_uid, text)
        except KeyError:
            raise ValueError(f"unknown user {value!r}") from None
    if kind == "group":
        try:
            return Subject("gid", lookup_group(value).gr_gid, text)
        except KeyError:
            raise ValueError(f"unknown group {value!r}") from None
    if kind == "app":
        if not APP_ID.fullmatch(value):
            raise ValueError(f"bad app id {value!r}")
        return Subject("app", value, text)
    raise ValueError(f"bad subject {text!r}: want uid:N, user:NAME, gid:N, group:NAME, app:APP_ID or world")


def parse_rules(text: str, path: str = "<rules>", **lookups) -> list[Rule]:
    """Parse one file's text. Raises ``RulesError`` at the first bad line."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        words = _words(line)
        if isinstance(words, str):
            raise RulesError(path, number, words)
        if not words:
            continue
        if len(words) != 4:
            raise RulesError(path, number, f"want 'allow|deny SOURCE TARGET SUBJECT', got {len(words)} word(s)")
        verdict, source, target, subject = words
        if verdict not in VERDICTS:
            raise RulesError(path, number, f"unknown verdict {verdict!r}: want allow or deny")
        if source != "*" and source not in SOURCES:
            raise RulesError(path, number, f"unknown source {source!r}: want {', '.join(sorted(SOURCES))} or *")
        if "\0" in target:
            raise RulesError(path, number, "NUL in target")
        try:
            subj = parse_subject(subject, **lookups)
        except ValueError as exc:
            raise RulesError(path, number, str(exc)) from None
        pattern = re.compile(fnmatch.translate(target), re.DOTALL)
        rules.append(Rule(verdict, source, target, subj, f"{path}:{number}", pattern))
    return rules


def rule_files(paths: Iterable[str], missing_ok: bool = False) -> list[str]:
    """The files *paths* stand for, in order (directories: their ``*.rules``, sorted)."""
    files = []
    for path in paths:
        try:
            if os.path.isdir(path):
                names = sorted(e.name for e in os.scandir(path)
                               if e.name.endswith(".rules") and not e.name.startswith(".") and e.is_file())
                files.extend(os.path.join(path, name) for name in names)
            elif os.path.exists(path):
                files.append(path)
            elif not missing_ok:
                raise RulesError(path, None, "no such file or directory")
        except OSError as exc:
            raise RulesError(path, None, exc.strerror or str(exc)) from None
    return files


def load_rules(paths: Iterable[str], missing_ok: bool = False, **lookups) -> RuleSet:
    """Read and parse every rules file of *paths*: all of them, or ``RulesError``."""
    files = rule_files(paths, missing_ok)
    rules: list[Rule] = []
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError as exc:
            raise RulesError(path, None, exc.strerror or str(exc)) from None
        if len(data) > MAX_FILE:
            raise RulesError(path, None, f"larger than {MAX_FILE} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[:exc.start].count(b"\n") + 1
            raise RulesError(path, line, "not UTF-8") from None
        rules.extend(parse_rules(text, path, **lookups))
    return RuleSet(tuple(rules), tuple(files))
