# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch is installed first so that nothing pulls a multi-GB CUDA build on a CPU-only
# machine. On a GPU workstation run `make demo TORCH_SPEC=` to keep the torch you already have.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: venv install demo test bench stack stack-down lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(if $(TORCH_SPEC),$(PIP) install "$(TORCH_SPEC)")
	$(PIP) install -e ".[$*]"
	touch $@

venv: $(VENV)/.installed-dev

demo: $(VENV)/.installed-notebooks
	$(BIN)/dgdn-monitor demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python -m benchmarks.run

stack:
	docker compose -f deploy/docker-compose.yml up -d

stack-down:
	docker compose -f deploy/docker-compose.yml down

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
