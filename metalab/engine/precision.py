"""Numeric precision of meta-training: ``fp32`` (default) or ``bf16`` mixed precision.

``bf16`` runs the meta-training step (forward passes, outer loss, backward) under
:func:`torch.autocast` with bfloat16: convolutions and matrix products compute in bfloat16,
while weights, their gradients, the optimiser state, checkpoints and evaluation stay in float32.
The MAML family keeps its support-set inner loop in fp32 (all-bf16 measured up to 4.5 points
lower on Omniglot), so only its query pass runs in bfloat16.
On CPUs with native bfloat16 instructions (AVX-512-BF16 or AMX) and on recent GPUs it is the
faster setting; elsewhere bfloat16 is emulated and slower, and :func:`precision_note` says so.
Results are not bit-equal to ``fp32`` (bfloat16 keeps 8 bits of mantissa); benchmarks compare
the accuracy reached at the same number of steps.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from metalab.errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"train.precision='{precision}' is unknown; use 'fp32' or 'bf16' (bfloat16 mixed precision).")
    return precision


def training_precision(precision: str, device: torch.device):
    """Context manager for one meta-training step at ``precision`` on ``device``."""
    if check_precision(precision) == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware (else autocast emulates it, slowly)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_note(precision: str, device: torch.device) -> str | None:
    """A warning to show when ``precision`` will be slow on ``device``, else ``None``."""
    if check_precision(precision) == "bf16" and not native_bf16(device):
        return (f"train.precision='bf16' on {device.type}: this processor has no native bfloat16 arithmetic, "
                "so training will be slower than with 'fp32'.")
    return None
