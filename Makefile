PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= .data

.PHONY: install sandbox-tools run test soak bench rebuild-projection clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), \"taskmode needs Python 3.11+\"" || exit 1
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Function instances run in bubblewrap sandboxes, with slirp4netns for their internet access
# (README.md, Security). Debian packages; installed when missing and apt-get is at hand.
sandbox-tools:
	@command -v bwrap >/dev/null && command -v slirp4netns >/dev/null && command -v prlimit >/dev/null \
	  || { command -v apt-get >/dev/null \
	       && { apt-get install -y -q bubblewrap slirp4netns util-linux >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap slirp4netns util-linux >/dev/null; }; } \
	       || echo "WARNING: install bubblewrap and slirp4netns (function sandboxes), or run with TASKMODE_SANDBOX=false"; }

install: $(STAMP) sandbox-tools

run: install
	$(PY) deploy/run.py

test: install
	$(PY) -m mypy shared services
	$(PY) -m pytest -q

# The soak test for longer: submissions at a steady rate while every process is killed in turn.
soak: install
	TASKMODE_SOAK_S=$${TASKMODE_SOAK_S:-900} $(PY) -m pytest -q -p no:cacheprovider tests/test_soak.py

bench: install
	$(PY) -m bench.store_bench
	$(PY) -m bench.full_stack
	$(PY) -m bench.cpu_per_task
	$(PY) -m bench.stream_size

# Under `make run` the bus asks for credentials: the projection's are in the data directory.
rebuild-projection: install
	NATS_USER=$${NATS_USER:-projection} \
	NATS_PASSWORD_FILE=$${NATS_PASSWORD_FILE:-$(DATA)/secrets/nats-projection.password} \
	$(PY) -m services.projection rebuild

clean:
	rm -rf $(VENV) $(DATA)
