"""Unit tests of the bit plan (``ciuic.policy``): ``classify`` from what saved a tensor, ``solve``
against a brute-force check of its constraints (budget met, monotone in the budget, class floors)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ciuic.policy import CLASS_LEVELS, EXACT, Site, classify, expected_sq_error, level_nbytes, solve

GROUP = 64


def _sites(n: int = 24, seed: int = 0) -> list[Site]:
    rng = random.Random(seed)
    classes = list(CLASS_LEVELS)
    sites = []
    for i in range(n):
        cls = classes[i % len(classes)]
        numel = GROUP * rng.randint(16, 4096)
        sites.append(Site(key=("m", "op", i), cls=cls, module=f"m{i % 5}", numel=numel, element_size=2,
                          group_ranges_sq_sum=rng.uniform(0.1, 10.0) * numel / GROUP,
                          gradient_weight=rng.uniform(0.01, 5.0)))
    return sites


def _cost(plan, sites) -> int:
    return sum(s.cost(plan.levels[s.key], GROUP) for s in sites)


@pytest.mark.parametrize("fraction", [0.05, 0.12, 0.2, 0.3, 0.5, 0.8, 1.2])
def test_budget_is_met_whenever_it_can_be(fraction):
    sites = _sites()
    exact = sum(s.cost(EXACT, GROUP) for s in sites)
    lowest = sum(s.cost(s.levels()[-1], GROUP) for s in sites)
    budget = fraction * exact
    plan = solve(sites, budget, GROUP)
    assert plan.planned_bytes == _cost(plan, sites)  # the solver's own total is the real one
    if budget >= lowest:
        assert plan.feasible and plan.planned_bytes <= budget
    else:
        assert not plan.feasible and plan.planned_bytes == lowest  # as small as the classes allow


def test_every_tensor_stays_within_its_class():
    sites = _sites()
    for fraction in (0.01, 0.25, 2.0):
        plan = solve(sites, fraction * sum(s.cost(EXACT, GROUP) for s in sites), GROUP)
        for s in sites:
            assert plan.levels[s.key] in CLASS_LEVELS[s.cls], (s.cls, plan.levels[s.key])
        # the sensitive classes never go below their floor, however tight the budget
        for s in sites:
            if s.cls in ("attention_qk", "loss"):
                assert plan.levels[s.key] in (EXACT, 8)
            if s.cls == "attention_stats":
                assert plan.levels[s.key] == EXACT


def test_bytes_are_monotone_in_the_budget():
    sites = _sites(seed=3)
    exact = sum(s.cost(EXACT, GROUP) for s in sites)
    planned = [solve(sites, f * exact, GROUP).planned_bytes for f in (0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 1.0)]
    assert planned == sorted(planned), planned


def test_more_sensitive_tensors_get_more_bits():
    """Two linear inputs alike but for their gradient weight: under a budget that needs one of them
    at low precision, it is the less sensitive one."""
    a = Site(key=("a",), cls="linear_input", module="a", numel=GROUP * 1024, element_size=2,
             group_ranges_sq_sum=1024.0, gradient_weight=100.0)
    b = Site(key=("b",), cls="linear_input", module="b", numel=GROUP * 1024, element_size=2,
             group_ranges_sq_sum=1024.0, gradient_weight=0.01)
    budget = a.cost(8, GROUP) + b.cost(2, GROUP)
    plan = solve([a, b], budget, GROUP)
    assert plan.levels[("a",)] > plan.levels[("b",)] or plan.levels[("a",)] == EXACT


def test_ties_are_broken_by_the_order_sites_were_saved_in():
    """Identical sites (a graph's repeated layers): which ones go to lower precision must depend
    only on their order, so planning the same graph twice gives the same plan. With the budget
    for half of them at 4 bits, the first half (in order) is downgraded."""
    def sites(order):  # made in one order (object ids follow it), listed in another
        made = {i: Site(key=("layer", i), cls="linear_input", module=f"layer{i}", numel=GROUP * 256,
                        element_size=2, group_ranges_sq_sum=256.0, gradient_weight=1.0) for i in range(n)}
        return [made[i] for i in order]

    n = 8
    one = sites(range(n))[0]
    budget = n // 2 * one.cost(4, GROUP) + (n - n // 2) * one.cost(8, GROUP)
    for order in (list(range(n)), list(reversed(range(n)))):
        plans = [solve(sites(order), budget, GROUP).levels for _ in range(3)]
        assert plans[0] == plans[1] == plans[2]
        assert [plans[0][("layer", i)] for i in order] == [4] * (n // 2) + [8] * (n - n // 2), plans[0]


def test_small_problem_matches_brute_force_budget_feasibility():
    sites = _sites(n=6, seed=5)
    exact = sum(s.cost(EXACT, GROUP) for s in sites)
    for fraction in (0.1, 0.2, 0.35):
        budget = fraction * exact
        feasible = any(sum(s.cost(lv, GROUP) for s, lv in zip(sites, combo)) <= budget
                       for combo in itertools.product(*(s.levels() for s in sites)))
        assert solve(sites, budget, GROUP).feasible == feasible


def test_cost_and_error_model():
    # bytes: payload + per-group metadata, as the codec stores them (policy.quant_nbytes)
    assert level_nbytes(EXACT, 1000, 2, GROUP) == 2000
    assert level_nbytes(4, 4096, 2, GROUP) < level_nbytes(8, 4096, 2, GROUP) < level_nbytes(EXACT, 4096, 2, GROUP)
    # the expected round-to-nearest error quarters... per extra bit: (2**b - 1)**-2
    e8, e4, e2 = (expected_sq_error(1.0, GROUP, b) for b in (8, 4, 2))
    assert e8 < e4 < e2 and expected_sq_error(1.0, GROUP, EXACT) == 0.0
    assert abs(e2 / e4 - (15 / 3) ** 2) < 1e-9


@pytest.mark.parametrize(
    "op, modules, shape, index, expected",
    [
        ("scaled_dot_product_attention", ("LlamaAttention",), (2, 4, 32, 16), 0, "attention_qk"),
        ("scaled_dot_product_attention", ("LlamaAttention",), (2, 4, 32, 16), 1, "attention_qk"),
        ("scaled_dot_product_attention", ("LlamaAttention",), (2, 4, 32, 16), 2, "attention"),
        ("scaled_dot_product_attention", ("LlamaAttention",), (2, 4, 32), 4, "attention"),
        ("scaled_dot_product_attention", ("LlamaAttention",), (2, 4), 5, "attention_stats"),
        ("scaled_dot_product_attention", (), (8, 32, 32), 3, "softmax"),
        ("softmax", ("BertSelfAttention",), (2, 4, 32, 32), 0, "softmax"),
        ("matmul", ("GPT2Attention",), (2, 4, 32, 16), 0, "attention_qk"),
        ("cross_entropy", (), (64, 128), 0, "loss"),
        ("linear", ("LlamaMLP", "Linear"), (64, 128), 0, "linear_input"),
        ("conv2d", ("Conv2d",), (8, 3, 16, 16), 0, "conv_input"),
        ("layer_norm", ("LayerNorm",), (64, 128), 0, "norm"),
        ("mul", ("LlamaRMSNorm",), (64, 128), 0, "norm"),
        ("silu", ("LlamaMLP",), (64, 128), 0, "elementwise"),
    ],
)
def test_classify(op, modules, shape, index, expected):
    assert classify(op, modules, torch.empty(shape), index) == expected


# --------------------------------------------------------------------------------------------------
# group_ranges_sq_sum: the calibration statistic, in chunks
# --------------------------------------------------------------------------------------------------


def _ranges_sq_sum_unchunked(t: torch.Tensor, group_size: int) -> float:
    """The definition, on the whole tensor at once (NaN/Inf count as 0, a partial last group is
    padded with its last element)."""
    flat = t.detach().reshape(-1).double()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    g = flat.view(-1, group_size)
    g = torch.where(torch.isfinite(g), g, torch.zeros((), dtype=g.dtype))
    return float((g.amax(1) - g.amin(1)).square().sum())


@pytest.mark.parametrize("n", [1, 63, 64, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_group_ranges_sq_sum_in_chunks_matches_the_whole_tensor(monkeypatch, n, dtype):
    from ciuic import policy

    monkeypatch.setattr(policy, "_RANGE_CHUNK_ELEMENTS", {"cpu": 256})  # several chunks, a ragged tail
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    if n > 100:
        x[17], x[300], x[n - 1] = float("nan"), float("inf"), float("-inf")
    got = policy.group_ranges_sq_sum(x, GROUP)
    assert got == pytest.approx(_ranges_sq_sum_unchunked(x, GROUP), rel=1e-6, abs=1e-12)


def test_group_ranges_sq_sum_holds_no_fp32_copy_of_the_tensor():
    """It runs in the forward of every (re)calibration pass: an fp32 copy of a bf16 activation
    there raised the peak of a 300-step run at its re-calibration step. No op may allocate more
    than a chunk's worth."""
    from torch.profiler import ProfilerActivity, profile

    from ciuic import policy

    x = torch.randn(1 << 20).to(torch.bfloat16)  # 4 MiB as fp32
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        policy.group_ranges_sq_sum(x, GROUP)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 4 * policy._RANGE_CHUNK_ELEMENTS["cpu"], largest
