# Two entry points (see README): `make demo` runs the T-IMM pipeline on the built-in demo data,
# `make test` runs the test suite (`make test-fast` leaves out the subprocess end-to-end runs,
# `make test-all` adds the slow crash matrix, `make reliability`
# records it in docs/reliability.md). Both create the virtual environment on first use.
# `make benchmark` runs the pre-registered benchmark (pilot, then grid; hours of CPU; resumable) and
# writes $(BENCH)/report.md.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= demo_out
# test workers (pytest-xdist): one per core, at most 4; each test module runs whole on one worker so
# that its fixtures (small trained runs) are built once
JOBS   ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST   = -n $(JOBS) --dist loadfile

.PHONY: demo test test-fast test-all reliability env bench clean benchmark

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $@

test: env
	$(PY) -m pytest -q $(XDIST) tests

# the loop to run while working: unit and in-process tests, no script run in a subprocess
test-fast: env
	$(PY) -m pytest -q $(XDIST) -m "not slow and not e2e" tests

# everything, the slow crash-consistency matrix included (pyproject's addopts deselect `slow`)
test-all: env
	$(PY) -m pytest -q $(XDIST) -m "" tests

# run the reliability tests and regenerate docs/reliability.md from what they recorded
reliability: env
	rm -f docs/reliability/harness_results.json
	TIMM_JAX_RELIABILITY_RESULTS=docs/reliability/harness_results.json \
	  $(PY) -m pytest -q -m "" tests/test_crash_matrix.py tests/test_reliability.py \
	  -k "not committed_reliability_doc"
	$(PY) docs/reliability/render.py

demo: env
	$(PY) -m timm_jax.experiments.demo --out=$(OUT)

# the benchmark of docs/benchmark/preregistration.json: the pilot (gates), then the grid (hours of CPU;
# resumable), then the report in $(BENCH)/report.md
BENCH  ?= benchmark_out
benchmark: env
	$(PY) -m timm_jax.experiments.benchmark --out=$(BENCH) --stage=pilot
	$(PY) -m timm_jax.experiments.benchmark --out=$(BENCH) --stage=grid

bench: env
	$(PY) benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) $(OUT) .cache/jax-tests
