import os
import sys

# harness / checkpoints / engine_runs are imported by name (python_tests/vllm has no __init__.py).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
