# One command per task, the same locally and in CI.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := runc golang-github-containers-common etcd-server etcd-client docker-compose chromium chromium-driver \
	fonts-liberation skopeo umoci mmdebstrap docker-registry
PROTOS := $(wildcard proto/snapwake/v1/*.proto)

.PHONY: install proto proto-check lint test test-unit test-gpu run bench clean compose-up compose-down

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	bash scripts/install-system.sh $(APT_PACKAGES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build on local disk; a GPU machine brings its own torch.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

proto: $(STAMP)
	$(PY) -m snapwake.protogen

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy snapwake services modelserver
	# buf's STANDARD lint of the protos (buf ships on the npm registry).
	cd proto && npx --yes @bufbuild/buf@1.75.0 lint

# pytest exits 5 when it collected no test: that is a failure, not a pass.
test: $(STAMP)
	$(PY) -m snapwake.protogen --check
	$(VENV)/bin/ruff check .
	# Architecture contracts (pyproject.toml [tool.importlinter]): layering and the edge modules.
	$(VENV)/bin/lint-imports --no-cache
	# Unbuffered and one line per test file, so that a CI log cut off by its time limit shows where it stood; the
	# slowest tests are listed at the end.
	PYTHONUNBUFFERED=1 $(PY) -m pytest --timeout=600 --durations=25 $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest ran no test: failing"; exit 1; fi; exit $$rc

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

run: $(STAMP)
	$(PY) -m snapwake.devcluster $(RUN_ARGS)

bench: $(STAMP)
	$(PY) -m bench.coldstart

# The compose cluster (deploy/compose): docker.io installed and dockerd started if missing, the
# images built from Debian packages, two nodes and the demo model; prints the URL and API key.
compose-up: $(STAMP)
	bash deploy/compose/cluster.sh up

compose-down:
	bash deploy/compose/cluster.sh down

clean:
	rm -rf var/ .pytest_cache .ruff_cache .mypy_cache
