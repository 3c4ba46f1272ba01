# make install | make test | make demo: each creates and reuses .venv by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo flakes bench bench-scale clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Lint and format (ruff), the layers and the stages' independence (import-linter, contracts in
# pyproject.toml), then the tests.
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -rs --durations=20

demo: install
	$(PY) -m pipelines demo

# The fault and cluster tests (marked `fault`) N times over, and each test's failures out of N,
# so a test that fails by chance shows before CI, which never retries one. (~25 min a round on
# 2 cores.) Another selection: make flakes N=10 FLAKY='tests/test_multinode_s3.py -k rotation'
N ?= 3
FLAKY ?= -m fault
flakes: install
	$(PY) -m tests.flakes --rounds $(N) -- $(FLAKY)

# The CPU benchmarks against their baselines (~45 min on 2 cores): tables + bench-results/*.json
# (the 'bench' extra adds LitData, one of the shard stage's peers)
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks

# index, shard and stats at N, 2N and 4N images of ImageNet's shape (1,000 classes), plus the
# epoch plan at ImageNet's full size (~12 min on 2 cores): a table + bench-results/scale.json
bench-scale: install
	$(PY) -m benchmarks.scale

clean:
	rm -rf demo .pytest_cache bench-results flakes

# make up | make down: a local S3 (SeaweedFS) + MLflow server + Ray head on 127.0.0.1, state in .stack/
.PHONY: up down

up: install
	bash infra/local/up.sh

down:
	bash infra/local/down.sh
