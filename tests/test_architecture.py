"""The house rules (docs/ARCHITECTURE.md), checked on the source: import floors and private names.

Floors, lowest first; a module may import its own package and the packages listed for it:

    base       rqat_deploy/{errors,files,shards,models,ggml_types}.py   nothing of ours
    kernels    Triton twins of the reference                      base
    quant      spec, grids, reference, QuantLinear, checkpoint    base, kernels (dispatch)
    data       SPECs, loaders, chat, thinking, grading            base
    builtin    synthetic tasks, tiny models, the teacher asset    base, data
    train      recipes, stage 1/2, GPTQ, losses, teacher          base, quant, data, builtin (defaults)
    exporters  checkpoint -> runtime formats                      base, quant
    serve      runtimes, bench, reports                           base, quant, data
    cli        commands                                           everything

One exception: ``builtin/tiny_reasoner.py`` is the build script of the shipped teacher and trains
it with the training stack's learning-rate schedule (``train.schedule``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "kernels": {"base"},
    "quant": {"base", "kernels"},
    "data": {"base"},
    "builtin": {"base", "data"},
    "train": {"base", "quant", "data", "builtin"},
    "exporters": {"base", "quant"},
    "serve": {"base", "quant", "data"},
    "cli": {"base", "kernels", "quant", "data", "builtin", "train", "exporters", "serve"},
}
EXCEPTIONS = {("rqat_deploy.builtin.tiny_reasoner", "rqat_deploy.train.schedule")}
SUBPACKAGES = ("quant", "data", "train", "builtin", "cli", "serve", "exporters", "kernels")


def _product_files() -> dict[str, Path]:
    """Dotted module name -> file, for every product module (side folders mapped into the namespace)."""
    out = {}
    for folder in ("rqat_deploy", "serve", "exporters", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[0] != "rqat_deploy":
                parts = ("rqat_deploy", *parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "base"


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(module, name)`` of every import of ours in ``path``, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rqat_deploy"):
            found += [(node.module or "", a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("rqat_deploy")]
    return found


def test_import_floors() -> None:
    files = _product_files()
    bad = []
    for module, path in files.items():
        here = _floor(module)
        for target, name in _imports(path):
            full = f"{target}.{name}" if f"{target}.{name}" in files else target
            there = _floor(full)
            if there != here and there not in ALLOWED[here] and (module, full) not in EXCEPTIONS:
                bad.append(f"{module} ({here}) imports {full} ({there})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules() -> None:
    files = _product_files()
    bad = [
        f"{module} imports {target}.{name}"
        for module, path in files.items()
        for target, name in _imports(path)
        if name.startswith("_") and not name.startswith("__") and target != module
    ]
    assert not bad, "\n".join(bad)


def test_side_folders_stay_flat() -> None:
    for folder in ("serve", "exporters", "kernels"):
        assert not [p for p in (ROOT / folder).iterdir() if p.is_dir() and p.name != "__pycache__"], folder
