"""Shared test setup: run Triton kernels on CPU through the interpreter (set before triton is imported)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `run.sh test` runs one pytest worker per core: one intra-op thread each, or they fight
    import torch

    torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after). Checks that compare a run bit for bit
    with a compiled baseline need it: on this CPU build, with two intra-op threads, two
    ``torch.compile`` runs of the same model without ciuic (same weights, same batches, Inductor)
    already differ in the last bits after about ten training steps; with one thread they agree bit
    for bit. ``run.sh test`` gives each pytest-xdist worker one thread anyway (above); a plain
    ``pytest`` run gets the same through this fixture."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
