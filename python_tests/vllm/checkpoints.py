"""The tiny vLLM test checkpoints, imported by name by the vLLM tests (``checkpoints.build(kind,
directory)`` for each of ``checkpoints.KINDS``). They live in the package, in
:mod:`divprune_ext.testing.checkpoints`, which ``bench.serving`` and the docs test use too; the
installed copy is the one imported here (the vLLM tests run against the installed wheel)."""
from divprune_ext.testing.checkpoints import *  # noqa: F401,F403
from divprune_ext.testing.checkpoints import KINDS, build  # noqa: F401
