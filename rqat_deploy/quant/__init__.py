"""Quantization core: the spec, the grid registry, the reference math, the quantized Linear, model
surgery, kernel dispatch and the checkpoint contract (DESIGN.md 3)."""
