"""Shared test setup: run Triton kernels on CPU through the interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `run.sh test` runs one pytest worker per core: one intra-op thread each, or they fight
    import torch

    torch.set_num_threads(1)
