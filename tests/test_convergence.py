"""Training is unchanged: the char-level LLaMA of shared/research, 300 steps, same seed and data.

The reference is the uncompressed run of the same model, seed and batches. Bounds are the
acceptance bounds of the activation-engine issue: "lossless" bit-identical; final eval loss within
0.5% ("2:1"), 1% ("4:1") and 3% ("8:1") of the uncompressed run. "Within" bounds the accuracy *loss*:
a compressed run may end lower than the uncompressed one (quantization noise; measured e.g. -1.4%
for 4:1 in benchmarks/results/training_curves_fp32.json) and that is reported, not failed.
"""

from __future__ import annotations

import pytest
import torch

from ciuic._workloads import byte_splits, train_charlm

pytestmark = pytest.mark.slow

STEPS = 300
# Batch 8 x 128 (the benchmark, benchmarks/training_curves.py, uses 16 x 128): half the CPU time, so
# the five 300-step runs fit the test command's budget on a 2-core machine.
BATCH = 8
BOUNDS = {"2:1": 0.005, "4:1": 0.01, "8:1": 0.03}


@pytest.fixture(scope="module")
def data():
    return byte_splits()


@pytest.fixture(scope="module")
def baseline(data):
    return train_charlm(None, steps=STEPS, batch=BATCH, data=data, keep_model=True)


# Two groups, so that `pytest -n 2 --dist loadgroup` runs them on two workers (each computes the
# baseline once): about half the wall time of one worker running all five 300-step runs.
@pytest.mark.xdist_group("convergence-a")
def test_lossless_is_bit_identical(data, baseline):
    run = train_charlm("lossless", steps=STEPS, batch=BATCH, data=data, keep_model=True)
    assert run.train_losses == baseline.train_losses
    assert run.eval_loss == baseline.eval_loss
    for (name, p), q in zip(baseline.model.named_parameters(), run.model.parameters()):
        assert torch.equal(p, q), f"parameter {name} differs after {STEPS} lossless steps"


@pytest.mark.parametrize("mode", [
    pytest.param(m, id=f"mode={m}", marks=pytest.mark.xdist_group("convergence-a" if m == "2:1" else "convergence-b"))
    for m in BOUNDS])
def test_eval_loss_within_bound(data, baseline, mode):
    run = train_charlm(mode, steps=STEPS, batch=BATCH, data=data)
    relative = run.eval_loss / baseline.eval_loss - 1
    print(f"{mode}: eval loss {run.eval_loss:.4f} vs {baseline.eval_loss:.4f} ({relative:+.2%}), "
          f"kept {run.saved_bytes} vs {baseline.saved_bytes} bytes")
    assert relative <= BOUNDS[mode], (
        f"{mode}: eval loss {run.eval_loss:.4f} vs uncompressed {baseline.eval_loss:.4f} "
        f"({relative:+.2%}), bound +{BOUNDS[mode]:.1%}")
    # the run really was compressed at the promised ratio (bytes kept for backward, fp32)
    target = float(mode.split(":")[0])
    assert baseline.saved_bytes / run.saved_bytes >= target
