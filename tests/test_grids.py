"""The grid registry: every registered grid keeps the same contract (a new grid gets these tests).

- its initialisation, checkpoint tensors and dequantization agree with the training forward, in
  both training forms, bit for bit;
- its checkpoint tensors are validated (names, dtypes, shapes, integer ranges);
- the export types it declares exist;
- no code outside the registry and the CLI choices compares grid names.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from rqat_deploy.errors import CheckpointError, ConfigError
from rqat_deploy.quant.grids import grid_bits, grid_for, grid_names
from rqat_deploy.quant.qlinear import QuantLinear
from rqat_deploy.quant.spec import QuantSpec

ROOT = Path(__file__).resolve().parent.parent
GRIDS = [(name, bits) for name in grid_names() for bits in grid_bits(name)]


@pytest.fixture(params=GRIDS, ids=[f"{n}-{b}bit" for n, b in GRIDS])
def spec(request: pytest.FixtureRequest) -> QuantSpec:
    name, bits = request.param
    return QuantSpec(bits=bits, grid=name, group_size=64)


def _weight(spec: QuantSpec, out: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(spec.bits)
    return torch.randn(out, 2 * math.lcm(spec.block_size, 256), generator=g) * 0.05


def test_checkpoint_tensors_decode_to_the_forward_weight(spec: QuantSpec) -> None:
    w = _weight(spec)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w
    q1 = QuantLinear.from_linear(lin, spec)  # stage-1 form: latent weight, RTN / search init
    t = q1.checkpoint_tensors()
    grid = spec.grid_def
    grid.check_tensors("m", t)
    assert list(t) == list(grid.layout(*w.shape)) and list(t) == list(grid.tensor_names())
    assert torch.equal(grid.dequantize(t), q1.dequantized_weight())
    q2 = QuantLinear.from_checkpoint(t, None, spec)  # stage-2 form: frozen codes
    assert torch.equal(q2.dequantized_weight(), q1.dequantized_weight())
    assert all(torch.equal(a, b) for a, b in zip(q2.checkpoint_tensors().values(), t.values()))
    q1.freeze_codes()
    trainable = {n for n, p in q1.quantizer.named_parameters() if p.requires_grad}
    assert trainable == set(q1.quantizer.stage2_trainable)


def test_check_tensors_names_what_is_wrong(spec: QuantSpec) -> None:
    grid = spec.grid_def
    w = _weight(spec)
    t = grid.init(w).checkpoint_tensors(torch.zeros(w.shape, dtype=torch.uint8))
    name, bad = next((n, v) for n, v in t.items() if n != "qcodes")
    with pytest.raises(CheckpointError, match=name):
        grid.check_tensors("m", {k: v for k, v in t.items() if k != name})
    with pytest.raises(CheckpointError, match=rf"m\.{name} is torch.float64"):
        grid.check_tensors("m", {**t, name: bad.double()})
    with pytest.raises(CheckpointError, match=r"m\.qcodes holds values .* outside 0\.\."):
        grid.check_tensors("m", {**t, "qcodes": torch.full_like(t["qcodes"], grid.qmax + 1)})


def test_derived_facts(spec: QuantSpec) -> None:
    grid = spec.grid_def
    assert grid.qmax == 2**grid.bits - 1 and grid.block_size % grid.gs == 0
    assert grid.bits < grid.bits_per_weight() < grid.bits + 1
    assert QuantSpec(bits=spec.bits, grid=spec.grid, group_size=grid.group_size).grid_def == grid
    if grid.gguf_type is not None:  # the exporter can write the grid's native type
        from rqat_deploy.exporters.gguf_quants import NATIVE_PACKERS

        assert grid.gguf_type in NATIVE_PACKERS


def test_bits_per_weight_of_the_known_grids() -> None:
    assert grid_for("uniform", 2, 128).bits_per_weight() == 2 + (16 + 2) / 128
    assert grid_for("kquant", 2).bits_per_weight() == 2.625  # Q2_K: 84 bytes per 256 weights
    assert grid_for("kquant", 3).bits_per_weight() == 3.4375  # Q3_K: 110 bytes per 256 weights


def test_kquant_block_matches_gguf() -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from rqat_deploy.quant.grids.kquant import QK_K

    assert QK_K == GGML_QUANT_SIZES[GGMLQuantizationType.Q2_K][0]


def test_unknown_grid_and_bits() -> None:
    with pytest.raises(ConfigError, match="did you mean 'kquant'"):
        grid_for("kqant", 2)
    with pytest.raises(ConfigError, match="use --grid uniform for 4 bits"):
        grid_for("kquant", 4)


def test_cli_choices_are_the_registry() -> None:
    from rqat_deploy.cli.commands import train

    choice = next(p for p in train.params if p.name == "grid").type
    assert tuple(choice.choices) == grid_names()


def test_no_grid_name_comparisons_outside_the_registry() -> None:
    """Grid names appear only in the registry (quant/grids/), the CLI choices and defaults."""
    names = "|".join(map(re.escape, grid_names()))
    pattern = re.compile(rf"""(\bgrid\s*(==|!=)|['"]({names})['"]\s*(==|!=|\bin\b)|(==|!=)\s*['"]({names})['"])""")
    offenders = []
    for folder in ("rqat_deploy", "serve", "exporters", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if "quant/grids" in path.as_posix():
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
