"""Choose between the Triton kernels and the pure-PyTorch references.

Default: Triton for CUDA tensors when Triton imports, the reference otherwise.
``CIUIC_BACKEND=torch`` forces the reference everywhere; ``CIUIC_BACKEND=triton`` forces the
kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``, which is how the tests run them).
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``backend`` (an explicit argument) wins over ``CIUIC_BACKEND``; a bad value raises ValueError.
    """
    choice = backend if backend is not None else os.environ.get("CIUIC_BACKEND", "").strip().lower()
    if choice in ("", "auto"):
        if device.type == "cuda" and triton_available():
            return "triton"
        return "torch"
    if choice not in BACKENDS:
        raise ValueError(
            f"CIUIC_BACKEND/backend={choice!r} is not valid; allowed: 'torch', 'triton' (or unset/'auto')"
        )
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was requested but triton is not installed")
        if device.type != "cuda" and not interpret_mode():
            raise RuntimeError(
                f"backend 'triton' on a {device.type} tensor needs TRITON_INTERPRET=1 "
                "(set it before triton is imported), or use CIUIC_BACKEND=torch"
            )
    return choice


def pick(device: torch.device, backend: str | None, triton_impl, reference_impl):
    """The implementation a codec runs for tensors on ``device``: its Triton launcher or its
    PyTorch reference (see ``select_backend``)."""
    return triton_impl if select_backend(device, backend) == "triton" else reference_impl
