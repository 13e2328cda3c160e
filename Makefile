# The README's two commands: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench-deps clean vendor

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch lies on this disk; install it first so no CUDA build is pulled.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/greentrainer serve

test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)  # browser tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q --durations=20  # the slowest tests, in every CI log

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# What the benchmarks need beyond `make install` (the bench extra, Debian's wordnet-base); they also install it
# on first use.
bench-deps: $(STAMP)
	$(BIN)/python bench/needs.py

# The dashboard's charting library, from npm at its locked version, into api/static/vendor/ (committed, so that
# `make run` needs no npm); run after changing dashboard/package.json.
vendor:
	cd dashboard && npm ci --no-audit --no-fund
	cp dashboard/node_modules/chart.js/dist/chart.umd.js api/static/vendor/chart.umd.js
	cp dashboard/node_modules/chart.js/LICENSE.md api/static/vendor/chart.js.LICENSE.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
