"""ciuic.distributed: the quantized DDP all-reduce hook, on gloo with 2 CPU processes.

One ``torch.multiprocessing.spawn`` (module fixture) runs every two-process scenario and writes its
measurements to JSON; the tests read them. References are independent of the hook: uncompressed
DDP (DDP's own all-reduce), torch's ``allreduce_hook``, the exact mean computed from both ranks'
gradients, and a byte meter that wraps ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import ciuic.distributed as cd

WORLD = 2
STEPS = 200
CONTEXT, EMBED, HIDDEN = 4, 32, 256


# ------------------------------------------------------------------------------------------------
# Worker (runs in each spawned process)
# ------------------------------------------------------------------------------------------------
class ByteMLP(nn.Module):
    """Next byte from the previous CONTEXT bytes (about 110k parameters, several DDP buckets)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(256, EMBED)
        self.hidden = nn.Linear(CONTEXT * EMBED, HIDDEN)
        self.out = nn.Linear(HIDDEN, 256)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.hidden(self.embed(context).flatten(1))))


def _text() -> torch.Tensor:
    from ciuic._workloads import stdlib_text

    return torch.tensor(list(stdlib_text(300_000)), dtype=torch.long)


def _batch(data: torch.Tensor, generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - CONTEXT - 1, (size,), generator=generator)
    index = starts[:, None] + torch.arange(CONTEXT + 1)
    window = data[index]
    return window[:, :CONTEXT], window[:, CONTEXT]


class _ByteMeter:
    """Counts the bytes of every tensor handed to ``dist.all_reduce`` (independent of the hook)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._original = dist.all_reduce

    def __enter__(self) -> "_ByteMeter":
        def counting(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._original(tensor, *args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original


def _train(rank: int, hook: str, data: torch.Tensor, evaluation: tuple) -> dict:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(ByteMLP(), bucket_cap_mb=0.1)
    state = None
    if hook == "torch_allreduce":
        model.register_comm_hook(None, allreduce_hook)
    elif hook != "none":
        state = cd.compress_ddp_gradients(model, bits=int(hook[len("int"):]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(100 + rank)
    losses, meter_bytes = [], []
    for step in range(STEPS):
        x, y = _batch(data, generator, 64)
        with _ByteMeter() as meter:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        meter_bytes.append(meter.bytes)
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = F.cross_entropy(model.module(evaluation[0]), evaluation[1]).item()
    result = {"losses": losses, "eval_loss": eval_loss, "meter_bytes_last": meter_bytes[-1]}
    if state is not None:
        result.update(
            bytes_sent_last_step=state.bytes_sent_last_step, fp32_bytes_last_step=state.fp32_bytes_last_step,
            ratio_last_step=state.ratio_last_step, steps=state.steps,
            bytes_sent_total=state.bytes_sent_total, fp32_bytes_total=state.fp32_bytes_total,
        )
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(WORLD)]
    dist.all_gather(gathered, params)
    result["replicas_identical"] = bool(torch.equal(gathered[0], gathered[1]))
    return result


def _one_bucket_grads(rank: int, bits: int, steps: int) -> dict:
    """The same local gradients every step: the hook's output vs the exact mean of both ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(7)
    linear = nn.Linear(300, 10)  # 3010 parameters: 12 blocks, the last one partial
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 300, generator=generator) * (1 + 3 * rank)
    # the local gradient, computed before DDP wraps the module (no communication)
    linear(x).pow(2).sum().backward()
    local = torch.cat([linear.weight.grad.flatten(), linear.bias.grad.flatten()])
    linear.zero_grad(set_to_none=True)
    model = DDP(linear)
    cd.compress_ddp_gradients(model, bits=bits)
    outputs = []
    for _ in range(steps):  # the parameters never change: the same local gradient every step
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        outputs.append(torch.cat([linear.weight.grad.flatten(), linear.bias.grad.flatten()]))
    gathered = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(gathered, local)
    exact = sum(gathered) / WORLD
    outs = torch.stack(outputs)
    gathered_out = [torch.empty_like(outs) for _ in range(WORLD)]
    dist.all_gather(gathered_out, outs)
    # bound per element: each rank's rounding error is at most scale / (2 L), scale = shared block max
    levels = cd.levels_per_process(bits, WORLD)
    # the bucket buffer's order is DDP's; the residual changes x after step 1, so use step 1 for the bound
    block_max = torch.stack([g.abs() for g in gathered]).amax(0)
    return {
        "first_error": float((outs[0] - exact).abs().max()),
        "first_bound": float(block_max.max() / (2 * levels)),
        "mean_error": float((outs.mean(0) - exact).abs().max()),
        "identical_across_ranks": bool(torch.equal(gathered_out[0], gathered_out[1])),
        "exact_scale": float(exact.abs().max()),
    }


