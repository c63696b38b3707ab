"""Gradient and optimizer-state memory: low-bit AdamW and the optimizer step fused into backward.

* ``AdamW(params, ..., state_bits=8 | 4, bf16_stochastic_round=False)``: AdamW with block-wise
  8/4-bit moments (about 0.25x / 0.13x the state bytes of ``torch.optim.AdamW``), one fused update
  kernel per parameter (Triton on CUDA, PyTorch elsewhere), optional bf16 weights without fp32
  masters (stochastic rounding). ``AdamW.from_torch(opt)`` / ``.to_torch()`` convert.
* ``fuse_into_backward(optimizer) -> handle``: update each parameter as soon as its gradient is
  ready and free the gradient (``handle.remove()`` undoes it).
* ``state_nbytes(optimizer)``: bytes of all optimizer state tensors.
"""

from .adamw import AdamW, state_nbytes
from .fused import FusedBackwardHandle, fuse_into_backward

__all__ = ["AdamW", "fuse_into_backward", "FusedBackwardHandle", "state_nbytes"]
