"""The pack pool (ciuic_kernels._pool, ``CompressionConfig.pool``): a steady-state step allocates
nothing new for packs, training is bit-identical with and without it, a buffer a live view still
reads is never handed out again, and the pool never holds more than the previous pass needed."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ciuic
import ciuic_kernels
from ciuic_kernels import QuantSpec, _pool


@pytest.fixture(autouse=True)
def _clean_state(compression_off):
    ciuic.empty_pool()
    ciuic.reset_stats()
    yield
    ciuic.empty_pool()


def _llama(seed: int = 0) -> nn.Module:
    from ciuic._workloads import tiny_llama

    model = tiny_llama(hidden=64, intermediate=128, layers=2, heads=4, vocab=128, max_positions=128, seed=seed)
    model.train()
    return model


def _tokens(step: int, seq: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(100 + step))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _in_fresh_thread(fn, *args, **kwargs):
    """Run ``fn`` on a new thread: a fresh plan (plans outlive contexts, per thread and config)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as error:  # re-raised on the caller's thread
            out["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _train(pool: bool, steps: int, **kwargs) -> dict:
    return _in_fresh_thread(_train_here, pool, steps, **kwargs)


def _train_here(pool: bool, steps: int, *, seqs=None, mode: str = "4:1", model: nn.Module | None = None,
                **options) -> dict:
    """Train the tiny LLaMA for ``steps`` steps under compression; per step: loss, pool counters."""
    model = _llama() if model is None else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, per_step = [], []
    with ciuic.compression(mode, pool=pool, **options):
        for step in range(steps):
            ciuic.reset_stats()
            ids = _tokens(step, seq=seqs[step % len(seqs)] if seqs else 32)
            loss = _loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            stats = ciuic.stats()
            per_step.append(dict(stats.pool, quantized=sum(
                v.tensors for k, v in stats.by_codec.items() if k.startswith("int") or k == "bitmask")))
    return {"losses": torch.stack(losses), "params": [p.detach().clone() for p in model.parameters()],
            "steps": per_step}


# ----------------------------------------------------------------------------------------------
# Through the engine
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,rounding", [("4:1", "nearest"), ("8:1", "stochastic")],
                         ids=["4:1-nearest", "8:1-stochastic"])
def test_a_steady_step_allocates_no_pack_and_trains_bit_identically(mode, rounding):
    pooled = _train(True, 6, mode=mode, rounding=rounding)
    plain = _train(False, 6, mode=mode, rounding=rounding)
    assert torch.equal(pooled["losses"], plain["losses"])
    for a, b in zip(pooled["params"], plain["params"]):
        assert torch.equal(a, b)
    for i, step in enumerate(pooled["steps"]):
        assert step["quantized"] > 0
        assert step["allocations"] + step["reuses"] == step["quantized"], (i, step)
        if i >= 2:  # from the third step on: every pack from memory the step before left
            assert step["allocations"] == 0 and step["busy"] == 0, (i, step)
            assert step["reuses"] == step["quantized"]
    assert all(s["allocations"] == 0 and s["reuses"] == 0 for s in plain["steps"])  # pool=False: untouched
    assert pooled["steps"][-1]["free_bytes"] > 0  # kept for the next step, until empty_pool()
    ciuic.empty_pool()
    assert ciuic.stats().pool["free_bytes"] == 0


def test_changing_shapes_train_identically_and_the_pool_holds_no_more_than_a_pass():
    seqs = [32, 48, 24, 64, 40, 64, 32]
    pooled = _train(True, 14, seqs=seqs)
    plain = _train(False, 14, seqs=seqs)
    assert torch.equal(pooled["losses"], plain["losses"])
    for a, b in zip(pooled["params"], plain["params"]):
        assert torch.equal(a, b)
    # after backward every buffer is free: it never exceeds the largest step's packs (what an
    # allocator without a pool held at that step's peak)
    largest = max(s["allocated_bytes"] + s["reused_bytes"] for s in pooled["steps"])
    assert max(s["free_bytes"] for s in pooled["steps"]) <= largest
    assert sum(s["trimmed"] for s in pooled["steps"]) > 0  # shapes that stopped coming were freed


def test_two_graphs_alive_at_once_and_a_retained_graph_unpack_correctly():
    # gradient accumulation with both forwards first, and a graph kept for a second backward:
    # buffers of live packs are never lent again
    def run(pool: bool) -> list:
        model = _llama()
        grads = []
        with ciuic.compression("4:1", pool=pool):
            for step in range(3):
                a = _loss(model, _tokens(2 * step))
                b = _loss(model, _tokens(2 * step + 1))
                a.backward(retain_graph=True)
                b.backward()
                a.backward()  # the retained graph, again
                grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
                model.zero_grad(set_to_none=True)
        return grads

    for pooled, plain in zip(_in_fresh_thread(run, True), _in_fresh_thread(run, False)):
        assert torch.equal(pooled, plain)


