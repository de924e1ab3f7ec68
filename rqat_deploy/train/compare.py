"""How far a quantized model sits from its teacher: mean next-token KL over token sequences.

Used to choose between candidate quantizations on held-out data (the flagship recipe keeps
plain GPTQ when block-wise training ended farther from the teacher end to end).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def model_kl(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """Mean ``KL(teacher || student)`` of the next-token distributions over every position of
    ``input_ids`` ``[N, L]``, full vocabulary, in float64.

    Args:
        teacher, student: causal LMs on the same device, same vocabulary.
        input_ids: token sequences (unpadded, equal length), e.g. held-out calibration sequences.
        batch_size: sequences per forward.
    """
    total, count = 0.0, 0
    device = next(student.parameters()).device
    for start in range(0, len(input_ids), batch_size):
        ids = input_ids[start : start + batch_size].to(device)
        lt = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.double(), -1)  # [B, L, V]
        ls = torch.log_softmax(student(input_ids=ids, use_cache=False).logits.double(), -1)
        total += float((lt.exp() * (lt - ls)).sum())
        count += ids.numel()
    return total / max(count, 1)
