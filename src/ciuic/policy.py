"""Which saved tensor gets which codec, and how many bits: the adaptive bit allocation.

Every saved tensor is put in a *class* from the op that saved it and the module it ran in. A class
lists the precisions it may get (``EXACT`` or a bit width), most precise first: the calibration data
in ``shared/research/activation-sensitivity.md`` (and our own runs) show attention's saved q/k/v/out
and the loss need about 8 bits, softmax statistics must stay exact, while linear-layer inputs,
norm inputs and elementwise tensors tolerate 2-4 bits.

The plan is solved jointly over all tensors of a forward pass, as GACT does (Liu et al., ICML 2022):
each candidate precision has a byte cost (payload + scales, exactly as the codec stores it) and a
sensitivity = class weight x the gradient energy flowing out of the modules that consume the
tensor (directly or through a recomputed tensor) x the expected squared quantization error of the
tensor at that precision (sum over groups of G * step**2 / 12, step = group range / (2**bits - 1)).
``solve`` starts every tensor at 8 bits and then either downgrades greedily (smallest sensitivity
increase per byte saved) until the pass fits the mode's byte budget, or spends the slack on keeping
the most sensitive tensors exact. Because effects do not add up across classes, the weights keep
the sensitive classes high even when the budget is tight.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from ciuic_kernels.quant import _padded_groups

EXACT = 0  # "level" meaning: keep the tensor as it is

# class -> allowed levels, most precise first
CLASS_LEVELS: dict[str, tuple[int, ...]] = {
    "attention_qk": (EXACT, 8),  # q and k: their errors pass through softmax's exponential
    "attention": (EXACT, 8, 4),  # v and out (errors enter the backward linearly); 4 bits last
    "attention_stats": (EXACT,),
    "loss": (EXACT, 8),
    "softmax": (EXACT, 8, 4),  # attention probabilities (seq x seq): 4 bits only when the budget needs it
    "linear_input": (EXACT, 8, 4, 2),
    "conv_input": (EXACT, 8, 4, 2),
    "norm": (EXACT, 8, 4, 2),
    "elementwise": (EXACT, 8, 4, 2),
    # saved outside any torch function ciuic saw: a compiled region's saves (at the boundary of the
    # compiled function) or a custom autograd.Function's ctx.save_for_backward. What it is cannot
    # be known, so it is treated like attention: 8 bits, 4 as a last resort.
    "unknown": (EXACT, 8, 4),
}

# Relative weight of a unit of squared error, per class (elementwise tensors feed derivatives of
# nonlinearities directly, so their errors cost more than a linear layer's input; see the research
# note: MLP elementwise at 2 bits alone +0.7%, linear inputs at 2 bits alone -0.7%).
CLASS_WEIGHTS: dict[str, float] = {
    "attention": 8.0,
    "attention_qk": 8.0,
    "attention_stats": 1.0,
    "loss": 8.0,
    "softmax": 8.0,
    "linear_input": 1.0,
    "conv_input": 1.0,
    "norm": 1.5,
    "elementwise": 3.0,
    "unknown": 8.0,
}

# 2-bit errors compound across tensors in ways a per-tensor error model does not see (research:
# classes harmless alone at 2 bits are harmful together, +45%): make 2 bits the last resort.
LEVEL_PENALTY: dict[int, float] = {2: 4.0}

# The precision used before the first calibration (and for tensors the plan has not seen).
DEFAULT_LEVEL = 8

_ATTENTION_OPS = {
    "scaled_dot_product_attention",
    "_scaled_dot_product_attention_math",
    "flash_attn_func",
    "flex_attention",
}
_LOSS_OPS = {"cross_entropy", "log_softmax", "nll_loss", "linear_cross_entropy", "binary_cross_entropy_with_logits"}
_SOFTMAX_OPS = {"softmax", "_softmax"}
_MATMUL_OPS = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__", "mm"}
_LINEAR_OPS = {"linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "einsum", "__matmul__"}
_CONV_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_NORM_OPS = {"layer_norm", "rms_norm", "group_norm", "batch_norm", "instance_norm"}


def classify(op: str, module_classes: tuple[str, ...], t: torch.Tensor, index: int = -1) -> str:
    """The class of a saved floating tensor, from the op saving it, the enclosing modules and its
    position among the tensors that op saves (``index``; SDPA saves q and k first)."""
    if not op:
        return "unknown"
    in_attention = any("attention" in c.lower() or c.lower().endswith("attn") for c in module_classes[-2:])
    if op in _ATTENTION_OPS:
        # Fused kernels save q, k, v, out (4-d) and the logsumexp; the math path (CPU with
        # dropout, or a float attention bias) saves 3-d (batch*heads, seq, dim) q/k/v and the
        # (seq x seq) probabilities and dropout mask. Anything else is a softmax statistic that
        # must stay exact (research: logsumexp at 2 bits, +47% loss).
        if t.dim() >= 3 and t.shape[-1] == t.shape[-2] and t.shape[-1] > 1:
            return "softmax"
        if t.dim() in (3, 4):
            return "attention_qk" if index in (0, 1) else "attention"
        return "attention_stats"
    if op in _LOSS_OPS:
        return "loss"
    if op in _SOFTMAX_OPS:
        return "softmax"
    if op in _MATMUL_OPS and in_attention:
        return "attention_qk"  # eager attention: q @ k^T and probs @ v
    if op in _LINEAR_OPS:
        return "linear_input"
    if op in _CONV_OPS:
        return "conv_input"
    innermost = module_classes[-1].lower() if module_classes else ""
    if op in _NORM_OPS or innermost.endswith("norm") or "layernorm" in innermost or "rmsnorm" in innermost:
        return "norm"
    if in_attention:
        return "attention_qk" if t.dim() == 4 else "elementwise"
    return "elementwise"


def quant_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes the quant codec keeps (its own count: ``ciuic_kernels.quant.packed_nbytes``)."""
    from ciuic_kernels.quant import packed_nbytes

    return packed_nbytes(numel, bits, group_size)


