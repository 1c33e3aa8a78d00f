# Two commands on a fresh machine: `make run` (sample datastore + server) and `make test`.
# Each creates or refreshes .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install sample-data system-deps oidc-deps

#: Debian packages of the Orthanc/OHIF tests: Orthanc + its DICOMweb plugin, headless Chromium + its WebDriver.
SYSTEM_DEPS := orthanc orthanc-dicomweb chromium chromium-driver

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

# Installs only what is missing, and only as root with apt (CI); otherwise says what the tests will skip.
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "system packages present: $(SYSTEM_DEPS)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "missing Debian packages:$$missing -- the Orthanc/OHIF tests will skip (sudo apt-get install$$missing)"; fi

#: The OpenID provider the authentication tests start: npm package oidc-provider, pinned in tests/oidc/package-lock.json.
OIDC_DIR := tests/oidc
OIDC_STAMP := $(OIDC_DIR)/node_modules/.installed

$(OIDC_STAMP): $(OIDC_DIR)/package.json $(OIDC_DIR)/package-lock.json
	npm ci --prefix $(OIDC_DIR) --no-audit --no-fund
	touch $@

# Node.js + npm from Debian only if npm is missing (root with apt, as in CI); otherwise says what will skip.
oidc-deps:
	@if ! command -v npm >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm; \
	  else echo "npm missing -- the authentication tests will skip (sudo apt-get install nodejs npm)"; exit 0; fi; fi; \
	$(MAKE) --no-print-directory $(OIDC_STAMP)

test: $(STAMP) system-deps oidc-deps
	$(PY) -m pytest -q
