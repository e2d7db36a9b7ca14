"""Logging: structured fields to the journal under systemd, plain stderr otherwise.

Every catalogued event has a ``MESSAGE_ID`` (generated once with
``systemd-id128 new``; never change one, tools match on them). Code logs them
with ``extra={"MESSAGE_ID": ..., "peer_uid": ..., "peer_pid": ...}``; on the
journal, lower-case extras become upper-case fields (``PEER_UID``, ``PEER_PID``),
and ``peer_pid`` is also sent as ``OBJECT_PID`` so journald attaches the peer's
``OBJECT_UID``, ``OBJECT_COMM``, ... itself. On stderr the extras are not shown.

Select them with ``journalctl MESSAGE_ID=...`` or, for a fleet,
``systemd-journal-upload`` and a filter on the ID on the collecting side.
"""

from __future__ import annotations

import logging
import os
import re
import sys

# MESSAGE_IDs: one per kind of event an administrator may want to select.
DAEMON_STARTED = "d7c64266a2cd4043ae026612b743fc47"
DAEMON_STOPPED = "3d2388376d854707854f43d283516c8a"
SUBSCRIPTION_CREATED = "558e7c4a1ee148afbfc06ebcc6749f1c"
SUBSCRIPTION_ENDED = "32f1bde44d0e4478b44eb05b72f31464"
EVENTS_LOST = "996473c2225245618dad73f9883cebaa"
POLICY_DENIED = "7f0d1d5414524363ae30efdbb5b8f8d1"

MESSAGE_IDS = {
    "DAEMON_STARTED": DAEMON_STARTED,
    "DAEMON_STOPPED": DAEMON_STOPPED,
    "SUBSCRIPTION_CREATED": SUBSCRIPTION_CREATED,
    "SUBSCRIPTION_ENDED": SUBSCRIPTION_ENDED,
    "EVENTS_LOST": EVENTS_LOST,
    "POLICY_DENIED": POLICY_DENIED,
}

STDERR_FORMAT = "wqd[%(process)d]: %(levelname)s %(name)s: %(message)s"
SYSLOG_IDENTIFIER = "wqd"

# Attributes every LogRecord has: not extras, never sent as fields.
_RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# journald drops fields whose names are not upper-case letters, digits and '_'
# (and may not start with '_' or a digit: those are trusted fields).
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def connected_to_journal(fd: int = 2) -> bool:
    """True when *fd* is the stream systemd connected to the journal.

    systemd sets ``JOURNAL_STREAM=DEVICE:INODE`` for a service whose stdout or
    stderr goes to the journal; comparing it with ``fstat`` (as systemd.exec(5)
    advises) tells a real journal stream from an inherited, stale variable.
    """
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_fields(record: logging.LogRecord) -> dict:
    """The extras of *record* as journal fields (names upper-cased, invalid ones dropped)."""
    fields = {}
    for key, value in vars(record).items():
        if key in _RECORD_ATTRIBUTES or value is None:
            continue
        name = key.upper()
        if _FIELD_NAME.fullmatch(name):
            fields[name] = value
    if "PEER_PID" in fields:
        fields.setdefault("OBJECT_PID", fields["PEER_PID"])
    return fields


def _journal_handler_class():
    from systemd.journal import JournalHandler

    class StructuredJournalHandler(JournalHandler):
        """``systemd.journal.JournalHandler`` that sends extras as valid journal fields.

        The stock handler passes every LogRecord attribute under its Python name
        (``msg``, ``peer_uid``, ...); journald silently drops such lower-case
        fields, so the extras would never arrive.
        """

        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields = {**self._extra, **journal_fields(record)}
                self.send(self.format(record), PRIORITY=str(self.map_priority(record.levelno)),
                          LOGGER=record.name, CODE_FILE=record.pathname, CODE_LINE=record.lineno,
                          CODE_FUNC=record.funcName, **fields)
            except Exception:
                self.handleError(record)

    return StructuredJournalHandler


def setup_logging(level: str = "info", target: str = "auto") -> str:
    """Configure the root logger; return where logs go: ``"journal"`` or ``"stderr"``.

    *target*: ``auto`` (the journal when stderr is systemd's journal stream),
    ``journal`` or ``stderr``.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    use_journal = target == "journal" or (target == "auto" and connected_to_journal())
    if use_journal:
        try:
            handler = _journal_handler_class()(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        except ImportError:
            use_journal = False
            print("wqd: systemd-python is missing: logging to stderr", file=sys.stderr)
        else:
            handler.setFormatter(logging.Formatter("%(message)s"))
            root.addHandler(handler)
            return "journal"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(STDERR_FORMAT))
    root.addHandler(handler)
    return "stderr"
