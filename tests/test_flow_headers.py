"""The outlet's signal headers from templates (``wqd.bus.emitter.HeaderTemplates``) are
byte for byte what ``wqd.bus.signals.signal_header`` marshals, for every path length
modulo 8, member and signature wqd signals use, and for more than one destination."""

from wqd.bus.emitter import HeaderTemplates
from wqd.bus.names import SUBSCRIPTION_INTERFACE, subscription_path
from wqd.bus.signals import signal_header


def test_templated_headers_are_the_marshalled_ones():
    templates = HeaderTemplates()
    members = [("Lost", "t"), ("Removed", "s"), ("MountChanged", "sts" "a{sv}"), ("KeyChanged", "tsu")]
    for destination in (":1.7", ":1.123456", ":1.2"):
        for member, signature in members:
            for number in (1, 12, 123, 1234, 98765, 123456789, 2**62 + 12345, 2**63 - 1):
                for path in (subscription_path(number), subscription_path(number) + "x" * (number % 8)):
                    want = signal_header(destination, path, SUBSCRIPTION_INTERFACE, member, signature)
                    assert templates.header(destination, path, member, signature) == want, (destination, path)
    templates.forget(":1.7")
    assert ":1.7" not in templates._tails and ":1.2" in templates._tails
