PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test chromium bench rebuild-projection clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), \"taskmode needs Python 3.11+\"" || exit 1
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) deploy/run.py

test: $(STAMP) chromium
	$(PY) -m mypy shared
	$(PY) -m pytest -q

# The console's browser tests drive Debian's chromium (never a browser Playwright downloads).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "chromium could not be installed: the browser tests will be skipped"

bench: $(STAMP)
	$(PY) -m bench.store_bench
	$(PY) -m bench.full_stack
	$(PY) -m bench.cpu_per_task

rebuild-projection: $(STAMP)
	$(PY) -m services.projection rebuild

clean:
	rm -rf $(VENV) .data
