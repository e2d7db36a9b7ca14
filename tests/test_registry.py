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
    assert registry.SOURCES[mounts.NAME].open is mounts.open_source
    assert registry.SOURCES[fs_errors.NAME].open is fs_errors.open_source
    assert (mounts.MountsSource.name, fs_errors.FsErrorsSource.name) == (registry.MOUNTS, registry.FS_ERRORS)
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


# -- one settings reader: the key and the line from the error, not from its text --


def test_a_settings_error_carries_section_and_key():
    from wqd.settings import SettingError, read_settings

    schema = {"size": (int, 4, lambda v: 1 <= v <= 16, "1..16")}
    assert read_settings("things", {}, schema) == {"size": 4}
    for table, key, message in (({"size": 0}, "size", "things.size must be 1..16, not 0"),
                                ({"size": True}, "size", "things.size must be 1..16, not True"),
                                ({"colour": 1}, "colour", "unknown setting things.colour")):
        with pytest.raises(SettingError) as caught:
            read_settings("things", table, schema)
        assert (caught.value.section, caught.value.key, str(caught.value)) == ("things", key, message)


def test_the_line_of_a_source_setting_is_found_from_the_error_not_its_message(tmp_path):
    from wqd.settings import SettingError

    path = tmp_path / "wqd.conf"
    path.write_text('[daemon]\nqueue_length = 64\n\n[devices]\nbackend = "udev"\nreceive_buffer = 4096\n')
    cfg = config.load(str(path))

    def check(table):  # a message that names no key at all
        raise SettingError("devices", "receive_buffer", "too small for this machine")

    with pytest.raises(config.ConfigError) as caught:
        config.check_source_settings(cfg, {"devices": check})
    assert str(caught.value) == f"{path}:6: too small for this machine"


@pytest.mark.parametrize(("text", "where"), [
    ("[daemon]\n\nqueue_length = 1\n", 3),
    ("[keys]\nbackend = \"watch_queue\"\nhelpers_max = 0\n", 3),
    ("[policy]\nplugins = [\"unix\"]\n[policy.polkit]\ntimeout = 0\n", 4),
])
def test_every_section_wqd_reads_itself_names_file_and_line(text, where):
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "/etc/wqd/wqd.conf")
    assert str(caught.value).startswith(f"/etc/wqd/wqd.conf:{where}: ")
