# pgolf — one Makefile verb per user action; each prints what it is about to do.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
VPY := $(VENV)/bin/python
PGOLF := $(VENV)/bin/pgolf
TORCH_CPU := torch==2.13.0

.PHONY: help venv test test-fast

help:
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

$(VENV)/.installed: pyproject.toml
	@echo ">> creating $(VENV) and installing pgolf with test extras (CPU torch)"
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_CPU)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed  ## create .venv with pgolf and its test extras

test: venv  ## run the test suite (installs everything first)
	@echo ">> running pytest"
	$(VPY) -m pytest -q

test-fast: venv  ## tests without the slow ones
	$(VPY) -m pytest -q -m 'not slow'

# Each area keeps its verbs in mk/<area>.mk (data, store/results, launch, bench, ...).
-include $(sort $(wildcard mk/*.mk))
