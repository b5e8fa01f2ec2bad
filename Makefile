# The README's two commands are `make demo` and `make test`; each does its own set-up.
PY := .venv/bin/python

.PHONY: setup demo demo-single lint test test-unit test-bpf test-netns bench-xdp

setup:
	@bash .ci/setup

demo: setup
	$(PY) -m examples.demo

demo-single: setup
	$(PY) -m examples.demo_single

# mypy --strict and ruff, with their files and rules in pyproject.toml. Both run and report; any
# finding fails the target, so `make test` stops before pytest.
lint: setup
	@status=0; \
	echo "$(PY) -m mypy"; $(PY) -m mypy || status=1; \
	echo "$(PY) -m ruff check"; $(PY) -m ruff check || status=1; \
	exit $$status

test: setup lint
	$(PY) -m pytest

test-unit: setup
	$(PY) -m pytest -m unit

test-bpf: setup
	$(PY) -m pytest -m bpf

test-netns: setup
	$(PY) -m pytest -m netns

bench-xdp: setup
	$(PY) bench/xdp.py

.PHONY: bench-health
bench-health: setup
	$(PY) bench/health.py

.PHONY: bench-sync
bench-sync: setup
	$(PY) bench/sync.py

# Rewrite the golden normalised configs (tests/data/config/good/*.json); review the diff, then commit.
.PHONY: golden
golden: setup
	$(PY) -m tests.golden_config

.PHONY: faults
faults: setup
	$(PY) -m examples.lab.faults

.PHONY: bench-scale
bench-scale: setup
	$(PY) bench/scale.py

# Load-aware weights in the namespace lab: static, load-aware, least connections (examples/lab/loadlab.py).
.PHONY: demo-load bench-load
demo-load: setup
	$(PY) -m examples.demo_load

bench-load: setup
	$(PY) bench/load.py

.PHONY: bench-pps
bench-pps: setup
	$(PY) bench/pps.py

.PHONY: bench-http
bench-http: setup
	$(PY) bench/http_paths.py
