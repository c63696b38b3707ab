"""Shared test setup: run Triton kernels on CPU through the interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
