"""The training precision a bundle defaults to on the machine it runs on.

bf16 autocast raises on GPUs without native bf16 (V100, T4, many clusters and Colab: "Current CUDA Device
does not support bfloat16"), so the bundles ask this function instead of assuming bf16 on every GPU.
"""

from __future__ import annotations

import torch


def default_precision() -> str:
    """``"bf16"`` on a GPU with native bf16, ``"fp16"`` (with a gradient scaler) on other GPUs, ``"fp32"`` on a CPU.

    Emulated bf16 (``torch.cuda.is_bf16_supported(including_emulation=True)`` on pre-Ampere GPUs) counts as
    unsupported: it runs slower than fp16 there.
    """
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
