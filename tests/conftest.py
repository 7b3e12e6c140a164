pytest_plugins = ["tests.support.fixtures_langfuse"]
