"""Every bus name, object path, interface and error name of the API, in one place.

Version 1 of the contract (DESIGN.md, data/dbus/io.wqd.WatchQueue1.xml).
"""

from pathlib import Path

# The interface XML, shipped inside the package (a copy of data/dbus/ in wheels).
INTERFACE_XML = Path(__file__).with_name("io.wqd.WatchQueue1.xml")

BUS_NAME = "io.wqd.WatchQueue1"
MANAGER_PATH = "/io/wqd/WatchQueue1"
MANAGER_INTERFACE = "io.wqd.WatchQueue1"
SUBSCRIPTION_PREFIX = MANAGER_PATH + "/subscription/"
SUBSCRIPTION_INTERFACE = "io.wqd.Subscription1"

PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_INTERFACE = "org.freedesktop.DBus.Introspectable"
PEER_INTERFACE = "org.freedesktop.DBus.Peer"

ERROR_PREFIX = "io.wqd.WatchQueue1.Error."
ACCESS_DENIED = ERROR_PREFIX + "AccessDenied"
NOT_SUPPORTED = ERROR_PREFIX + "NotSupported"
INVALID_ARGUMENT = ERROR_PREFIX + "InvalidArgument"
NO_SUCH_OBJECT = ERROR_PREFIX + "NoSuchObject"
LIMITS_EXCEEDED = ERROR_PREFIX + "LimitsExceeded"
FAILED = ERROR_PREFIX + "Failed"

API_VERSION = "1"


def subscription_path(number: int) -> str:
    return f"{SUBSCRIPTION_PREFIX}{number}"
