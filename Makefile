PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: install run test bench rebuild-projection clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), \"taskmode needs Python 3.11+\"" || exit 1
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The Celery + Redis reference (bench/compare.py) needs the bench extra.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(PY) deploy/run.py

test: $(STAMP)
	$(PY) -m mypy shared services
	$(PY) -m pytest -q

# The benches also need a redis-server: Debian's, installed on first use (a fresh machine may need apt-get update).
bench: $(BENCH_STAMP)
	command -v redis-server >/dev/null || apt-get install -y redis-server || \
		(apt-get update && apt-get install -y redis-server)
	$(PY) -m bench.store_bench
	$(PY) -m bench.full_stack
	$(PY) -m bench.cpu_per_task
	$(PY) -m bench.compare

rebuild-projection: $(STAMP)
	$(PY) -m services.projection rebuild

clean:
	rm -rf $(VENV) .data
