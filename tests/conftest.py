"""Shared test setup: run Triton kernels on CPU through the interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `run.sh test` runs one pytest worker per core: one intra-op thread each, or they fight
    import torch

    torch.set_num_threads(1)


import pytest  # noqa: E402


def _compression_off() -> None:
    import ciuic
    from ciuic.engine import _state

    ciuic.disable_compression()
    # A test that fails half-way (or an engine bug) can leave a context entered; exit whatever is
    # still active so that one failure does not cascade into the following tests.
    engines = _state().engines
    while engines:
        engines[-1].__exit__(None, None, None)


@pytest.fixture
def compression_off():
    """Compression off on this thread before and after the test (whatever a failed test left)."""
    _compression_off()
    yield
    _compression_off()
