import importlib.util

import pytest
import torch

import divprune_ext


def _has_vllm() -> bool:
    # Without vLLM installed, python_tests/vllm itself (a folder on sys.path's python_tests entry)
    # would be found as a namespace package named vllm: it has no origin.
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin not in (None, "namespace")


# python_tests/vllm runs in its own environment (scripts/vllm_env.sh); without vLLM it is not collected.
collect_ignore = [] if _has_vllm() else ["vllm"]

HAS_CUDA = torch.cuda.is_available() and divprune_ext.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA build")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request):
    return request.param
