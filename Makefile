# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first, as TORCH_SPEC says; which build that is depends on the package index (PyPI serves
# CUDA builds on Linux). "Which torch" in docs/getting-started.md shows how to pick the CPU or a CUDA build;
# TORCH_SPEC= keeps yours.
TORCH_SPEC ?= torch==2.13.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check

.PHONY: venv install demo test bench stack stack-down lint docs clean

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

# The monitoring stack. Docker Desktop: make stack STACK_FILES="deploy/docker-compose.yml deploy/docker-compose.docker-desktop.yml"
STACK_FILES ?= deploy/docker-compose.yml
STACK_COMPOSE = docker compose $(addprefix -f ,$(STACK_FILES))
STACK_CHECK = command -v docker >/dev/null 2>&1 || { echo "make stack: Docker is not installed (needs Docker with the Compose v2 plugin, 'docker compose')" >&2; exit 1; }; \
	docker compose version >/dev/null 2>&1 || { echo "make stack: the Docker Compose v2 plugin is missing ('docker compose version' fails; docker-compose v1 is not enough): install docker-compose-plugin" >&2; exit 1; }

# DGDN_TRAINING_HOST: this machine's name, which discovery files list by default, resolves inside the Prometheus
# container too (deploy/docker-compose.yml maps it to the Docker host).
stack:
	@$(STACK_CHECK)
	DGDN_TRAINING_HOST=$${DGDN_TRAINING_HOST:-$$(hostname)} $(STACK_COMPOSE) up -d

stack-down:
	@$(STACK_CHECK)
	$(STACK_COMPOSE) down

# A local CA and certificates in deploy/secure/certs for the secured stack (deploy/docker-compose.secure.yml).
.PHONY: certs
certs:
	scripts/make-certs.sh deploy/secure/certs

# Jupyter Lab on the notebooks (installed by the notebooks extra, like `make demo`).
.PHONY: notebooks notebooks-execute
notebooks: $(VENV)/.installed-notebooks
	$(BIN)/jupyter lab notebooks/

# Re-runs every notebook in place and stores its outputs (text and PNG plots) in the file.
notebooks-execute: $(VENV)/.installed-notebooks
	$(BIN)/python scripts/execute_notebooks.py

# Prometheus, Alertmanager and Pushgateway without Docker: binaries from PATH, the shipped configs, data in
# .stack/. Runs until Ctrl-C; `make stack-native-down` stops it from another terminal.
.PHONY: stack-native stack-native-down
stack-native: $(VENV)/.installed-notebooks
	$(BIN)/python scripts/native_stack.py up

stack-native-down:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/native_stack.py down

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format --check dgdn_lightning_monitor/
	$(BIN)/ruff check dgdn_lightning_monitor/
	$(BIN)/mypy

# The documentation site (Sphinx, MyST, furo) in docs/_build/html; a warning, broken link or reference fails it.
docs: $(VENV)/.installed-docs
	$(BIN)/sphinx-build -E -W --keep-going -n -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache lightning_logs
