# ocpp-edge — every target sets up what it needs on a fresh Debian/Ubuntu machine.
#   make run    run the gateway in the foreground with etc/ocpp-edge.dev.conf
#   make test   run the test suite (newest libraries)
#   make test-bookworm   the same suite on Debian bookworm's library versions
#   make bench  benchmarks (figures go to BENCHMARKS.md by hand)
#   make deb    the Debian package: dist/ocpp-edge_<version>_all.deb (+ lintian)
#   make deb-test   build it, install it with apt into a fresh Debian bookworm booted
#                   with systemd-nspawn, and check the service there (+ piuparts)

PYTHON ?= python3
VENV ?= .venv
BOOKWORM_VENV ?= .venv-bookworm
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-bookworm bench venv mosquitto man-tools lint clean deb deb-test

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

$(BOOKWORM_VENV)/.installed: pyproject.toml constraints/bookworm.txt
	$(PYTHON) -m venv $(BOOKWORM_VENV)
	$(BOOKWORM_VENV)/bin/pip install -q --upgrade pip
	$(BOOKWORM_VENV)/bin/pip install -q -c constraints/bookworm.txt -e '.[test]'
	touch $@

# Integration tests start their own Mosquitto; install it from Debian when missing.
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto (apt)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q mosquitto; }

# tests/test_packaging.py formats the man pages with groff and man; install them when missing.
man-tools:
	@{ command -v groff && command -v man; } >/dev/null || { \
	  echo "installing groff-base and man-db (apt)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q groff-base man-db; }

# The development config plus a buffer directory inside the checkout (.run/).
run: venv
	mkdir -p .run
	{ cat etc/ocpp-edge.dev.conf; echo "buffer.dir = $(CURDIR)/.run/buffer"; } > .run/dev.conf
	$(VENV)/bin/ocpp-edge --config .run/dev.conf

test: venv mosquitto man-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-bookworm: $(BOOKWORM_VENV)/.installed mosquitto man-tools
	$(BOOKWORM_VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: venv mosquitto
	$(VENV)/bin/python bench/run.py

lint: venv
	$(VENV)/bin/pip install -q ruff
	$(VENV)/bin/ruff check ocpp_edge tests

clean:
	rm -rf $(VENV) $(BOOKWORM_VENV) .pytest_cache .hypothesis *.egg-info

# The Debian package, built from a scratch copy of the tree with Debian's toolchain
# (installed through apt when missing), then lintian; see packaging/build-deb.
deb:
	packaging/build-deb dist

# The package under a real systemd in a fresh Debian bookworm tree (needs root: the
# debootstrap cache lives in /var/cache/ocpp-edge-deb-test); see packaging/deb-test.
deb-test:
	$(SUDO) packaging/deb-test
