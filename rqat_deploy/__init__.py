"""rqat-deploy: train, export and benchmark ultra-low-bit (2/3-bit) reasoning LLMs.

Importing this package is cheap: torch and transformers are imported by the submodules that need
them, so ``rqat-deploy --help`` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

__version__ = "0.1.0"

__all__ = ["__version__"]


def _unshadow_kernels() -> None:
    """Keep a source checkout's ``kernels/`` folder from posing as Hugging Face's ``kernels`` package.

    The repository's ``kernels/`` installs as ``rqat_deploy.kernels`` (DESIGN.md 2). When the
    checkout's root is on ``sys.path`` (``python -m ...`` or ``torchrun -m ...`` started there puts the
    working directory first), transformers' ``import kernels`` would find our folder and fail
    (``cannot import name 'CUDAProperties' from 'kernels'``). Those entries are dropped here, before
    anything imports transformers; an installed wheel has no such folder and nothing happens.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / "kernels" / "__init__.py").is_file() or not (root / "pyproject.toml").is_file():
        return
    keep = [p for p in sys.path if Path(p or ".").resolve() != root]
    if len(keep) != len(sys.path):
        sys.path[:] = keep
        ours = sys.modules.get("kernels")
        if ours is not None and Path(getattr(ours, "__file__", "") or "").resolve().parent == root / "kernels":
            del sys.modules["kernels"]


_unshadow_kernels()
