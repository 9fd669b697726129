# ocpp-edge — every target sets up what it needs on a fresh Debian/Ubuntu machine.
#   make run    run the gateway in the foreground with etc/ocpp-edge.dev.conf
#   make test   run the test suite (newest libraries)
#   make test-bookworm   the same suite on Debian bookworm's library versions
#   make bench  every benchmark figure (issue 8), Debian's python3 + bookworm packages, then
#               the newest libraries (.venv); tables on stdout, JSON in $(BENCH_OUT)/
#               (~35 min; figures go to BENCHMARKS.md by hand).  BENCH_ARGS is passed to
#               bench/run.py, e.g. make bench BENCH_ARGS=--smoke
#   make bench-quick   the former `make bench`: closed + open loop only, .venv (~2 min)
#   make bench-drain   only the backlog drain (bench/buffer_bench.py phase 3), both interpreters
#   make bench-offline offline operation (issue 15): local answer latency during an outage
#               beside the online round trip, replay of a 100,000-message outage backlog
#               with transaction id rewriting beside policy buffer (bench/offline_bench.py,
#               .venv, ~5 min; not part of `make bench`).  OFFLINE_ARGS, e.g. --smoke
#   make deb    the Debian package: dist/ocpp-edge_<version>_all.deb (+ lintian)
#   make deb-test   build it, install it with apt into a fresh Debian bookworm booted
#                   with systemd-nspawn, and check the service there (+ piuparts)

PYTHON ?= python3
VENV ?= .venv
BOOKWORM_VENV ?= .venv-bookworm
# Debian's own interpreter and bookworm's python3-* packages (what the .deb runs on), plus
# the reference bridge's `ocpp` and `websockets` from PyPI (--no-deps: keep Debian's jsonschema)
DEBIAN_PYTHON ?= /usr/bin/python3
DEBIAN_VENV ?= .venv-debian
DEBIAN_PKGS := python3-venv python3-tornado python3-paho-mqtt python3-jsonschema \
	python3-fastjsonschema python3-configobj python3-sdnotify
BENCH_OUT ?= /tmp/ocpp-edge-bench
BENCH_ARGS ?=
OFFLINE_ARGS ?=
BENCH_PHASES ?= closed,open,scale,idle,wakeups,startup,drain
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-bookworm bench bench-quick bench-drain bench-offline debian-venv venv \
	mosquitto brokers man-tools lint clean deb deb-test

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

# Debian's python3 with bookworm's packages (apt, when missing), in a venv that sees them.
debian-venv: $(DEBIAN_VENV)/.installed

$(DEBIAN_VENV)/.installed:
	@missing=$$(for p in $(DEBIAN_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null \
	  | grep -q "ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing (apt)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	  $(SUDO) apt-get install -y -q $$missing; fi
	test -x $(DEBIAN_VENV)/bin/python || $(DEBIAN_PYTHON) -m venv --system-site-packages $(DEBIAN_VENV)
	$(DEBIAN_VENV)/bin/pip install -q --no-deps ocpp websockets
	touch $@

# Integration tests start their own Mosquitto; install it from Debian when missing.
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  echo "installing mosquitto (apt)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q mosquitto; }

# tests/test_brokers.py runs the integration tests against RabbitMQ (MQTT plugin) and NATS
# (MQTT mode, JetStream) too, each a private instance; install them from Debian when missing.
# The packages' own services are not needed by the tests (they use other ports).
brokers: mosquitto
	@missing=$$(for b in rabbitmq-server:/usr/lib/rabbitmq/bin/rabbitmq-server \
	  nats-server:/usr/sbin/nats-server; do test -x $${b#*:} || echo $${b%%:*}; done); \
	if [ -n "$$missing" ]; then echo "installing $$missing (apt)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	  $(SUDO) apt-get install -y -q $$missing; fi

# tests/test_packaging.py formats the man pages with groff and man; install them when missing.
man-tools:
	@{ command -v groff && command -v man; } >/dev/null || { \
	  echo "installing groff-base and man-db (apt)"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q groff-base man-db; }

# The development config plus a buffer directory inside the checkout (.run/).
run: venv
	mkdir -p .run
	{ cat etc/ocpp-edge.dev.conf; echo "buffer.dir = $(CURDIR)/.run/buffer"; \
	  echo "admin.socket = $(CURDIR)/.run/admin.sock"; } > .run/dev.conf
	$(VENV)/bin/ocpp-edge --config .run/dev.conf

test: venv mosquitto brokers man-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-bookworm: $(BOOKWORM_VENV)/.installed mosquitto brokers man-tools
	$(BOOKWORM_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Every figure: one bench/run.py per interpreter, floor + ocpp-edge + reference bridge in
# each; the drain phase runs bench/buffer_bench.py phase 3 for that interpreter.
bench: venv debian-venv mosquitto
	mkdir -p $(BENCH_OUT)
	$(DEBIAN_VENV)/bin/python bench/run.py --python $(DEBIAN_VENV)/bin/python \
	  --phases $(BENCH_PHASES) --json $(BENCH_OUT)/debian.json $(BENCH_ARGS)
	$(VENV)/bin/python bench/run.py --python $(VENV)/bin/python \
	  --phases $(BENCH_PHASES) --json $(BENCH_OUT)/venv.json $(BENCH_ARGS)

bench-quick: venv mosquitto
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

bench-drain: venv debian-venv mosquitto
	mkdir -p $(BENCH_OUT)
	$(VENV)/bin/python bench/buffer_bench.py --phases 3 --windows 200 --backlog-other 0 \
	  --pythons $(DEBIAN_VENV)/bin/python,$(VENV)/bin/python --json $(BENCH_OUT)/drain.json

bench-offline: venv mosquitto
	mkdir -p $(BENCH_OUT)
	$(VENV)/bin/python bench/offline_bench.py --json $(BENCH_OUT)/offline.json $(OFFLINE_ARGS)

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
