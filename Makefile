# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install everything on first use; later runs only re-install when
# pyproject.toml or this Makefile changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Versions that were measured to work together on these machines (see README "Install").
# torch and torchvision must be in the same pip call as everything else, or pip drifts to other builds.
PINS := torch==2.14.1 torchvision==0.29.1 "mlflow==3.17.*" "ray[default,data,train]==2.60.*" \
        "open_clip_torch==3.3.*" "label-studio-sdk==2.1.*" "faiss-cpu==1.15.*" "pyarrow>=20,<26"

PYTEST_ARGS ?=

.PHONY: demo test install lint format clean services-up services-down

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(PINS) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/bayescurate demo

test: $(STAMP)
	$(BIN)/ruff check pipeline jobs connectors tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs connectors tests

format: $(STAMP)
	$(BIN)/ruff format pipeline jobs connectors tests
	$(BIN)/ruff check --fix pipeline jobs connectors tests

services-up: $(STAMP)
	$(BIN)/bayescurate services up

services-down: $(STAMP)
	$(BIN)/bayescurate services down

clean:
	-$(BIN)/bayescurate services down
	rm -rf .state out .pytest_cache .ruff_cache
