"""Packaging invariants (DESIGN.md 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout


def test_side_folders_install_inside_the_namespace() -> None:
    out = _run(
        "import sys, rqat_deploy, rqat_deploy.kernels, rqat_deploy.exporters, rqat_deploy.serve;"
        "print('kernels' in sys.modules, 'serve' in sys.modules, 'exporters' in sys.modules)"
    )
    assert out.split() == ["False", "False", "False"]


def test_import_is_light() -> None:
    out = _run("import sys, rqat_deploy, rqat_deploy.cli; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert out.split() == ["False", "False"]


OUR_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def _kernels_origin(cwd: Path, code: str = "") -> str:
    """Where ``import kernels`` resolves after ``code``, in a Python started with ``cwd`` first on ``sys.path``."""
    probe = code + "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=cwd).stdout.strip()


def test_top_level_kernels_is_not_ours() -> None:
    """From anywhere, ``import rqat_deploy`` leaves top-level ``kernels`` to Hugging Face (or to nothing)."""
    for cwd in (Path("/"), OUR_KERNELS.parent):
        origin = _kernels_origin(cwd, "import rqat_deploy; ")
        assert origin == "None" or Path(origin).resolve().parent != OUR_KERNELS, (cwd, origin)


def test_checkout_root_would_shadow_without_the_guard() -> None:
    """The guard is needed: started in the checkout's root, plain Python finds our folder as ``kernels``."""
    origin = _kernels_origin(OUR_KERNELS.parent)
    assert Path(origin).resolve().parent == OUR_KERNELS
