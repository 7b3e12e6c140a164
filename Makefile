# Everything a fresh clone needs: `make demo` and `make test` create their own virtualenvs.
PYTHON ?= python3
VENV := .venv
DEMO_VENV := .venv-demo
PHOENIX_VENV := .venv-phoenix
NODE_MODULES := examples/js/node_modules/.package-lock.json examples/copilotkit/node_modules/.package-lock.json

.PHONY: test demo demo-web chromium phoenix lint bench clean

$(VENV)/.installed: pyproject.toml tests/requirements-producers.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	# Google ADK and AWS Strands without their opentelemetry pins (they conflict with langfuse 5; see the file).
	$(VENV)/bin/python -m pip install --quiet --no-deps -r tests/requirements-producers.txt
	touch $@

# Node examples, pinned by their package-lock.json: examples/js (@ag-ui/client, tests/test_js_client.py)
# and examples/copilotkit (@copilotkit/runtime, ~300 MB, ~35 s; tests/test_copilotkit.py).
examples/%/node_modules/.package-lock.json: examples/%/package.json examples/%/package-lock.json
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	cd examples/$* && npm ci --no-audit --no-fund --loglevel=error

# Debian's chromium and its chromedriver: tests/test_demo_web.py drives the web demo in a headless browser.
chromium:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)

# Arize Phoenix in its own venv (tests/test_otel_backend.py runs `phoenix serve` from it; see the file).
$(PHOENIX_VENV)/.installed: tests/requirements-phoenix.txt
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PHOENIX_VENV)/bin/python -m pip install --quiet -r tests/requirements-phoenix.txt
	touch $@

phoenix: $(PHOENIX_VENV)/.installed

$(DEMO_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install --quiet -e '.[demo]'
	touch $@

## Run the test suite (real MLflow server, Langfuse SDK against a loopback receiver, uvicorn,
## Arize Phoenix for the otel backend, pydantic-ai / LangGraph / ADK / Strands as producers, @ag-ui/client and CopilotKit in Node as clients).
# Two workers (pytest-xdist): the suite mostly waits on servers; each worker starts its own session
# fixtures (mlflow server, receivers). A bare `pytest` runs in one process.
test: $(VENV)/.installed $(PHOENIX_VENV)/.installed $(NODE_MODULES) chromium
	$(VENV)/bin/python -m pytest -n 2

## Trace a scripted AG-UI agent to ./ambient-demo/mlflow.db and print what was recorded.
demo: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/ambient-tracing demo

## The same agent in a browser page on http://127.0.0.1:8765: chat, rate an answer, watch the rating land
## on its trace. DEMO_ARGS='--mlflow-ui http://127.0.0.1:5000' links each trace to a running MLflow UI.
demo-web: $(DEMO_VENV)/.installed
	$(DEMO_VENV)/bin/ambient-tracing demo --web $(DEMO_ARGS)

## Benchmarks of issue #4 (in-process, loopback, concurrency, memory, blackholed backends); BENCH_ARGS=--quick
bench: $(VENV)/.installed
	$(VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	$(VENV)/bin/python -m benchmarks.run $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src
	$(VENV)/bin/mypy
	# The layers (doors > wiring > tracer > spans, feedback, session metrics > backends) and no cycles.
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) $(DEMO_VENV) $(PHOENIX_VENV) examples/*/node_modules ambient-demo .pytest_cache .mypy_cache .ruff_cache
