# wqd: `make run` runs the daemon, `make test` runs every test tier.
# Both set up what they need first (Debian packages, .venv): scripts/setup.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: setup run test test-host test-kernel test-system bench bench-quick bench-deps install uninstall clean

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

# wqd as it ships, on Debian 12 and 13 booted with systemd under qemu (tests/system/README.md).
test-system: setup
	tests/system/run

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