def level_nbytes(level: int, numel: int, element_size: int, group_size: int) -> int:
    if level == EXACT:
        return numel * element_size
    return quant_nbytes(numel, level, group_size)


def expected_sq_error(group_ranges_sq_sum: float, group_size: int, level: int) -> float:
    """Expected sum of squared round-to-nearest errors: sum_g G * (range_g / qmax)**2 / 12."""
    if level == EXACT:
        return 0.0
    qmax = (1 << level) - 1
    return group_size * group_ranges_sq_sum / (12.0 * qmax * qmax)


@dataclass
class Site:
    """One saved tensor of a forward pass, as seen during calibration."""

    key: tuple
    cls: str
    module: str
    numel: int
    element_size: int
    group_ranges_sq_sum: float  # sum over groups of (max - min)**2
    gradient_weight: float = 1.0  # squared output gradient of the consuming modules (after backward)
    consumers: list = field(default_factory=list)  # modules whose ops saved this tensor

    def __post_init__(self) -> None:
        if not self.consumers:
            self.consumers.append(self.module)

    def levels(self) -> tuple[int, ...]:
        return CLASS_LEVELS[self.cls]

    def cost(self, level: int, group_size: int) -> int:
        return level_nbytes(level, self.numel, self.element_size, group_size)

    def sensitivity(self, level: int, group_size: int) -> float:
        return (
            CLASS_WEIGHTS[self.cls]
            * LEVEL_PENALTY.get(level, 1.0)
            * self.gradient_weight
            * expected_sq_error(self.group_ranges_sq_sum, group_size, level)
        )


@dataclass
class Plan:
    """Chosen level per site key, and what the solver expects the pass to cost."""

    levels: dict = field(default_factory=dict)
    planned_bytes: int = 0
    budget_bytes: int = 0
    feasible: bool = True

    def level_for(self, key: tuple, cls: str) -> int:
        level = self.levels.get(key)
        if level is None or level not in CLASS_LEVELS[cls]:
            allowed = CLASS_LEVELS[cls]
            return DEFAULT_LEVEL if DEFAULT_LEVEL in allowed else allowed[0]
        return level


