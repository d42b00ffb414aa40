# Development tasks. Each installs the system packages it needs first (scripts/system-deps:
# through apt-get on Debian/Ubuntu, with sudo unless root); only python3 and make must exist.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: venv demo lint test bench clean distclean demo-deps test-deps

# Each task's system packages (see scripts/system-deps for the names); every install of the
# package builds its JupyterLab extension, hence node.
VENV_NEEDS := python3 node
DEMO_NEEDS := sshd
TEST_NEEDS := sshd chromium

demo-deps:
	bash scripts/system-deps $(DEMO_NEEDS)

test-deps:
	bash scripts/system-deps $(TEST_NEEDS)

# The markers are rebuilt when pyproject.toml changes (new dependency, entry point, extra).
# An existing virtual environment is reused, never recreated over. The demo installs only
# what it runs (extra "demo"), the rest of the tasks the test tools too (extra "test").
$(VENV)/.installed: pyproject.toml
	bash scripts/system-deps $(VENV_NEEDS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

$(VENV)/.demo-installed: pyproject.toml
	bash scripts/system-deps $(VENV_NEEDS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[demo]'
	touch $@

venv: $(VENV)/.installed

demo: demo-deps $(VENV)/.demo-installed
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: test-deps lint
	$(BIN)/python -m pytest

# Local python3 kernel vs flexai-a100 on a private emulator; writes bench/results.json.
# e.g. make bench BENCH_ARGS=--quick, or BENCH_ARGS=--openssh (see bench/README.md).
bench: $(VENV)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf .demo .pytest_cache .ruff_cache build dist test-artifacts \
		lib tsconfig.tsbuildinfo flexai_provisioner/labextension
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
		\( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) node_modules .yarn
