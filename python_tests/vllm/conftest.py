import os
import sys

# harness / checkpoints / engine_runs are imported by name (python_tests/vllm has no __init__.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest

# Each group's cost in engine start-ups, roughly: what DIVPRUNE_VLLM_SHARD balances.
COST = {"test_tensor_parallel": 3, "test_serve": 2, "test_bench_serving": 2, "test_memory": 1}


def group_of(item) -> str:
    """The tests that share engine runs: a family's variants (its module-scoped runs and its unpatched
    engine), every other module whole."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "runs" in params:
        return "family-" + str(params["runs"]).split("-")[0]
    return item.module.__name__


def pytest_collection_modifyitems(config, items):
    """``DIVPRUNE_VLLM_SHARD=i/n`` (scripts/vllm_env.sh runs n such pytest processes side by side):
    only the i-th of n shards, whole groups (:func:`group_of`) balanced by their cost."""
    shard = os.environ.get("DIVPRUNE_VLLM_SHARD")
    if not shard:
        return
    index, count = (int(v) for v in shard.split("/"))
    groups = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)

    def cost(name, members):
        if name.startswith("family-"):
            return 3 + any("replay" in str(i.callspec.params["runs"]) for i in members)
        return COST.get(name, 0.2)

    load, owner = [0.0] * count, {}
    for name, members in sorted(groups.items(), key=lambda g: (-cost(*g), g[0])):
        owner[name] = min(range(count), key=lambda s: (load[s], s))
        load[owner[name]] += cost(name, members)
    keep = [item for item in items if owner[group_of(item)] == index]
    config.hook.pytest_deselected(items=[item for item in items if owner[group_of(item)] != index])
    items[:] = keep
