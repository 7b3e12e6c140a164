import os
import tempfile

# Undelivered ratings are spooled under $XDG_STATE_HOME by default: keep the tests' out of $HOME.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="ambient-tracing-tests-")

pytest_plugins = [
    "tests.support.fixtures_langfuse",
    "tests.support.fixtures_mlflow",
    "tests.support.fixtures_phoenix",
]
