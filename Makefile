# Everything a fresh clone needs: `make demo` and `make test` create their own virtualenvs.
PYTHON ?= python3
VENV := .venv
DEMO_VENV := .venv-demo

.PHONY: test demo lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install --quiet -e '.[demo]'
	touch $@

## Run the test suite (real MLflow server, Langfuse SDK against a loopback receiver, uvicorn).
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

## Trace a scripted AG-UI agent to ./ambient-demo/mlflow.db and print what was recorded.
demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/ambient-tracing demo

## Benchmarks of issue #4 (in-process, loopback, concurrency, memory, blackholed backends); BENCH_ARGS=--quick
bench: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	$(VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(DEMO_VENV) ambient-demo .pytest_cache .mypy_cache .ruff_cache
