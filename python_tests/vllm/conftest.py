import os
import sys

# harness / checkpoints / engine_runs are imported by name (python_tests/vllm has no __init__.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest


def pytest_collection_modifyitems(config, items):
    """With pytest-xdist (``-n 2 --dist loadgroup``, as scripts/vllm_env.sh runs them), the tests that
    share engine runs stay in one worker: a family's variants (its module-scoped runs and its
    unpatched engine) together, every other module whole."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "runs" in params:
            group = "family-" + str(params["runs"]).split("-")[0]
        else:
            group = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that run in one pytest-xdist worker")
