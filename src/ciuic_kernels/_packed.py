"""The result type every codec returns: `Packed`, and the shared spec validation helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch


@dataclass(frozen=True, eq=False)
class Packed:
    """A compressed tensor: every byte it holds, and what is needed to decode it.

    ``tensors`` holds every tensor of the pack (payload, scales, minima, indices, side channels,
    nested packs); ``params`` holds plain Python metadata (group size, rounding, format).
    ``nbytes`` is the exact number of bytes the pack keeps alive, computed from the actual tensors,
    so compression ratios are measured, not assumed.
    """

    codec: str
    shape: torch.Size
    dtype: torch.dtype
    bits: float
    tensors: Mapping[str, Union[torch.Tensor, "Packed"]]
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        total = 0
        for value in self.tensors.values():
            if isinstance(value, Packed):
                total += value.nbytes
            else:
                total += value.numel() * value.element_size()
        return total

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def device(self) -> torch.device:
        for value in self.tensors.values():
            return value.device
        return torch.device("cpu")

    @property
    def original_nbytes(self) -> int:
        """Bytes of the tensor this pack replaces (numel x element size of the original dtype)."""
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def __repr__(self) -> str:  # short: the tensors themselves would flood a log
        return (
            f"Packed(codec={self.codec!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"bits={self.bits}, nbytes={self.nbytes}, params={dict(self.params)})"
        )


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float_input(x: torch.Tensor, codec: str) -> None:
    """Raise a clear error for inputs a float codec cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{codec}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        allowed = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise ValueError(f"{codec}: unsupported dtype {x.dtype}; allowed: {allowed}")


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not valid; allowed: {', '.join(map(repr, allowed))}")
