"""ciuic inside ``torch.compile``: per-group quantization of saved activations, inlined into the
compiled graphs, where Inductor fuses it with the kernels around it.

torch (>= 2.8) inlines saved-tensor hooks into the graphs it compiles when both hooks are
``torch.fx.GraphModule``s (``torch/_functorch/_aot_autograd/graph_compile.py``,
``maybe_inline_graph_saved_tensors_hooks``): for every tensor the compiled forward saves for
backward, the pack hook is traced into the forward graph's epilogue and the unpack hook into the
backward graph's prologue. The forward then returns codes and per-group metadata instead of the
activation, and Inductor fuses the encode into the kernel that produces the activation (the GELU
or SwiGLU product, the residual add) and the decode into the kernels that consume it in backward.
No Python runs per saved tensor at run time.

    import ciuic.compiled

    model = torch.compile(model)
    with ciuic.compiled.inline(mode="4:1"):
        loss = model(x).loss
    loss.backward()

``ciuic.compression()`` / ``enable_compression()`` (and the framework integrations) enter
``inline`` themselves in ``"2:1"``/``"4:1"``/``"8:1"``, with the eager engine as ``eager_hooks``
(``ciuic.engine.engine._inline_context``); use ``inline`` directly only without the engine.

**Format.** The one of ``ciuic_kernels.quant`` (its pure-PyTorch reference), rewritten without
in-place ops so that it traces: per group of ``G`` elements (memory order) a bf16 minimum rounded
down, a bf16 step rounded up whose sign bit flags a group holding NaN/Inf, and 8/4/2-bit codes
packed into uint8 (round to nearest). NaN/+Inf/-Inf survive exactly (reserved codes in flagged
groups), so AMP's GradScaler still sees overflows. Bool tensors are packed 8 per byte (lossless).
The encoded tensors are bit-identical to ``ciuic_kernels.quant.encode_reference`` on the same
input (``tests/test_compile.py`` checks it).

**Which tensors, how many bits.** The pack hook sees the saved fx node (``_node``) and both graphs
(torch's saved-tensor hook context). Each saved node gets a class of ``ciuic.policy`` from what the
node is: inputs of SDPA (q/k -> ``attention_qk``, v and the output -> ``attention``, the
logsumexp -> ``attention_stats``), a softmax output, a log-softmax/logits tensor (``loss``), an
input of a matmul (``linear_input``; ``attention_qk`` inside an attention module), of a
convolution, a norm's input, or anything else (``elementwise``). Kept exact: per-row statistics
(a last dimension of 1: norm rstd/mean, softmax max/sum), integer tensors, tensors under
``min_numel`` elements, tensors that are not dense in memory, and copies of graph inputs
(parameters and their dtype casts are never quantized). The bits come from the eager engine's
joint solver (``policy.solve``) run once per compiled graph over all its saved tensors, with the
same class floors and weights but without data (each group is assumed to have the same range: at
compile time only shapes and dtypes exist): ``"2:1"`` / ``"4:1"`` / ``"8:1"`` set the byte budget
(bytes the graph saves / ratio). ``"lossless"`` installs no inline hooks at all: compiled
graphs run exactly as without ciuic (bit-identical), and ``eager_hooks``, if given, are pushed as
ordinary hooks (torch then treats compiled regions as it does for any Python hooks).

**Filtering mode.** ``inline`` sets torch's ``saved_tensors_hooks_filtering_mode`` to
``"no_static"`` while it is active (``FILTERING_MODE``): torch calls the pack hook for every saved
tensor except the graph's static inputs (parameters, buffers), and the plan above decides. torch's
default, ``"donated"``, only offers the graph's private intermediates; it leaves out the tensors
that are also returned to the caller, and for a causal LM those are the largest saved tensors (the
logits, which the loss saves; the KV cache when ``use_cache`` is on). A training loop keeps only
the loss, so those outputs die after the forward and only their codes remain; a caller that holds
an output until backward keeps the codes on top of it (at most 53% of a bf16 tensor's bytes at 8
bits, 28% at 4). Non-static graph inputs (the caller's tensors, activations crossing a graph
break) and copies of any graph input are kept as they are: the caller holds them anyway, so
quantizing them would add bytes. With ``hooks()`` pushed by hand torch's default ("donated") is
used unless you set the config yourself; the plan then covers only what torch offers.

**Eager code.** Autograd calls the same GraphModule hooks for tensors saved outside compiled
regions (graph breaks, eager parts of the model). There the hook context is absent; the tensor is
handed to ``eager_hooks`` (a ``(pack, unpack)`` pair, e.g. the eager engine's) when one is given,
else kept as it is. While a compiled region runs, torch disables the hooks, so its saved tensors
are never packed twice.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch._functorch.config
import torch.fx

from ciuic_kernels.quant import _padded_groups

from . import policy

__all__ = ["MODES", "FILTERING_MODE", "InlineOptions", "inline", "hooks", "decisions", "packed_nbytes"]

MODES = ("lossless", "2:1", "4:1", "8:1")
# torch._functorch.config.saved_tensors_hooks_filtering_mode while ``inline`` compiles (see above)
FILTERING_MODE = "no_static"
_RATIOS = {"2:1": 2.0, "4:1": 4.0, "8:1": 8.0}
_GROUP_SIZES = (32, 64, 128, 256)
_QUANT, _BITMASK = 1, 2
_SMALLEST_NORMAL_BITS = 0x00800000  # 2**-126 as fp32 bits

# Ops that do not change values (or only the layout/dtype): a saved tensor reached from a graph
# input through them is a copy of that input, and consumers are looked up through them.
_TRANSPARENT = {
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "clone", "alias",
    "squeeze", "unsqueeze", "contiguous", "convert_element_type", "_to_copy", "slice", "select",
    "detach", "as_strided",
}
_SDPA = {
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
    "_efficient_attention_forward", "scaled_dot_product_attention",
}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
_CONV = {"convolution", "_convolution", "conv1d", "conv2d", "conv3d"}
_NORM = {"native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit",
         "_native_batch_norm_legit_functional", "rms_norm", "_fused_rms_norm", "var_mean"}


@dataclass(frozen=True)
class InlineOptions:
    """Validated options of the inline hooks (one cached GraphModule pair per distinct value).

    mode: ``"lossless"``, ``"2:1"``, ``"4:1"`` or ``"8:1"`` (bytes the compiled graph saves for
        backward / bytes it keeps, as in ``CompressionConfig``).
    min_numel: tensors with fewer elements are kept as they are.
    group_size: quantization group (32, 64, 128 or 256); default 64, and 128 for ``"8:1"``.
    """

    mode: str = "4:1"
    min_numel: int = 4096
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid for compiled graphs; allowed: "
                             f"{', '.join(map(repr, MODES))}")
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel={self.min_numel!r} is not valid; allowed: an int >= 0")
        if self.group_size is None:
            object.__setattr__(self, "group_size", 128 if self.mode == "8:1" else 64)
        if self.group_size not in _GROUP_SIZES:
            raise ValueError(f"group_size={self.group_size!r} is not valid; allowed: {_GROUP_SIZES}")


def packed_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes one quantized tensor keeps: packed codes + 4 bytes (bf16 minimum, bf16 step) per group."""
    return -(-numel * bits // 8) + 4 * -(-numel // group_size)


# --------------------------------------------------------------------------------------------------
# Traceable codec (functional twin of ciuic_kernels.quant's reference, round to nearest)
# --------------------------------------------------------------------------------------------------


def _round_down_to_bf16(v: torch.Tensor) -> torch.Tensor:
    b = v.view(torch.int32)
    t = b & -65536
    t = t + ((v < 0) & ((b & 0xFFFF) != 0)).to(torch.int32) * 65536
    return t.view(torch.float32)


def _encode(flat: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """1-d float tensor -> (payload uint8, minimum bf16, scale int16 = bf16 step bits | flag)."""
    n = flat.numel()
    qmax = (1 << bits) - 1
    num_groups = (n + group - 1) // group
    pad = num_groups * group - n
    xg = _padded_groups(flat, num_groups, group).to(torch.float32)
    finite = torch.isfinite(xg)
    mn = torch.where(finite, xg, math.inf).amin(1)
    mx = torch.where(finite, xg, -math.inf).amax(1)
    has_finite = mn <= mx
    mn = torch.where(has_finite, mn, 0.0)
    mx = torch.where(has_finite, mx, 0.0)
    flagged = ~finite.all(1)
    mn_b = _round_down_to_bf16(mn)
    levels = torch.where(flagged, max(qmax - 3, 0), qmax).to(torch.float32)
    raw = (mx - mn_b) / levels.clamp_min(1.0)
    step_bits = torch.clamp_min((raw.view(torch.int32) + 0xFFFF) & -65536, _SMALLEST_NORMAL_BITS)
    s = step_bits.view(torch.float32)
    special = torch.where(torch.isnan(xg), qmax, torch.where(xg > 0, qmax - 1, qmax - 2)).to(torch.float32)
    xc = torch.where(finite, xg, mn_b[:, None])
    y = (xc - mn_b[:, None]) / s[:, None] + 0.5
    q = torch.minimum(torch.floor(y).clamp_min(0.0), levels[:, None])
    q = torch.where(finite, q, special).view(-1)
    per = 8 // bits
    num_bytes = (n * bits + 7) // 8
    if pad:
        q = torch.cat([q[:n], q.new_zeros(num_bytes * per - n)])
    q = q[: num_bytes * per].view(num_bytes, per)
    byte = q[:, 0]
    for r in range(1, per):
        byte = byte + q[:, r] * float(1 << (r * bits))
    payload = byte.to(torch.uint8)
    # bf16 bits of the step with the flag in the sign bit, as a signed 16-bit value (no overflow)
    scale = ((step_bits >> 16) - flagged.to(torch.int32) * 32768).to(torch.int16)
    return payload, mn_b.to(torch.bfloat16), scale


def _decode(payload: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor, bits: int, group: int,
            n: int, dtype: torch.dtype) -> torch.Tensor:
    qmax = (1 << bits) - 1
    num_groups = minimum.shape[0]
    sb = scale.to(torch.int32)
    s = ((sb & 0x7FFF) << 16).view(torch.float32)
    flagged = sb < 0
    per = 8 // bits
    if per == 1:
        q = payload.to(torch.float32)
    else:
        p = payload.to(torch.int32)
        q = torch.stack([(p >> (r * bits)) & qmax for r in range(per)], dim=1).view(-1).to(torch.float32)
    total = num_groups * group
    if q.shape[0] > n or total > n:
        q = torch.cat([q[:n], q.new_zeros(total - n)])
    qg = q.view(num_groups, group)
    x_hat = qg * s[:, None] + minimum.to(torch.float32)[:, None]
    special = torch.where(qg == qmax, math.nan, torch.where(qg == qmax - 1, math.inf, -math.inf))
    x_hat = torch.where(flagged[:, None] & (qg >= qmax - 2), special, x_hat)
    return x_hat.view(-1)[:n].to(dtype)


def _pack_bool(flat: torch.Tensor) -> torch.Tensor:
    n = flat.numel()
    num_bytes = (n + 7) // 8
    b = flat.to(torch.uint8)
    if num_bytes * 8 > n:
        b = torch.cat([b, b.new_zeros(num_bytes * 8 - n)])
    b = b.view(num_bytes, 8)
    byte = b[:, 0]
    for r in range(1, 8):
        byte = byte | (b[:, r] << r)
    return byte


def _unpack_bool(payload: torch.Tensor, n: int) -> torch.Tensor:
    bits = torch.stack([(payload >> r) & 1 for r in range(8)], dim=1).view(-1)
    return bits[:n].to(torch.bool)


def _memory_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation making ``x`` contiguous (so the flat view follows memory), or None when ``x``
    is not dense and non-overlapping (a slice, a broadcast): such tensors are kept as they are."""
    if x.dim() == 0 or x.is_contiguous():
        return tuple(range(x.dim()))
    strides = [int(s) for s in x.stride()]
    perm = tuple(sorted(range(x.dim()), key=lambda d: (-strides[d], -int(x.shape[d]))))
    if x.permute(perm).is_contiguous():
        return perm
    return None


# --------------------------------------------------------------------------------------------------
# Which saved node gets what
# --------------------------------------------------------------------------------------------------


def _op_name(node: torch.fx.Node) -> str:
    if node.op != "call_function":
        return node.op
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        return packet.__name__
    return getattr(target, "__name__", str(target))


def _root(node: torch.fx.Node) -> torch.fx.Node:
    """Follow layout/dtype-only ops back to the node that made the values."""
    seen = 0
    while node.op == "call_function" and _op_name(node) in _TRANSPARENT and node.args and seen < 64:
        src = node.args[0]
        if not isinstance(src, torch.fx.Node):
            break
        node, seen = src, seen + 1
    return node


_KWARG = -2  # argument position of a keyword argument (SDPA's attn_mask)


def _consumers(node: torch.fx.Node) -> list[tuple[torch.fx.Node, int]]:
    """(op node, argument position) of every non-transparent use, looking through views."""
    out, stack, seen = [], [node], set()
    while stack:
        cur = stack.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for user in cur.users:
            if user.op != "call_function":
                continue
            if _op_name(user) in _TRANSPARENT and user.args and user.args[0] is cur:
                stack.append(user)
                continue
            pos = next((i for i, a in enumerate(user.args) if a is cur), -1)
            if pos == -1 and any(v is cur for v in user.kwargs.values()):
                pos = _KWARG
            out.append((user, pos))
    return out


def _module_names(node: torch.fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    names = []
    for value in stack.values():
        cls = value[1] if isinstance(value, tuple) and len(value) > 1 else value
        names.append(cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].strip("'>"))
    return tuple(names)


def _in_attention(names: tuple[str, ...]) -> bool:
    return any("attention" in c.lower() or c.lower().endswith("attn") for c in names[-2:])


def _classify(node: torch.fx.Node, bw_input: torch.fx.Node | None) -> str | None:
    """The ``policy`` class of a floating saved node, or None to keep it exact."""
    val = node.meta["val"]
    if val.dim() >= 1 and val.shape[-1] == 1:
        return None  # per-row statistics (norm rstd/mean, softmax max/sum, logsumexp)
    root = _root(node)
    if root.op == "placeholder":
        return None  # a copy of a graph input (parameter dtype casts included)
    producer = _op_name(root)
    # The backward consumer says most precisely what a tensor is to attention.
    for user, pos in _consumers(bw_input) if bw_input is not None else []:
        name = _op_name(user)
        if name.startswith("_scaled_dot_product") or name.startswith("_flash_attention") or \
                name.startswith("_efficient_attention"):
            # (grad_out, query, key, value, out, logsumexp, ...); attn_mask is a keyword: a float
            # mask shifts the softmax like q/k do (a 0/-inf mask is exact at any width)
            return {1: "attention_qk", 2: "attention_qk", 3: "attention", 4: "attention",
                    _KWARG: "attention_qk"}.get(pos, None)
        if name == "_softmax_backward_data":
            return "softmax"
        if name == "_log_softmax_backward_data":
            return "loss"
    if producer == "getitem" and isinstance(root.args[0], torch.fx.Node) and _op_name(root.args[0]) in _SDPA:
        return "attention" if root.args[1] == 0 else None
    if producer in ("_softmax", "softmax"):
        return "softmax"
    if producer in ("_log_softmax", "log_softmax"):
        return "loss"
    if producer == "div" and any(isinstance(a, torch.fx.Node) and _op_name(_root(a)) == "exp" for a in root.args):
        return "softmax"  # decomposed softmax: exp(x - max) / sum
    if producer == "sub" and any(isinstance(a, torch.fx.Node) and _op_name(_root(a)) == "log" for a in root.args):
        return "loss"  # decomposed log-softmax: x - max - log(sum(exp))
    # Forward uses of the values (from the root: a saved ``t(h)`` is made only for backward) and
    # backward uses of the saved tensor.
    consumers = _consumers(root) + (_consumers(bw_input) if bw_input is not None else [])
    names = [(_op_name(u), pos, u) for u, pos in consumers]
    for name, pos, _ in names:
        if name in _SDPA:
            return "attention_qk" if pos in (0, 1, 3, _KWARG) else "attention"
    if any(name == "amax" for name, _, _ in names):
        return "loss"  # logits entering a (log-)softmax of the loss
    for name, _, user in names:
        if name in _MATMUL:
            return "attention_qk" if _in_attention(_module_names(user)) and name in ("bmm", "baddbmm", "matmul") \
                else "linear_input"
    if any(name in _CONV for name, _, _ in names):
        return "conv_input"
    if producer in _NORM or any(name in _NORM for name, _, _ in names):
        return "norm"
    if any(m.lower().endswith("norm") or "layernorm" in m.lower() or "rmsnorm" in m.lower()
           for _, _, user in names for m in _module_names(user)[-1:]):
        return "norm"
    return "elementwise"


@dataclass
class Decision:
    """What the inline pack hook does with one saved node of one compiled graph."""

    name: str
    cls: str | None  # policy class, "bool", "input_copy" (outside the budget), or None (kept as it is)
    bits: int  # 8/4/2 quantized, 1 bitmask, 0 kept
    numel: int
    baseline_bytes: int
    kept_bytes: int
    hooked: bool  # torch calls the hooks for it (see the filtering mode)


def _hint(v: Any) -> int:
    if isinstance(v, torch.SymInt):
        return int(v.node.hint) if v.node.hint is not None else int(v.node.size_hint()) if hasattr(v.node, "size_hint") else 0
    return int(v)


def _numel(val: torch.Tensor) -> int:
    return math.prod(_hint(s) for s in val.shape)


class _Site(policy.Site):
    def cost(self, level: int, group_size: int) -> int:  # our format's bytes, exactly
        if level == policy.EXACT:
            return self.numel * self.element_size
        return packed_nbytes(self.numel, level, group_size)


def _aliases(fw_graph: torch.fx.Graph, bw_graph: torch.fx.Graph, saved: list[torch.fx.Node],
             user_outs: list[torch.fx.Node]) -> tuple[set[str], set[str]]:
    """(names torch's "donated" filtering hooks, names that alias a graph input).

    Same rule as ``collect_fw_donated_buffer_idxs``: a saved tensor is donated when its storage is
    not the storage of a forward input, a user output or a backward output.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    def ref(n: Any) -> Any:
        val = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        if isinstance(val, torch.Tensor) and not val.is_sparse:
            try:
                return StorageWeakRef(val.untyped_storage())
            except Exception:  # noqa: BLE001 - no storage: treat as unique
                return None
        return None

    inputs = {r for r in map(ref, fw_graph.find_nodes(op="placeholder")) if r is not None}
    taken = set(inputs)
    for n in user_outs + list(bw_graph.output_node().args[0] or ()):
        r = ref(n)
        if r is not None:
            taken.add(r)
    refs = {n.name: ref(n) for n in saved}
    donated = {name for name, r in refs.items() if r is None or r not in taken}
    of_inputs = {name for name, r in refs.items() if r is not None and r in inputs}
    return donated, of_inputs


def _plan_graph(fw_graph: torch.fx.Graph, bw_graph: torch.fx.Graph, opts: InlineOptions) -> dict[str, Decision]:
    bw_inputs = {p.name: p for p in bw_graph.find_nodes(op="placeholder")}
    outs = [n for n in fw_graph.output_node().args[0] if isinstance(n, torch.fx.Node)]
    saved, seen = [], set()
    for n in outs:
        if n.name in bw_inputs and n.name not in seen and isinstance(n.meta.get("val"), torch.Tensor):
            saved.append(n)
            seen.add(n.name)
    counts: dict[str, int] = {}
    for n in outs:
        counts[n.name] = counts.get(n.name, 0) + 1
    user_outs = [n for n in outs if n.name not in seen or counts[n.name] > 1]
    donated, of_inputs = _aliases(fw_graph, bw_graph, saved, user_outs)
    filtering = torch._functorch.config.saved_tensors_hooks_filtering_mode

    decisions: dict[str, Decision] = {}
    sites, fixed = [], 0
    for n in saved:
        if n.name in of_inputs:
            continue  # a graph input or a view of one (a parameter, the caller's tensor): alive anyway
        val = n.meta["val"]
        numel = _numel(val)
        base = numel * val.element_size()
        hooked = filtering != "donated" or n.name in donated
        if not hooked:
            continue  # torch will not call the hooks for it: nothing to decide
        if _root(n).op == "placeholder":
            # A copy of a graph input (autocast's cast of a weight, a transposed weight): never
            # quantized, and outside the budget, which covers what ciuic may compress. (The eager
            # engine rebuilds such copies from the parameter; a compiled graph cannot, but
            # Inductor's partitioner usually recomputes them in backward instead of saving them.)
            decisions[n.name] = Decision(n.name, "input_copy", 0, numel, base, base, True)
            continue
        cls: str | None = None
        if numel >= max(opts.min_numel, 1) and _memory_order(val) is not None:
            if val.dtype == torch.bool:
                cls = "bool"
            elif val.is_floating_point():
                cls = _classify(n, bw_inputs.get(n.name))
        if cls == "bool":
            kept = -(-numel // 8)
            decisions[n.name] = Decision(n.name, cls, 1, numel, base, kept, True)
            fixed += kept
        elif cls is None or opts.mode == "lossless" or policy.CLASS_LEVELS[cls] == (policy.EXACT,):
            decisions[n.name] = Decision(n.name, cls, 0, numel, base, base, True)
            fixed += base
        else:
            groups = -(-numel // opts.group_size)
            sites.append(_Site(key=n.name, cls=cls, module="", numel=numel, element_size=val.element_size(),
                               group_ranges_sq_sum=float(groups)))
            decisions[n.name] = Decision(n.name, cls, 8, numel, base, base, True)
    if sites:
        baseline = sum(d.baseline_bytes for d in decisions.values() if d.cls != "input_copy")
        budget = baseline / _RATIOS[opts.mode] - fixed
        plan = policy.solve(sites, budget, opts.group_size)
        for s in sites:
            level = plan.levels[s.key]
            d = decisions[s.key]
            d.bits = level
            d.kept_bytes = s.cost(level, opts.group_size)
    return decisions


# One plan per compiled forward graph, made when torch packs its first saved node.
_PLANS: dict[int, tuple[Any, InlineOptions, dict[str, Decision]]] = {}
_PLANS_LOCK = threading.Lock()
_LAST: list[dict[str, Decision]] = []  # plans of the graphs compiled most recently (for ``decisions``)


def _decision_for(ctx: dict, opts: InlineOptions) -> Decision | None:
    import weakref

    fw_graph, bw_graph, node = ctx["_fw_graph"], ctx["_bw_graph"], ctx["_node"]
    key = id(fw_graph)
    with _PLANS_LOCK:
        entry = _PLANS.get(key)
        if entry is None or entry[0]() is not fw_graph or entry[1] != opts:
            plan = _plan_graph(fw_graph, bw_graph, opts)
            entry = _PLANS[key] = (weakref.ref(fw_graph, lambda _r, k=key: _PLANS.pop(k, None)), opts, plan)
            _LAST.append(plan)
            del _LAST[:-16]
    return entry[2].get(node.name)


def decisions() -> list[dict[str, Decision]]:
    """Per compiled graph (most recent last, up to 16): what the inline hooks chose for each saved
    node (class, bits, bytes before/after). For inspection and tests."""
    with _PLANS_LOCK:
        return [dict(p) for p in _LAST]


# --------------------------------------------------------------------------------------------------
# The hooks
# --------------------------------------------------------------------------------------------------

_local = threading.local()


class _EagerPacked:
    """A tensor saved outside compiled regions, packed by the eager hooks given to ``inline``."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed: Any, unpack: Callable[[Any], torch.Tensor]) -> None:
        self.packed = packed
        self.unpack = unpack


def _options(mode: str, min_numel: int, group_size: int) -> InlineOptions:
    return InlineOptions(mode=mode, min_numel=min_numel, group_size=group_size)


def _is_traced(x: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(x) or torch._is_functional_tensor(x)


def _hook_context() -> dict | None:
    from torch._functorch._aot_autograd.graph_compile import _get_saved_tensor_hook_context

    return _get_saved_tensor_hook_context()


@torch.fx.wrap
def _ciuic_inline_pack(x: torch.Tensor, mode: str, min_numel: int, group_size: int) -> Any:
    ctx = _hook_context()
    if ctx is None or "_node" not in ctx:
        eager = getattr(_local, "eager", None)
        if eager is not None and not torch.compiler.is_compiling() and not _is_traced(x):
            return _EagerPacked(eager[0](x), eager[1])
        return x
    d = _decision_for(ctx, _options(mode, min_numel, group_size))
    if d is None or d.bits == 0:
        return x
    perm = _memory_order(x)
    if perm is None:
        return x
    shape = tuple(x.shape)
    flat = x.permute(perm).reshape(-1)
    meta_shape = tuple(shape[p] for p in perm)
    if d.bits == 1:
        return _pack_bool(flat), (_BITMASK, 1, 0, flat.numel(), meta_shape, perm, x.dtype)
    payload, minimum, scale = _encode(flat, d.bits, group_size)
    return (payload, minimum, scale), (_QUANT, d.bits, group_size, flat.numel(), meta_shape, perm, x.dtype)


@torch.fx.wrap
def _ciuic_inline_unpack(packed: Any) -> torch.Tensor:
    if isinstance(packed, torch.Tensor):
        return packed
    if isinstance(packed, _EagerPacked):
        return packed.unpack(packed.packed)
    tensors, (kind, bits, group, n, shape, perm, dtype) = packed
    if kind == _BITMASK:
        flat = _unpack_bool(tensors, n)
    else:
        flat = _decode(*tensors, bits, group, n, dtype)
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return flat.view(shape).permute(inverse)


class _HookModule(torch.fx.GraphModule):
    """A hook GraphModule that autograd calls without ``nn.Module.__call__``: in eager code the
    hook is called for every saved tensor, and global module hooks (the eager engine's, which name
    the running module) must not see a "GraphModule" around the tensor being packed."""

    def __init__(self, name: str, fn: Any, consts: tuple) -> None:
        # The graph is written node by node, not traced: torch.fx.symbolic_trace patches
        # nn.Module.__call__ for the whole process while it runs, which breaks the forward of
        # every other thread (one thread entering compression while another trains).
        graph = torch.fx.Graph()
        graph.output(graph.call_function(fn, (graph.placeholder(name), *consts)))
        super().__init__(torch.nn.Module(), graph)

    def __call__(self, *args: Any) -> Any:
        return self.forward(*args)


@functools.lru_cache(maxsize=None)
def _hook_modules(opts: InlineOptions) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    pack_gm = _HookModule("x", _ciuic_inline_pack, (opts.mode, opts.min_numel, opts.group_size))
    unpack_gm = _HookModule("packed", _ciuic_inline_unpack, ())
    # No user_cache_hash on the wrapped calls: AOTAutograd then bypasses its cache for graphs with
    # these hooks, so every compilation plans its saved nodes afresh (``decisions`` stays truthful,
    # and a changed ciuic can never be served a stale plan). Inductor's own cache still applies.
    return pack_gm, unpack_gm


def hooks(mode: str = "4:1", *, min_numel: int = 4096,
          group_size: int | None = None) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The ``(pack, unpack)`` GraphModules for ``mode``: the same objects for the same options
    (Dynamo guards on their identity, so reusing them never recompiles). Push them with
    ``torch.autograd.graph.saved_tensors_hooks(*hooks(...))``, or use ``inline``."""
    return _hook_modules(InlineOptions(mode=mode, min_numel=min_numel, group_size=group_size))


class inline:  # noqa: N801 - a context manager named like a function, as torch.no_grad
    """Compress what compiled regions save for backward, inside their graphs, in this block.

    ``mode``: ``"lossless"`` (no inline hooks: compiled graphs stay exactly as they are),
    ``"2:1"``, ``"4:1"``, ``"8:1"``. ``eager_hooks``: a ``(pack, unpack)``
    pair for tensors saved by code that runs eagerly inside the block (graph breaks, uncompiled
    parts); without it they are kept as they are. Backward may run after the block exits.
    ``with`` yields the validated ``InlineOptions``.

    A class, not a generator: a block a thread never exits (``enable_compression`` in a thread
    that ends) must not be closed later by the garbage collector on another thread, where popping
    saved-tensor hooks would hit that thread's own stack.
    """

    def __init__(self, mode: str = "4:1", *, min_numel: int = 4096, group_size: int | None = None,
                 eager_hooks: tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]] | None = None
                 ) -> None:
        self.options = InlineOptions(mode=mode, min_numel=min_numel, group_size=group_size)
        if eager_hooks is not None and (len(eager_hooks) != 2 or not all(callable(h) for h in eager_hooks)):
            raise ValueError(
                f"eager_hooks={eager_hooks!r} is not valid; allowed: None or a (pack, unpack) pair of callables")
        self._eager_hooks = eager_hooks
        self._contexts: list | None = None
        self._previous_eager: Any = None

    def __enter__(self) -> InlineOptions:
        if self._contexts is not None:
            raise RuntimeError("this ciuic.compiled.inline block is already active")
        opts, eager = self.options, self._eager_hooks
        if opts.mode == "lossless":
            # Compiled graphs are left exactly as torch makes them (hooks that return their input
            # unchanged still rename and reorder graph nodes, and Inductor may then fuse differently).
            contexts = [torch.autograd.graph.saved_tensors_hooks(*eager)] if eager is not None else []
        else:
            pack_gm, unpack_gm = _hook_modules(opts)
            contexts = [torch._functorch.config.patch(saved_tensors_hooks_filtering_mode=FILTERING_MODE),
                        torch.autograd.graph.saved_tensors_hooks(pack_gm, unpack_gm)]
            self._previous_eager = getattr(_local, "eager", None)
            _local.eager = eager
        entered = []
        try:
            for context in contexts:
                context.__enter__()
                entered.append(context)
        except BaseException:
            self._unwind(entered, None, None, None)
            raise
        self._contexts = entered
        return opts

    def __exit__(self, *exc: Any) -> None:
        contexts, self._contexts = self._contexts, None
        if contexts is not None:
            self._unwind(contexts, *exc)

    def _unwind(self, contexts: list, *exc: Any) -> None:
        try:
            for context in reversed(contexts):
                context.__exit__(*exc)
        finally:
            if self.options.mode != "lossless":
                _local.eager = self._previous_eager
