# wqd: `make run` runs the daemon, `make test` runs every test tier.
# Both set up what they need first (Debian packages, .venv): scripts/setup.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: setup run test test-host test-unit test-bus test-kernel bench bench-quick bench-deps install uninstall clean

setup:
	@PYTHON=$(PYTHON) scripts/setup

run: setup
	scripts/run-dev

# The whole suite: host tiers (unit + bus), then the kernel tier under qemu.
test: setup
	scripts/test

test-host: setup
	$(PY) -m pytest tests

# The host tiers one at a time, by marker (tests/conftest.py fails a test that uses
# a bus fixture without the `bus` marker, so nothing slips between them):
# unit = no bus, no kernel tier; bus = a private dbus-daemon and the real daemon.
test-unit: setup
	$(PY) -m pytest tests -m "not bus and not kernel"

test-bus: setup
	$(PY) -m pytest tests -m bus

test-kernel: setup
	tests/vm/run

# Benchmarks (bench/README.md): results in bench/results/{full,quick}.{json,md,png}.
bench: bench-deps
	$(PY) -m bench

bench-quick: bench-deps
	$(PY) -m bench --quick

# The `bench` extra (matplotlib), installed again only when pyproject.toml changes.
bench-deps: setup
	@[ $(VENV)/.wqd-bench-installed -nt pyproject.toml ] || \
		{ $(VENV)/bin/pip install -q -e '.[bench]' && touch $(VENV)/.wqd-bench-installed; }

install:
	scripts/install "$(DESTDIR)" "$(PREFIX)"

uninstall:
	scripts/install --uninstall "$(DESTDIR)" "$(PREFIX)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
