# Everything a fresh clone needs: `make demo` and `make test` create their own virtualenvs.
PYTHON ?= python3
VENV := .venv
DEMO_VENV := .venv-demo
NODE_MODULES := examples/js/node_modules/.package-lock.json

.PHONY: test demo lint bench clean

$(VENV)/.installed: pyproject.toml tests/requirements-adk.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	# Google ADK without its opentelemetry pin (it conflicts with langfuse 5; see the file).
	$(VENV)/bin/python -m pip install --quiet --no-deps -r tests/requirements-adk.txt
	touch $@

# The official AG-UI TypeScript client, pinned by examples/js/package-lock.json (tests/test_js_client.py).
$(NODE_MODULES): examples/js/package.json examples/js/package-lock.json
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	cd examples/js && npm ci --no-audit --no-fund --loglevel=error

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install --quiet -e '.[demo]'
	touch $@

## Run the test suite (real MLflow server, Langfuse SDK against a loopback receiver, uvicorn,
## pydantic-ai / LangGraph / ADK as producers, @ag-ui/client in Node as the client).
test: $(VENV)/.installed $(NODE_MODULES)
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
	rm -rf $(VENV) $(DEMO_VENV) examples/js/node_modules ambient-demo .pytest_cache .mypy_cache .ruff_cache
