# Two commands on a fresh machine: `make run` (sample datastore + server) and `make test`.
# Each creates or refreshes .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install sample-data

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

sample-data: $(STAMP)
	$(PY) main.py sample-data

run: sample-data
	$(PY) main.py serve

test: $(STAMP)
	$(PY) -m pytest -q
