import importlib.util

import pytest
import torch

import divprune_ext

# python_tests/vllm runs in its own environment (scripts/vllm_env.sh); without vLLM it is not collected.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm"]

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
