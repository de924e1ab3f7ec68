"""rqat-deploy: train, export and benchmark ultra-low-bit (2/3-bit) reasoning LLMs.

Importing this package is cheap: torch and transformers are imported by the submodules that need
them, so ``rqat-deploy --help`` stays instant.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
