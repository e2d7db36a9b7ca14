# wqd: `make run` runs the daemon, `make test` runs every test tier.
# Both set up what they need first (Debian packages, .venv): scripts/setup.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: setup run test test-host test-kernel bench bench-quick install uninstall clean

setup:
	@PYTHON=$(PYTHON) scripts/setup

run: setup
	scripts/run-dev

# The whole suite: host tiers (unit + bus), then the kernel tier under qemu.
test: setup
	scripts/test

test-host: setup
	$(PY) -m pytest tests

test-kernel: setup
	tests/vm/run

bench: setup
	$(PY) -m bench

bench-quick: setup
	$(PY) -m bench --quick

install:
	scripts/install "$(DESTDIR)" "$(PREFIX)"

uninstall:
	scripts/install --uninstall "$(DESTDIR)" "$(PREFIX)"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
