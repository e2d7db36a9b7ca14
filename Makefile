# wqd: `make run` runs the daemon, `make test` runs every test tier.
# Both set up what they need first (Debian packages, .venv): scripts/setup.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: setup run test test-host test-unit test-bus test-kernel test-system bench bench-quick bench-deps install uninstall deb clean

setup:
	@PYTHON=$(PYTHON) scripts/setup

run: setup
	scripts/run-dev

# The whole suite: host tiers (unit + bus), then the kernel and system tiers under qemu.
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

# $(DEB_DIST)/wqd_<version>_all.deb (default dist/), with dpkg-buildpackage and
# debhelper (debian/), from the files git tracks or would track (no .venv, caches
# or build output) copied to $(DEB_BUILD) (default build/deb/): Debian tools
# only, no network. The Debian version must be the pyproject.toml version.
# Build dependencies: scripts/setup installs them.
DEB_BUILD ?= build/deb
DEB_DIST ?= dist
DEB_VERSION = $(shell dpkg-parsechangelog -l debian/changelog -S Version)
deb:
	@v=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml); \
	  [ "$$v" = "$(DEB_VERSION)" ] || { echo "deb: debian/changelog says $(DEB_VERSION), pyproject.toml $$v" >&2; exit 1; }
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_BUILD)/wqd-$(DEB_VERSION) $(DEB_DIST)
	git ls-files -z --cached --others --exclude-standard | \
	  tar --null -T - -cf - | tar -xf - -C $(DEB_BUILD)/wqd-$(DEB_VERSION)
	cd $(DEB_BUILD)/wqd-$(DEB_VERSION) && env -u PYTHONPATH PATH=/usr/sbin:/usr/bin:/sbin:/bin \
	  dpkg-buildpackage -b -us -uc >../build.log 2>&1 || \
	  { tail -40 ../build.log >&2; echo "deb: dpkg-buildpackage failed ($(DEB_BUILD)/build.log)" >&2; exit 1; }
	cp $(DEB_BUILD)/wqd_$(DEB_VERSION)_all.deb $(DEB_DIST)/
	@echo "$(DEB_DIST)/wqd_$(DEB_VERSION)_all.deb"

clean:
	rm -rf $(VENV) .venv-lowest build dist *.egg-info .pytest_cache
