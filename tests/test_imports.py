"""Packaging invariants (DESIGN.md 2)."""

from __future__ import annotations

import subprocess
import sys


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


def test_top_level_kernels_is_not_ours() -> None:
    out = _run("import importlib.util as u; s = u.find_spec('kernels'); print(s is None or 'rqat' not in (s.origin or ''))")
    assert out.strip() == "True"
