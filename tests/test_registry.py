"""One registry of sources (wqd.sources.registry) and one Watch option checker
(wqd.sources.check_options): what the daemon, the config checker and the policies
know about sources comes from there."""

import pytest

from wqd import config, daemon
from wqd.errors import InvalidArgument
from wqd.events import DeviceChanged, FilesystemError, KeyChanged, MountChanged
from wqd.policy import namespace, polkit, rules_file, unix
from wqd.sources import Flag, Strings, check_options, devices, fs_errors, keys, mounts, registry


def test_each_source_module_owns_its_name_and_its_events_carry_it():
    assert registry.SOURCES[keys.NAME].open is keys.open_source
    assert registry.SOURCES[devices.NAME].open is devices.open_source
    assert registry.SOURCES[mounts.MountsSource.name].open is mounts.open_source
    assert registry.SOURCES[fs_errors.FsErrorsSource.name].open is fs_errors.open_source
    for event, name in ((KeyChanged, registry.KEYS), (DeviceChanged, registry.DEVICES),
                        (MountChanged, registry.MOUNTS), (FilesystemError, registry.FS_ERRORS)):
        assert event.source == name


def test_the_daemon_the_config_and_the_policies_know_the_same_sources():
    names = registry.NAMES
    assert set(daemon.SOURCE_SECTIONS) == names
    assert names <= config.KNOWN_SECTIONS
    assert rules_file.SOURCES == names
    assert set(unix.RULES) == names
    assert set(polkit.ACTIONS) == names
    assert namespace.HOST_WIDE <= names


SCHEMA = {"actions": Strings(("add", "remove"), nonempty=True), "keys": Strings(), "initial": Flag()}


def test_check_options_reads_every_option_of_the_schema():
    assert check_options("things", SCHEMA, {}) == {"actions": None, "keys": None, "initial": False}
    assert check_options("things", SCHEMA, {"actions": ["add"], "keys": ["A", "B"], "initial": True}) == \
        {"actions": frozenset({"add"}), "keys": frozenset({"A", "B"}), "initial": True}


@pytest.mark.parametrize(("options", "message"), [
    ({"colour": 1, "size": 2}, "unknown option(s) for things: colour, size"),
    ({"actions": []}, "option 'actions' must not be empty"),
    ({"actions": ["eat"]}, "option 'actions': unknown value(s) eat"),
    ({"keys": "A"}, "option 'keys' must be an array of strings (as)"),
    ({"initial": 1}, "option 'initial' must be a boolean (b)"),
])
def test_check_options_names_what_it_refuses(options, message):
    with pytest.raises(InvalidArgument) as caught:
        check_options("things", SCHEMA, options)
    assert str(caught.value) == message
