"""Event sources: kernel fds driven by the event loop, parsed by sans-I/O parsers.

A source turns ``Watch(source, target, options)`` into kernel watches (refcounted
across subscriptions) and kernel records into ``Event``\\ s, which it hands to the
hub (its ``Sink``). It never knows about D-Bus. The contract with the hub
(``Source``, ``Sink``, ``Subscription``, ``ANY``) is ``wqd.subscription``'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wqd.errors import InvalidArgument
from wqd.settings import read_settings  # a source's [section]: wqd.settings
from wqd.subscription import ANY, Sink, Source, Subscription

__all__ = ["ANY", "Flag", "Sink", "Source", "Strings", "Subscription", "check_options", "read_settings",
           "string_list_option"]


def string_list_option(options: dict, key: str, allowed: Iterable[str] | None = None) -> frozenset[str] | None:
    """Read an ``as`` option; ``None`` when absent. Raises InvalidArgument."""
    if key not in options:
        return None
    value = options[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"option {key!r} must be an array of strings (as)")
    values = frozenset(value)
    if allowed is not None:
        unknown = values - frozenset(allowed)
        if unknown:
            raise InvalidArgument(f"option {key!r}: unknown value(s) {', '.join(sorted(unknown))}")
    return values


# -- Watch options: one schema per source, one checker -----------------------------


@dataclass(frozen=True, slots=True)
class Strings:
    """An ``as`` option, read as a frozenset (``None`` when absent): only *allowed*
    values if given; refused when empty if *nonempty*."""

    allowed: Iterable[str] | None = None
    nonempty: bool = False

    def read(self, options: dict, key: str) -> frozenset[str] | None:
        values = string_list_option(options, key, self.allowed)
        if self.nonempty and values is not None and not values:
            raise InvalidArgument(f"option {key!r} must not be empty")
        return values


@dataclass(frozen=True, slots=True)
class Flag:
    """A ``b`` option; *default* when absent."""

    default: bool = False

    def read(self, options: dict, key: str) -> bool:
        value = options.get(key, self.default)
        if not isinstance(value, bool):
            raise InvalidArgument(f"option {key!r} must be a boolean (b)")
        return value


def check_options(source: str, schema: dict, options: dict) -> dict:
    """The options of a ``Watch`` on *source* checked against its *schema* (option
    name -> ``Strings`` or ``Flag``), in the schema's order: every option of the
    schema, read (absent ones as their kind says). Raises InvalidArgument for an
    option the schema lacks or a value it refuses."""
    unknown = set(options) - set(schema)
    if unknown:
        raise InvalidArgument(f"unknown option(s) for {source}: {', '.join(sorted(unknown))}")
    return {key: kind.read(options, key) for key, kind in schema.items()}
