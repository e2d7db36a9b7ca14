"""The D-Bus adapter: the only layer that imports dbus-fast."""
