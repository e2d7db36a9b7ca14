"""Sans-I/O parsers: bytes in, events out, no file descriptors in sight."""
