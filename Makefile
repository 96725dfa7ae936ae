# Two entry points (see README): `make demo` runs the T-IMM pipeline on the built-in demo data,
# `make test` runs the test suite. Both create the virtual environment on first use.
# `make reproduce` runs the paper's experiment grid with 3 seeds (about 100 min on 2 cores;
# resumable) and writes $(REPRO)/report.md.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY      = $(VENV)/bin/python
OUT    ?= demo_out
REPRO  ?= reproduce_out
SEEDS  ?= 3

.PHONY: demo test env bench clean reproduce

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $@

test: env
	$(PY) -m pytest -q tests

demo: env
	$(PY) -m timm_jax.experiments.demo --out=$(OUT)

reproduce: env
	$(PY) -m timm_jax.experiments.reproduce --out=$(REPRO) --seeds=$(SEEDS)

bench: env
	$(PY) benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) $(OUT)
