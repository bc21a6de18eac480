# `make test` and `make demo` each create .venv themselves on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo benchmark report clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Without an NVIDIA GPU, take the local CPU wheel first: a bare torch requirement pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e '.[dev,experiments]'
	touch $@

setup: $(BIN)/.installed

test: setup
	$(BIN)/ruff check gradmon experiments tests
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m experiments.demo

report: setup
	$(BIN)/gradmon report runs

benchmark: setup
	$(BIN)/python -m experiments.benchmark

clean:
	rm -rf $(VENV) runs lightning_logs
