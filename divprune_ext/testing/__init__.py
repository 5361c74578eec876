"""Tools for testing and benchmarking divprune_ext with real model code, as ``numpy.testing`` and
``torch.testing`` are for theirs: nothing here is needed to prune.

- :mod:`divprune_ext.testing.checkpoints`: tiny random vision-language checkpoints with working
  processors, saved to a folder that transformers' ``from_pretrained`` and vLLM load
  (``build(kind, directory)`` for each of ``KINDS``), the pieces to build other shapes, and
  seeded test images (``pixels``).

Importing this package imports neither transformers nor vLLM; the builders import transformers
(``pip install "divprune_ext[hf]"``) when they run.
"""
from . import checkpoints
from .checkpoints import KINDS, build, pixels

__all__ = ["checkpoints", "KINDS", "build", "pixels"]