def _nonfinite(rank: int, hook: str) -> dict:
    """Rank 0's loss is made infinite at step 1 under a GradScaler."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    data = torch.arange(4096) % 256
    model = DDP(ByteMLP(), bucket_cap_mb=0.1)
    if hook != "none":
        cd.compress_ddp_gradients(model, bits=int(hook[len("int"):]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    generator = torch.Generator().manual_seed(rank)
    record: dict = {}
    for step in range(3):
        x, y = _batch(data, generator, 16)
        loss = F.cross_entropy(model(x), y)
        if step == 1 and rank == 0:
            loss = loss * float("inf")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if step == 1:
            record["nonfinite_mask"] = [int(v) for v in torch.cat(
                [(~torch.isfinite(p.grad)).flatten() for p in model.parameters()]).nonzero().flatten()[:50000]]
            record["nonfinite_count"] = int(sum((~torch.isfinite(p.grad)).sum() for p in model.parameters()))
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        if step == 1:
            record["params_unchanged"] = all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
            record["scale_after"] = float(scaler.get_scale())
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    record["finite_after"] = bool(torch.isfinite(params).all())
    return record


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        text = _text()
        cut = int(len(text) * 0.9)
        train, held_out = text[:cut], text[cut:]
        evaluation = _batch(held_out, torch.Generator().manual_seed(999), 4096)
        results = {hook: _train(rank, hook, train, evaluation) for hook in ("none", "torch_allreduce", "int8", "int4")}
        results["one_bucket"] = {bits: _one_bucket_grads(rank, bits, steps=20) for bits in (8, 4)}
        results["nonfinite"] = {hook: _nonfinite(rank, hook) for hook in ("none", "int8")}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


pytestmark = pytest.mark.xdist_group("ddp_spawn")


# ------------------------------------------------------------------------------------------------
# Two processes
# ------------------------------------------------------------------------------------------------
# int8: the acceptance bound (1%). int4 (7 levels per process at 2 processes) is measured ~2% worse
# here; its bound records that, it is not a claim of parity.
@pytest.mark.parametrize("bits, tolerance", [(8, 0.01), (4, 0.03)], ids=["int8", "int4"])
def test_trains_within_tolerance_of_uncompressed_ddp(runs, bits, tolerance):
    base = runs[0]["none"]["eval_loss"]
    ours = runs[0][f"int{bits}"]["eval_loss"]
    assert runs[0]["none"]["losses"][0] > base + 1.0, "the reference run did not learn"
    assert abs(ours - base) / base <= tolerance, f"int{bits}: eval loss {ours:.4f} vs uncompressed {base:.4f}"
    # both ranks evaluated the same replica
    assert runs[1][f"int{bits}"]["eval_loss"] == ours


@pytest.mark.parametrize("hook", ["none", "int8", "int4"])
def test_replicas_stay_identical(runs, hook):
    assert runs[0][hook]["replicas_identical"] and runs[1][hook]["replicas_identical"]


@pytest.mark.parametrize("bits, bound", [(8, 0.3), (4, 0.15)], ids=["int8", "int4"])
def test_bytes_sent_per_step(runs, bits, bound):
    for rank in range(WORLD):
        ours, reference = runs[rank][f"int{bits}"], runs[rank]["torch_allreduce"]
        # an independent meter (wrapping dist.all_reduce) agrees with the hook's own counter ...
        assert ours["meter_bytes_last"] == ours["bytes_sent_last_step"]
        # ... and with what fp32 all-reduce of the same buckets sends (torch's allreduce_hook)
        assert reference["meter_bytes_last"] == ours["fp32_bytes_last_step"]
        ratio = ours["meter_bytes_last"] / reference["meter_bytes_last"]
        assert ratio <= bound, f"int{bits}: {ratio:.3f} of fp32"
        assert ours["steps"] == STEPS
        assert ours["bytes_sent_total"] < bound * ours["fp32_bytes_total"]


@pytest.mark.parametrize("bits", [8, 4])
def test_reduced_gradient_error_bound_and_error_feedback(runs, bits):
    for rank in range(WORLD):
        r = runs[rank]["one_bucket"][str(bits)]
        assert r["identical_across_ranks"]
        # one step: within each rank's rounding error (scale / 2L) of the exact mean
        assert 0 < r["first_error"] <= r["first_bound"] * 1.0001
        # with error feedback the average of 20 steps of the same gradient is ~20x closer
        assert r["mean_error"] <= r["first_bound"] / 10


def test_nonfinite_gradients_propagate_and_gradscaler_skips(runs):
    for rank in range(WORLD):
        base, ours = runs[rank]["nonfinite"]["none"], runs[rank]["nonfinite"]["int8"]
        assert base["nonfinite_count"] > 0
        # NaN/Inf where uncompressed DDP puts them (on both ranks, rank 1's own gradient was finite)
        assert ours["nonfinite_count"] == base["nonfinite_count"]
        assert ours["nonfinite_mask"] == base["nonfinite_mask"]
        assert ours["params_unchanged"] and ours["scale_after"] == base["scale_after"] == 512.0
        assert ours["finite_after"]


# ------------------------------------------------------------------------------------------------
# One process: arguments
# ------------------------------------------------------------------------------------------------
def test_levels_per_process():
    assert [cd.levels_per_process(8, w) for w in (1, 2, 3, 8, 127)] == [127, 63, 42, 15, 1]
    assert [cd.levels_per_process(4, w) for w in (1, 2, 3, 4, 7)] == [7, 3, 2, 1, 1]
    with pytest.raises(ValueError, match="at most 7 processes"):
        cd.levels_per_process(4, 8)
    with pytest.raises(ValueError, match="at most 127"):
        cd.levels_per_process(8, 128)


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 2}, "bits=2 is not valid; allowed: 8, 4"),
    ({"bits": True}, "bits=True is not valid"),
    ({"block_size": 7}, "block_size=7 is not valid; allowed: an even int"),
    ({"block_size": 0}, "block_size=0 is not valid"),
    ({"error_feedback": "yes"}, "error_feedback='yes' is not valid; allowed: True, False"),
    ({"seed": -1}, "seed=-1 is not valid"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cd.CompressedAllReduceState(**kwargs)


def test_compress_ddp_gradients_needs_ddp():
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        cd.compress_ddp_gradients(nn.Linear(2, 2))


def test_state_pickles_without_residuals():
    import pickle

    state = cd.CompressedAllReduceState(bits=4, block_size=64)
    state._residuals[("k",)] = torch.ones(3)
    copy = pickle.loads(pickle.dumps(state))
    assert (copy.bits, copy.block_size, copy._residuals) == (4, 64, {})
    assert math.isnan(copy.ratio_last_step)
