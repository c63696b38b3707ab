"""ciuic.compiled: quantization of saved activations inlined into torch.compile graphs.

Oracles: ``ciuic_kernels.quant``'s pure-PyTorch reference (the traced codec must produce the same
bytes), eager math with the reference round trip applied to the tensors the compiled graph saves,
the compiled run without hooks (lossless bit-identity, graph-break counts), and glibc ``mallinfo2``
heap bytes held between forward and backward (saved bytes). Compilation is slow on CPU: the
Inductor cases share one LLaMA fixture (one xdist group); the GPT-2/BERT/mode sweep uses the
``aot_eager`` backend, which inlines the hooks the same way (the inlining is AOTAutograd's) without
generating C++.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ciuic
import ciuic.compiled as cc
from ciuic import policy
from ciuic.memory import heap_available, heap_bytes
from ciuic_kernels import quant
from ciuic_kernels.specs import QuantSpec

transformers = pytest.importorskip("transformers")

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


# Bit-identity under torch.compile needs one intra-op thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _reset_dynamo() -> None:
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()


# --------------------------------------------------------------------------------------------------
# The traced codec is the reference's format, byte for byte
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: f"dtype={str(d)[6:]}")
@pytest.mark.parametrize("bits", [8, 4, 2], ids=lambda b: f"bits={b}")
@pytest.mark.parametrize("n", [1, 100, 4097], ids=lambda n: f"n={n}")
def test_codec_matches_reference(dtype: torch.dtype, bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(n * 10 + bits)
    x = (torch.randn(n, generator=g) * 3 + 1).to(dtype)
    if n > 10:
        x[3], x[7], x[9] = float("nan"), float("inf"), float("-inf")
    payload, minimum, scale = cc._encode(x, bits, 64)
    ref = quant.encode_reference(x, QuantSpec(bits=bits, group_size=64, rounding="nearest"))
    assert torch.equal(payload, ref.tensors["payload"])
    assert torch.equal(minimum.view(torch.int16), ref.tensors["minimum"].view(torch.int16))
    assert torch.equal(scale, ref.tensors["scale"].view(torch.int16))
    out = cc._decode(payload, minimum, scale, bits, 64, n, dtype)
    want = quant.decode_reference(ref)
    finite = torch.isfinite(want)
    assert torch.equal(out.view(_INT[dtype])[finite], want.view(_INT[dtype])[finite])
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.isposinf(out), torch.isposinf(want))
    assert torch.equal(torch.isneginf(out), torch.isneginf(want))
    assert cc.packed_nbytes(n, bits, 64) == quant.packed_nbytes(n, bits, 64) == \
        payload.numel() + 2 * minimum.numel() + 2 * scale.numel()


def test_bool_bitpack_roundtrip() -> None:
    m = torch.rand(1001, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = cc._pack_bool(m)
    assert packed.dtype == torch.uint8 and packed.numel() == 126
    assert torch.equal(cc._unpack_bool(packed, m.numel()), m)


def test_bad_options_name_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="mode='3:1'.*'lossless', '2:1', '4:1', '8:1'"):
        cc.InlineOptions(mode="3:1")
    with pytest.raises(ValueError, match="group_size=48.*32, 64, 128, 256"):
        cc.InlineOptions(group_size=48)
    with pytest.raises(ValueError, match="min_numel=-1"):
        cc.InlineOptions(min_numel=-1)
    with pytest.raises(ValueError, match="eager_hooks"):
        with cc.inline("4:1", eager_hooks=(lambda t: t,)):
            pass
    assert cc.hooks("4:1") is cc.hooks("4:1")  # same objects: Dynamo's guard never recompiles


# --------------------------------------------------------------------------------------------------
# Inside a compiled function: numerics against the reference, and Inductor's generated code
# --------------------------------------------------------------------------------------------------


def _mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ w1) @ w2


def _roundtrip(t: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 0:
        return t
    spec = QuantSpec(bits=bits, group_size=64, rounding="nearest")
    return quant.decode_reference(quant.encode_reference(t, spec))


@pytest.mark.xdist_group("compile_mlp")
def test_inductor_fuses_quantization_and_matches_reference() -> None:
    from torch._inductor.utils import run_and_get_code

    _reset_dynamo()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=g)
    w1 = (torch.randn(64, 256, generator=g) / 8).requires_grad_()
    w2 = (torch.randn(256, 64, generator=g) / 16).requires_grad_()
    grad_out = torch.randn(64, 64, generator=g)
    compiled = torch.compile(_mlp)
    calls = []

    def run() -> torch.Tensor:
        eager = (lambda t: calls.append(t) or t, lambda t: t)
        with cc.inline("4:1", min_numel=256, eager_hooks=eager):
            y = compiled(x, w1, w2)
        y.backward(grad_out)
        return y

    y, codes = run_and_get_code(run)
    assert calls == [], "a fully compiled region must not call ciuic's Python per saved tensor"
    plan = {d.cls: d for d in cc.decisions()[-1].values()}
    pre, post = plan["elementwise"], plan["linear_input"]  # GELU's input, GELU's output (w2's input)
    assert pre.bits in (8, 4, 2) and post.bits in (8, 4, 2)

    # Oracle: eager math where the saved tensors go through the reference codec.
    a = x @ w1.detach()
    h = F.gelu(a)
    a_hat, h_hat = _roundtrip(a, pre.bits), _roundtrip(h, post.bits)
    gw2 = h_hat.T @ grad_out
    a_req = a_hat.clone().requires_grad_()
    (gelu_grad,) = torch.autograd.grad(F.gelu(a_req), a_req, grad_out @ w2.detach().T)
    gw1 = x.T @ gelu_grad
    torch.testing.assert_close(y, _mlp(x, w1, w2), rtol=1e-5, atol=1e-5)  # the forward is untouched
    torch.testing.assert_close(w2.grad, gw2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w1.grad, gw1, rtol=1e-4, atol=1e-5)
    # ... and they differ from the uncompressed gradients (the quantization really ran)
    assert not torch.allclose(w2.grad, h.T @ grad_out, rtol=1e-5, atol=1e-6)

    forward, backward = codes[0], codes[-1]
    kernels = re.split(r"\n(?=cpp_fused_\w+ = )", forward)
    fused = [k for k in kernels if k.startswith("cpp_fused") and "erf" in k and "uint8_t" in k]
    assert fused, "no forward kernel computes GELU (erf) and writes uint8 codes:\n" + forward[:3000]
    assert "_ciuic_inline_pack" not in forward and "_ciuic_inline_unpack" not in backward
    # the forward returns codes (uint8), per-group minima (bf16) and steps (int16) for backward
    returned = forward.split("return (", 1)[1].split(")", 1)[0]
    assert re.search(r"torch\.uint8", forward) and "torch.int16" in forward, returned
    assert re.search(r"cpp_fused_\w*gelu_backward\w* = async_compile\.cpp_pybinding\(\[[^\]]*const uint8_t\*",
                     backward), "decode is not fused into GELU's backward kernel"


# --------------------------------------------------------------------------------------------------
# Transformers models: LLaMA under Inductor (shared fixture), LLaMA/GPT-2/BERT under aot_eager
# --------------------------------------------------------------------------------------------------


def _model(kind: str, hidden: int, layers: int, seq: int, vocab: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4, use_cache=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_key_value_heads=4,
                                       max_position_embeddings=seq, attn_implementation="sdpa", **common)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=seq, vocab_size=vocab,
                                      attn_implementation="sdpa", use_cache=False, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.BertConfig(hidden_size=hidden, intermediate_size=3 * hidden, max_position_embeddings=seq,
                                  attn_implementation="sdpa", hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **common)
    return transformers.BertForMaskedLM(cfg)


def _context(mode: str | None, via: str):  # noqa: ANN202
    """No compression (None), ``ciuic.compression(mode)`` (the user's entry point, "engine"), or
    ``ciuic.compiled.inline(mode)`` alone ("inline")."""
    if mode is None:
        return contextlib.nullcontext()
    return ciuic.compression(mode) if via == "engine" else cc.inline(mode)


def _run(model: torch.nn.Module, backend: str, mode: str | None, batches: list, *, via: str = "engine",
         bf16: bool = False, heap_at: int | None = None) -> dict:
    """Train ``len(batches)`` steps (SGD) of a compiled copy; grads of step 1, losses, heap, breaks,
    and the plan of every graph compiled meanwhile."""
    _reset_dynamo()
    model = copy.deepcopy(model).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    fn = torch.compile(lambda x: model(input_ids=x, labels=x).loss, backend=backend)
    last_plan = cc._LAST[-1] if cc._LAST else None
    out = {"losses": [], "grads": None, "heap": None}
    for i, x in enumerate(batches):
        measure = i == heap_at
        if measure:
            ciuic.empty_pool()  # else this forward's packs reuse buffers the heap already counts
            before = heap_bytes()
        with _context(mode, via), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = fn(x)
        if measure:
            out["heap"] = heap_bytes() - before
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if i == 0:
            out["grads"] = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
        opt.step()
        out["losses"].append(float(loss.detach()))
    out["breaks"] = _graph_breaks()
    start = next((i + 1 for i, p in enumerate(cc._LAST) if p is last_plan), 0)
    # every graph compiled meanwhile (GPT-2 is two: a graph break), node names prefixed by graph
    out["plan"] = {f"{i}:{name}": d for i, p in enumerate(cc._LAST[start:]) for name, d in p.items()}
    return out


def _rel_error(a: list, b: list) -> float:
    num = math.sqrt(sum(float((x - y).float().square().sum()) for x, y in zip(a, b)))
    den = math.sqrt(sum(float(y.float().square().sum()) for y in b))
    return num / den


@functools.lru_cache(maxsize=None)
def _llama_inductor() -> dict:
    # 4:1 through ciuic.compression (the engine enters the inline hooks). One cold Inductor compile
    # costs a minute of CPU here, so the baseline is the same graph that Inductor gets (its
    # decompositions and partitioner: the same saved tensors) run by aot_eager_decomp_partition,
    # and the other modes run under aot_eager (_sweep).
    batches = _llama_batches()
    return {None: _run(_llama(), "aot_eager_decomp_partition", None, batches, heap_at=1),
            "4:1": _run(_llama(), "inductor", "4:1", batches, heap_at=1)}


def _llama() -> torch.nn.Module:
    # hidden 128, seq 256: activations (~25 tensors of 256 KB) dominate the heap's noise
    return _model("llama", hidden=128, layers=1, seq=256)


def _llama_batches() -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, (2, 256), generator=g) for _ in range(2)]


@pytest.mark.skipif(not heap_available(), reason="needs glibc mallinfo2 (Linux, glibc >= 2.33)")
@pytest.mark.parametrize("mode,bound", [
    pytest.param("2:1", 1.9, id="2:1-aot_eager", marks=pytest.mark.xdist_group("sweep_llama")),
    pytest.param("4:1", 3.5, id="4:1-inductor", marks=pytest.mark.xdist_group("compile_llama_inductor"))])
def test_llama_heap_ratio(mode: str, bound: float) -> None:
    r = _llama_inductor() if mode == "4:1" else _sweep("llama")
    base, ours = r[None]["heap"], r[mode]["heap"]
    plan = r[mode]["plan"]
    assert plan, f"{mode}: no inline plan was made (the compiled graph has no ciuic hooks)"
    planned = sum(d.baseline_bytes for d in plan.values()) / sum(d.kept_bytes for d in plan.values())
    assert base > 4 * 2**20, f"baseline holds only {base} B: too small to measure"
    assert base / ours >= bound, (
        f"{mode}: heap held between forward and backward {base} B (compiled) vs {ours} B (inline), "
        f"ratio {base / ours:.2f} < {bound} (planned {planned:.2f}); plan: "
        + "; ".join(f"{d.name} {d.cls} {d.bits}b {d.kept_bytes}B" for d in plan.values()))


@pytest.mark.xdist_group("compile_llama_inductor")
def test_llama_inductor_trains_without_extra_graph_breaks() -> None:
    r = _llama_inductor()
    base = r[None]
    assert r["4:1"]["breaks"] == base["breaks"], (r["4:1"]["breaks"], base["breaks"])
    assert all(math.isfinite(v) for v in r["4:1"]["losses"])
    # quantization noise, not garbage: gradient error of the first step against the compiled baseline
    assert 0 < _rel_error(r["4:1"]["grads"], base["grads"]) < 0.3
    # after one SGD step on the compressed gradients, the next loss is the baseline's within 1%
    assert abs(r["4:1"]["losses"][1] / base["losses"][1] - 1) < 0.01, (r["4:1"]["losses"], base["losses"])


@functools.lru_cache(maxsize=None)
def _sweep(kind: str) -> dict:
    """aot_eager (AOTAutograd inlines the hooks the same way, without generating C++). LLaMA (the
    heap-sized one): the baseline, "lossless" (the engine's hooks: must be bit-identical) and "2:1"
    (``ciuic.compiled.inline`` alone), whose graph is also planned for every ratio mode; GPT-2
    under bf16 autocast (parameter casts) at "4:1"; BERT (post-norm, GELU) at "8:1" (2 bits,
    groups of 128)."""
    if kind == "llama":
        model, batches, modes = _llama(), _llama_batches(), ("lossless", "2:1")
    else:
        model, modes = _model(kind, hidden=64, layers=1, seq=32), ("4:1",) if kind == "gpt2" else ("8:1",)
        g = torch.Generator().manual_seed(2)
        batches = [torch.randint(0, 128, (2, 32), generator=g) for _ in range(2)]
    bf16 = kind == "gpt2"
    runs = {None: _run(model, "aot_eager", None, batches, bf16=bf16, heap_at=1)}
    graphs: list = []
    plan_graph = cc._plan_graph

    def recording(fw, bw, opts):  # noqa: ANN001, ANN202
        # every ratio mode planned on the graph as it is now (torch then inlines the hooks into it)
        graphs.append({m: plan_graph(fw, bw, cc.InlineOptions(m)) for m in ("2:1", "4:1", "8:1")})
        return plan_graph(fw, bw, opts)

    for mode in modes:
        graphs.clear()
        cc._plan_graph = recording
        try:
            runs[mode] = _run(model, "aot_eager", mode, batches, via="inline" if mode == "2:1" else "engine",
                              bf16=bf16, heap_at=1)
        finally:
            cc._plan_graph = plan_graph
        runs.setdefault("graphs", {})[mode] = list(graphs)
    return runs


def _planned_ratio_or_floor(plan: dict, mode: str) -> None:
    """The plan meets the mode's ratio over the tensors it may compress, or cannot: then every
    quantizable tensor is already at its class's lowest precision (tiny models: exact statistics
    and masks weigh more than the budget)."""
    budgeted = [d for d in plan.values() if d.cls != "input_copy"]
    ratio = sum(d.baseline_bytes for d in budgeted) / sum(d.kept_bytes for d in budgeted)
    target = {"2:1": 2, "4:1": 4, "8:1": 8}[mode]
    if ratio < target * 0.999:
        above = [d for d in budgeted if d.cls in policy.CLASS_LEVELS and d.bits != policy.CLASS_LEVELS[d.cls][-1]]
        assert not above, f"{mode}: planned ratio {ratio:.2f} < {target} while {above} could go lower"


def _plans_of_every_mode() -> dict:
    """LLaMA's compiled graph planned for every ratio mode when the 2:1 run compiled it (planning
    needs no recompile)."""
    graphs = _sweep("llama")["graphs"]["2:1"]
    assert len(graphs) == 1, f"the 2:1 run compiled {len(graphs)} graphs (a recompile between steps?)"
    return graphs[0]


@pytest.mark.parametrize("kind", [pytest.param("llama", marks=pytest.mark.xdist_group("sweep_llama")),
                                  "gpt2", "bert"], ids=lambda k: f"model={k}")
def test_models_train_under_compression(kind: str) -> None:
    runs = _sweep(kind)
    base = runs[None]
    modes = [m for m in runs if m not in (None, "graphs")]
    if "lossless" in runs:  # the engine's boundary hooks: bit-identical to compiled uncompressed
        assert runs["lossless"]["losses"] == base["losses"]
        assert all(torch.equal(a, b) for a, b in zip(runs["lossless"]["grads"], base["grads"]))
        assert runs["lossless"]["plan"] == {}, "lossless must not inline hooks into the compiled graph"
    for mode in modes:
        r = runs[mode]
        assert r["breaks"] == base["breaks"], (mode, r["breaks"], base["breaks"])
        assert all(math.isfinite(v) for v in r["losses"]), (mode, r["losses"])
        assert all(bool(torch.isfinite(gr).all()) for gr in r["grads"]), mode
        if mode == "lossless":
            continue
        bits = [d.bits for d in r["plan"].values() if d.cls not in (None, "bool", "input_copy")]
        assert any(b in (8, 4, 2) for b in bits), f"{kind} {mode}: nothing quantized: {r['plan']}"
        _planned_ratio_or_floor(r["plan"], mode)
        for d in r["plan"].values():  # parameters' copies (autocast casts) are never quantized
            if d.cls == "input_copy":
                assert d.bits == 0
        # quantization noise, not garbage (8:1 puts most activations at 2 bits)
        assert 0 < _rel_error(r["grads"], base["grads"]) < {"2:1": 0.05, "4:1": 0.5, "8:1": 0.8}[mode], (kind, mode)
    if kind == "gpt2":  # under autocast: bf16 activations quantized, the weights' bf16 casts never
        plan = runs["4:1"]["plan"].values()
        assert any(d.bits in (8, 4, 2) and d.baseline_bytes == 2 * d.numel for d in plan), runs["4:1"]["plan"]
        assert any(d.cls == "input_copy" for d in plan), runs["4:1"]["plan"]


@pytest.mark.xdist_group("sweep_llama")
def test_classes_and_floors_follow_the_eager_policy() -> None:
    plans = _plans_of_every_mode()
    for mode, plan in plans.items():
        by_cls: dict = {}
        for d in plan.values():
            by_cls.setdefault(d.cls, set()).add(d.bits)
        assert by_cls.get("attention_qk", {8}) <= {0, 8}, (mode, by_cls)  # q/k never below 8 bits
        assert by_cls.get("attention_stats", {0}) == {0}  # logsumexp exact
        assert "attention_qk" in by_cls and "linear_input" in by_cls, by_cls
        for d in plan.values():
            if d.cls is None:
                assert d.bits == 0
        _planned_ratio_or_floor(plan, mode)
    lin = {d.bits for d in plans["4:1"].values() if d.cls == "linear_input"}
    assert lin & {4, 2}, lin  # 4:1 gets the bytes from linear inputs, not from attention
    kept = {m: sum(d.kept_bytes for d in p.values()) for m, p in plans.items()}
    assert kept["2:1"] > kept["4:1"] > kept["8:1"], kept
    # the 2:1 run used a plan of the same bytes for the same graph (policy.solve breaks ties
    # between equally sensitive tensors by object id: which of them gets the bits may differ)
    ran = _sweep("llama")["2:1"]["plan"]
    assert set(ran) == {f"0:{k}" for k in plans["2:1"]}
    assert sum(d.kept_bytes for d in ran.values()) == kept["2:1"]


@pytest.mark.xdist_group("compile_mlp")
def test_eager_code_under_inline_uses_eager_hooks() -> None:
    # Tensors saved by eager code inside the block go to eager_hooks; backward works after exit.
    seen = []

    def pack(t: torch.Tensor) -> tuple:
        seen.append(t.shape)
        return ("mine", t.clone())

    def unpack(p: tuple) -> torch.Tensor:
        assert p[0] == "mine"
        return p[1]

    w = torch.randn(8, 8, requires_grad=True)
    with cc.inline("4:1", eager_hooks=(pack, unpack)):
        y = (torch.randn(4, 8) @ w).tanh().sum()
    y.backward()
    assert seen and w.grad is not None
    with cc.inline("4:1"):
        z = (torch.randn(4, 8) @ w).tanh().sum()  # without eager_hooks: kept as is
    z.backward()


# --------------------------------------------------------------------------------------------------
# ciuic.compression() / enable_compression(): the engine enters the inline hooks for the ratio modes
# --------------------------------------------------------------------------------------------------


def _top_hooks() -> tuple | None:
    from torch._functorch._aot_autograd.utils import top_saved_tensors_hooks

    return top_saved_tensors_hooks()


@functools.lru_cache(maxsize=None)
def _compiled_mlp() -> tuple:
    """A small MLP compiled (aot_eager) and run once BEFORE any compression is on."""
    _reset_dynamo()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(128, 64, generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, backend="aot_eager")

    def step(context: Any) -> tuple[float, list]:
        model.zero_grad(set_to_none=True)
        with context:
            loss = compiled(x).sum()  # saves nothing outside the compiled graph
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters()]

    return step, step(contextlib.nullcontext())


def _bits_equal(a: list, b: list) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.xdist_group("compile_mlp")
def test_compression_quantizes_a_model_compiled_before_it_was_enabled() -> None:
    step, (base_loss, base) = _compiled_mlp()
    last = cc._LAST[-1] if cc._LAST else None
    ciuic.reset_stats()
    loss, grads = step(ciuic.compression("4:1", min_numel=1024))
    plan = cc._LAST[-1]
    assert plan is not last, "no graph was recompiled with ciuic's hooks (Dynamo's hook guard)"
    assert {d.cls for d in plan.values() if d.bits in (8, 4, 2)} >= {"elementwise", "linear_input"}, plan
    assert loss == base_loss  # the forward is untouched
    assert 0 < _rel_error(grads, base) < 0.1
    # a compression() block per step (as the integrations do) reuses that graph: no recompile
    # (the engine's global module hooks come back under the same ids, which Dynamo guards on)
    for _ in range(3):
        _, again = step(ciuic.compression("4:1", min_numel=1024))
        assert _bits_equal(again, grads)
    assert cc._LAST[-1] is plan, "a compression() block per step recompiled the model"
    # the same hooks as ciuic.compiled.inline with the same options: same graph, same bits
    _, inline_grads = step(cc.inline("4:1", min_numel=1024))
    assert _bits_equal(inline_grads, grads)
    # enable/disable_compression: the same; after disable the compiled model is the baseline again
    ciuic.enable_compression("4:1", min_numel=1024)
    try:
        assert isinstance(_top_hooks()[0], torch.fx.GraphModule)
        _, enabled_grads = step(contextlib.nullcontext())
    finally:
        ciuic.disable_compression()
    assert _bits_equal(enabled_grads, grads)
    assert _top_hooks() is None
    _, after = step(contextlib.nullcontext())
    assert _bits_equal(after, base)


@pytest.mark.xdist_group("compile_mlp")
@pytest.mark.parametrize("options", [{"mode": "lossless"}, {"mode": "4:1", "rounding": "stochastic"},
                                     {"mode": "auto", "budget": 0.5}, {"mode": "4:1", "keep_modules": ("2",)}],
                         ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_other_configs_compress_compiled_regions_at_their_boundary(options: dict) -> None:
    # No inline hooks: the engine's own hooks see the compiled region's saved tensors when it
    # returns; "lossless" is then bit-identical to the compiled baseline.
    step, (base_loss, base) = _compiled_mlp()
    last = cc._LAST[-1] if cc._LAST else None
    ciuic.reset_stats()
    engine = ciuic.compression(options.pop("mode"), **options)
    loss, grads = step(engine)
    assert (cc._LAST[-1] if cc._LAST else None) is last, "an inline plan was made"
    assert ciuic.stats().tensors_packed >= 2  # the compiled region's saved tensors reached the engine
    assert loss == base_loss
    if engine.config.mode == "lossless":
        assert _bits_equal(grads, base)
    else:
        assert all(bool(torch.isfinite(g).all()) for g in grads) and _rel_error(grads, base) < 0.1


@pytest.mark.xdist_group("compile_mlp")
def test_exception_in_the_block_leaves_no_hooks_behind() -> None:
    step, _ = _compiled_mlp()
    filtering = torch._functorch.config.saved_tensors_hooks_filtering_mode
    with pytest.raises(ZeroDivisionError):
        with ciuic.compression("4:1"):
            assert isinstance(_top_hooks()[0], torch.fx.GraphModule)
            assert torch._functorch.config.saved_tensors_hooks_filtering_mode == cc.FILTERING_MODE
            1 / 0
    assert _top_hooks() is None and not ciuic.is_enabled()
    assert torch._functorch.config.saved_tensors_hooks_filtering_mode == filtering


def test_eager_models_are_unchanged_by_the_inline_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine with the inline hooks in front (eager code reaches it through them) against the
    # engine alone: same gradients bit for bit, same accounting, same module names.
    from ciuic.engine import engine as engine_module

    def train(seed: int) -> tuple[list, dict]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256),
                                    torch.nn.Linear(256, 64))
        x = torch.randn(96, 64, generator=torch.Generator().manual_seed(4))
        ciuic.reset_stats()
        for _ in range(2):  # calibration pass, then the planned one
            model.zero_grad(set_to_none=True)
            with ciuic.compression("4:1", seed=seed):  # a fresh planner per seed
                loss = model(x).square().mean()
            loss.backward()
        s = ciuic.stats()
        return [p.grad for p in model.parameters()], {
            "bytes": (s.tensors_packed, s.bytes_before, s.bytes_after),
            "modules": {m: (c.before, c.after) for m, c in s.by_module.items()},
            "codecs": {c: (v.before, v.after) for c, v in s.by_codec.items()}}

    grads, with_inline = train(seed=101)
    monkeypatch.setattr(engine_module, "_inline_context", lambda *args: None)
    reference, without = train(seed=102)
    assert with_inline == without
    assert _bits_equal(grads, reference)
    assert any(codec.startswith("int") for codec in with_inline["codecs"]), with_inline
