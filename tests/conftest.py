pytest_plugins = ["tests.support.fixtures_langfuse", "tests.support.fixtures_mlflow"]
