# Two commands for a new user: `make demo` (the main job) and `make test`.
# Both create or reuse the virtual environment in .venv and install alignkd
# into it; torch is pinned through constraints.txt to the local CPU wheel.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test test-fast demo docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# The style check first (ruff, configured in pyproject.toml: lint and format), then the suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest tests

# Everything but the tests marked slow (subprocesses, multi-process launches, the ~20 s end-to-end
# runs): 1-1.5 minutes on two busy cores.
test-fast: lint
	$(BIN)/python -m pytest tests -m "not slow"

demo: $(STAMP)
	$(BIN)/alignkd demo $(if $(DEMO_STEPS),--steps $(DEMO_STEPS),)

# The documentation (docs/, mkdocs.yml), served at http://127.0.0.1:8000 and rebuilt on every save.
docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
