# quietscope: `make demo` and `make test` work on a fresh machine with only Python 3.11.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel of torch 2.13.0 (local on the project's machines; GPU users: see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo lint test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Install torch first when none is present, so the project's range `torch>=2.2,<3` is already
# satisfied and pip does not pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,cluster,s3-test]"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/quietscope demo --output demo_output --overwrite

# The layering (import-linter contracts in pyproject.toml) and style (ruff) are checked first:
# an upward import or a lint error fails the build before any test runs.
lint: venv
	$(BIN)/lint-imports
	$(BIN)/ruff check src cli tests benchmarks

# Two pytest workers (one per core on the 2-core CI machine), a test file per worker so each
# module's fixtures (the S3 server, trained models) are built once.
test: venv lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

bench: venv
	$(BIN)/python -m benchmarks.throughput

clean:
	rm -rf $(VENV) demo_output .pytest_cache