def solve(sites: list[Site], budget_bytes: float, group_size: int) -> Plan:
    """Joint bit allocation over one pass's tensors.

    Every tensor starts at its finest quantized level (8 bits; exact for exact-only classes).
    Over budget: repeatedly take the downgrade (8->4->2) with the smallest sensitivity increase per
    byte saved. Under budget: spend the slack on keeping the most sensitive tensors exact (largest
    sensitivity removed per byte added). Starting from 8 bits rather than from exact keeps the plan
    from trading many exact tensors against a few 2-bit ones when the budget does not need it.
    """
    index: dict = {}
    # Ties are broken by the sites' order (the order they were saved in), never by object ids:
    # the same graph or model must get the same plan every time it is planned.
    order = {s.key: position for position, s in enumerate(sites)}
    for s in sites:
        allowed = s.levels()
        index[s.key] = 1 if len(allowed) > 1 and allowed[0] == EXACT else 0
    level = {s.key: s.levels()[index[s.key]] for s in sites}
    total = sum(s.cost(level[s.key], group_size) for s in sites)

    if total > budget_bytes:
        heap: list = []

        def push(site: Site) -> None:
            i = index[site.key]
            allowed = site.levels()
            if i + 1 >= len(allowed):
                return
            cur, nxt = allowed[i], allowed[i + 1]
            saved = site.cost(cur, group_size) - site.cost(nxt, group_size)
            if saved > 0:
                added = site.sensitivity(nxt, group_size) - site.sensitivity(cur, group_size)
                heapq.heappush(heap, (max(added, 0.0) / saved, order[site.key], site))

        for s in sites:
            push(s)
        while total > budget_bytes and heap:
            _, _, site = heapq.heappop(heap)
            i = index[site.key]
            allowed = site.levels()
            total -= site.cost(allowed[i], group_size) - site.cost(allowed[i + 1], group_size)
            index[site.key] = i + 1
            level[site.key] = allowed[i + 1]
            push(site)
    else:
        upgrades = []
        for s in sites:
            if index[s.key] == 1:  # quantized now, exact allowed
                added = s.cost(EXACT, group_size) - s.cost(level[s.key], group_size)
                removed = s.sensitivity(level[s.key], group_size)
                upgrades.append((-removed / max(added, 1), order[s.key], s, added))
        upgrades.sort(key=lambda u: u[:2])
        for _, _, site, added in upgrades:
            if total + added <= budget_bytes:
                total += added
                level[site.key] = EXACT
    return Plan(levels=level, planned_bytes=int(total), budget_bytes=int(budget_bytes),
                feasible=total <= budget_bytes)


# Elements per chunk of ``group_ranges_sq_sum``: its fp32 temporaries are bounded by the chunk, not
# the tensor (it runs in the forward of a calibration pass, where every other activation is alive).
_RANGE_CHUNK_ELEMENTS = {"cpu": 1 << 16}
_RANGE_CHUNK_ELEMENTS_DEFAULT = 1 << 22  # off CPU: fewer launches, still at most 16 MB of fp32


def group_ranges_sq_sum(t: torch.Tensor, group_size: int) -> float:
    """Sum over quantization groups of (max - min)**2 over finite values (for error estimates).

    NaN/Inf count as 0. Runs in chunks of whole groups, so a calibration pass does not hold an
    fp32 copy of the tensor beside everything else the forward keeps (a re-calibration pass set
    the peak of a 300-step run that way)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    per_chunk = _RANGE_CHUNK_ELEMENTS.get(flat.device.type, _RANGE_CHUNK_ELEMENTS_DEFAULT)
    chunk = max(per_chunk // group_size, 1) * group_size
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, n, chunk):
        xs = flat[start:start + chunk]
        groups = _padded_groups(xs, -(-xs.numel() // group_size), group_size)  # the codec's padding
        g = torch.nan_to_num(groups.float(), nan=0.0, posinf=0.0, neginf=0.0)
        total += (g.amax(dim=1) - g.amin(dim=1)).square().sum()
    value = float(total)
    return value if math.isfinite(value) else float("inf")


def wide_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of ``t`` (0-dim tensor), accumulated in fp32 for fp16/bf16 tensors (without an fp32
    copy of them) and in the tensor's own dtype otherwise (fp64 stays fp64). The gradient
    statistics (the planner's energy, the fused optimizer's gradient norm) all use it."""
    wide = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dtype=wide)
