"""wqd: kernel notifications on D-Bus, filtered per peer."""

__version__ = "0.1.0"