def test_threads_share_nothing_they_should_not():
    results: dict = {}

    def worker(name: str, model: nn.Module) -> None:
        results[name] = _train_here(True, 4, model=model)["losses"]

    # models built here: their initialisation draws from torch's global RNG
    threads = [threading.Thread(target=worker, args=(f"t{i}", _llama())) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reference = _train(False, 4)["losses"]
    for name in ("t0", "t1", "t2"):
        assert torch.equal(results[name], reference), name


def test_pool_option_is_validated():
    with pytest.raises(ValueError, match=r"pool='yes'.*True, False"):
        ciuic.compression("4:1", pool="yes")


# ----------------------------------------------------------------------------------------------
# The pool itself
# ----------------------------------------------------------------------------------------------
def _encode(pool, n: int = 8192, seed: int = 0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    with _pool.lending(pool):
        return x, ciuic_kernels.encode(x, QuantSpec(4, 64, "nearest"))


def _counters() -> dict:
    return _pool.counters()


def test_codecs_write_every_tensor_of_a_pack_into_one_aligned_buffer():
    pool = _pool.PackPool()
    for spec, x in [(QuantSpec(4, 64, "nearest"), torch.randn(4097)),
                    (QuantSpec(2, 128, "stochastic"), torch.randn(3, 423, 13).bfloat16()),
                    (ciuic_kernels.BitmaskSpec(), torch.rand(5000) > 0.5),
                    (ciuic_kernels.BitmaskSpec(), (torch.rand(5000) > 0.5).float() * 2.5),
                    (ciuic_kernels.FP8Spec("e4m3", "group", 64), torch.randn(1000)),
                    (ciuic_kernels.FP8Spec("e5m2", "tensor"), torch.randn(1000))]:
        plain = ciuic_kernels.encode(x, spec, seed=7)
        with _pool.lending(pool):
            pooled = ciuic_kernels.encode(x, spec, seed=7)
        storages = {t.untyped_storage().data_ptr() for t in pooled.tensors.values()}
        assert len(storages) == 1, spec
        for name, t in pooled.tensors.items():
            assert torch.equal(t, plain.tensors[name]), (spec, name)
            assert t.data_ptr() % 16 == 0, (spec, name)
        assert pooled.nbytes == plain.nbytes
        assert torch.equal(ciuic_kernels.decode(pooled), ciuic_kernels.decode(plain))


def test_a_given_buffer_is_reused_and_a_buffer_still_read_is_not():
    pool = _pool.PackPool()
    before = _counters()
    x, packed = _encode(pool)
    pool.give(packed)
    del packed
    _, again = _encode(pool, seed=1)
    after = _counters()
    assert after["allocations"] - before["allocations"] == 1
    assert after["reuses"] - before["reuses"] == 1

    # a view of the payload outlives the pack: the buffer must not be handed out again
    kept = again.tensors["payload"]
    copy = kept.clone()
    pool.give(again)
    del again
    _encode(pool, seed=2)
    assert torch.equal(kept, copy)
    assert _counters()["busy"] - after["busy"] == 1


def test_give_ignores_foreign_tensors_and_double_gives():
    pool, other = _pool.PackPool(), _pool.PackPool()
    _, packed = _encode(other)
    plain = ciuic_kernels.encode(torch.randn(8192), QuantSpec(4, 64, "nearest"))
    free = _counters()["free_bytes"]
    pool.give(packed)  # lent by another pool
    pool.give(plain)  # not pooled at all
    assert _counters()["free_bytes"] == free
    other.give(packed)
    other.give(packed)  # twice: counted once
    assert _counters()["free_bytes"] == free + packed.tensors["payload"].untyped_storage().nbytes()


def _give_all(pool, packs: list) -> None:
    for p in packs:
        pool.give(p)
    packs.clear()  # the packs die: their buffers are free to lend again


def test_a_pass_frees_what_the_pass_before_did_not_ask_for():
    pool = _pool.PackPool()
    pool.new_pass()
    _give_all(pool, [_encode(pool, n)[1] for n in (8192, 8192, 4096)])
    pool.new_pass()  # the pass that ended asked for 2 x 8192 and 1 x 4096 elements' buffers: all kept
    trimmed = _counters()["trimmed"]
    _give_all(pool, [_encode(pool, 8192)[1]])
    pool.new_pass()  # this one asked for 1 x 8192 only: the other 8192 and the 4096 go
    assert _counters()["trimmed"] - trimmed == 2
    assert sum(len(v) for v in pool._free.values()) == 1


def test_a_miss_makes_room_from_buffers_the_pass_will_not_need():
    pool = _pool.PackPool()
    pool.new_pass()
    _give_all(pool, [_encode(pool, 8192)[1] for _ in range(3)])
    pool.new_pass()  # expected: 3 x the 8192-element buffer
    _give_all(pool, [_encode(pool, 8192)[1]])  # takes one, gives it back: still 3 free, 2 more expected
    trimmed = _counters()["trimmed"]
    _encode(pool, 16384)  # a size never seen: the spare buffer (3 free - 2 expected) goes first,
    assert _counters()["trimmed"] - trimmed == 2  # then one expected, until the new size is covered
    assert len(next(iter(pool._free.values()))) == 1
    trimmed = _counters()["trimmed"]
    _encode(pool, 2048)  # smaller than a free buffer: one goes
    assert _counters()["trimmed"] - trimmed == 1
    assert not pool._free
