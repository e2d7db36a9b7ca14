"""One reader for every section of wqd.conf: ``[daemon]``, ``[keys]``,
``[policy]``, ``[policy.polkit]`` and each source's own.

A schema maps each key of a section to ``(types, default, check, want)``: the
value must be one of *types* (never a bool, unless bool is the type), *check*
must pass it, and *want* says in words what the check wants. A refusal is a
``SettingError`` that carries the section and the key, so a caller that knows
the file can say ``FILE:LINE`` without reading the message.
"""

from __future__ import annotations


class SettingError(ValueError):
    """A bad or unknown setting: ``section``, ``key`` and, once a caller has found
    it in the file, ``line`` (else ``None``)."""

    def __init__(self, section: str, key: str, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.section, self.key, self.line = section, key, line


def read_settings(section: str, table: dict, schema: dict) -> dict:
    """*table* (the ``[section]`` read from TOML) checked against *schema*: every key
    of the schema, defaults filled in. Raises ``SettingError`` for the first
    unknown key (in sorted order), else for the first bad value in the schema's
    order."""
    unknown = sorted(set(table) - set(schema))
    if unknown:
        raise SettingError(section, unknown[0], f"unknown setting {section}.{unknown[0]}")
    settings = {}
    for key, (types, default, check, want) in schema.items():
        value = table.get(key, default)
        if (isinstance(value, bool) and types is not bool) or not isinstance(value, types) or not check(value):
            raise SettingError(section, key, f"{section}.{key} must be {want}, not {value!r}")
        settings[key] = value
    return settings
