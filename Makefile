# Development tasks. `make test` needs only python3 (3.10+) with venv support and sshd;
# `.ci/run` installs those on Debian/Ubuntu first.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: venv demo lint test bench clean distclean

# The marker is rebuilt when pyproject.toml changes (new dependency, entry point, extra).
# An existing virtual environment is reused, never recreated over.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" bash examples/demo.sh

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

# Local python3 kernel vs flexai-a100 on a private emulator; writes bench/results.json.
# e.g. make bench BENCH_ARGS=--quick, or BENCH_ARGS=--openssh (see bench/README.md).
bench: $(VENV)/.installed
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf .demo .pytest_cache .ruff_cache build dist test-artifacts
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o \
		\( -name __pycache__ -o -name '*.egg-info' \) -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
