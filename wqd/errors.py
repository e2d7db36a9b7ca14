"""The errors wqd answers callers with. The bus adapter maps each to its D-Bus name.

They live outside ``wqd/bus`` because sources and the hub raise them too; their
text is written for the caller and carries no internals.
"""


class WqdError(Exception):
    """Base: an error whose message may be shown to the caller."""

    dbus_suffix = "Failed"


class AccessDenied(WqdError):
    dbus_suffix = "AccessDenied"


class NotSupported(WqdError):
    dbus_suffix = "NotSupported"


class InvalidArgument(WqdError):
    dbus_suffix = "InvalidArgument"


class NoSuchObject(WqdError):
    dbus_suffix = "NoSuchObject"


class LimitsExceeded(WqdError):
    dbus_suffix = "LimitsExceeded"
