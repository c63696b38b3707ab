"""Low-bit AdamW: block-wise 8/4-bit moments, one fused update kernel, optional bf16 stochastic rounding."""

from __future__ import annotations

import math
from itertools import chain
from typing import Any, Iterable

import torch

from ciuic_kernels import optim_state as _kernels

_TORCH_ONLY_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable")
# Keys of a torch.optim.AdamW group that have no meaning here (dropped by from_torch).
_TORCH_GROUP_KEYS = ("foreach", "fused", "capturable", "differentiable", "maximize", "amsgrad",
                     "decoupled_weight_decay")


def _is_real_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _check_group(group: dict) -> None:
    """Validate one parameter group's hyperparameters; errors name the bad value and the allowed ones."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr={lr!r} is not valid; allowed: a number >= 0 or a one-element tensor")
        lr = float(lr)
    if not _is_real_number(lr) or lr < 0:
        raise ValueError(f"lr={group['lr']!r} is not valid; allowed: a finite number >= 0")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_is_real_number(b) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"betas={betas!r} is not valid; allowed: a pair (beta1, beta2), each in [0, 1)")
    for name in ("eps", "weight_decay"):
        value = group[name]
        if not _is_real_number(value) or value < 0:
            raise ValueError(f"{name}={value!r} is not valid; allowed: a finite number >= 0")
    bits = group["state_bits"]
    if bits not in _kernels.STATE_BITS or isinstance(bits, bool):
        raise ValueError(f"state_bits={bits!r} is not valid; allowed: 8, 4, or 32 (fp32 moments)")
    block = group["block_size"]
    if block is not None and (isinstance(block, bool) or block not in _kernels.BLOCK_SIZES):
        raise ValueError(
            f"block_size={block!r} is not valid; allowed: None (256 at 8 bits, 128 at 4 bits), "
            + ", ".join(map(str, _kernels.BLOCK_SIZES))
        )
    if not isinstance(group["bf16_stochastic_round"], bool):
        raise ValueError(f"bf16_stochastic_round={group['bf16_stochastic_round']!r} is not valid; allowed: True, False")
    limit = group["min_quantized_numel"]
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise ValueError(f"min_quantized_numel={limit!r} is not valid; allowed: an int >= 0")


def _layout(p: torch.Tensor, group: dict) -> tuple[int, int]:
    """(bits, block size) of ``p``'s moments under ``group``: 32 for small tensors."""
    bits = group["state_bits"]
    if bits == 32 or p.numel() < group["min_quantized_numel"] or p.numel() == 0:
        return 32, 0
    return bits, group["block_size"] or _kernels.DEFAULT_BLOCK_SIZE[bits]


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) with block-wise 8- or 4-bit moments.

    The math is ``torch.optim.AdamW``'s (``amsgrad=False``, ``maximize=False``). Each moment of a
    parameter with at least ``min_quantized_numel`` elements is kept as 8- or 4-bit codes with one
    fp32 absmax scale per ``block_size`` elements (Dettmers et al. 2022; first moment: signed
    dynamic-tree map; second moment: unsigned dynamic-tree map at 8 bits, linear map without zero
    at 4 bits, Li et al. 2023); smaller parameters keep fp32 moments. State bytes per parameter
    element: 2.03 at 8 bits (block 256) and 1.06 at 4 bits (block 128), vs 8 for fp32 moments.
    The whole update (dequantize, Adam, weight decay, write-back, re-quantize) is one kernel per
    parameter: Triton on CUDA, the PyTorch reference (``ciuic_kernels.optim_state``) elsewhere; no
    ``torch.compile`` needed.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``. Every
            option below may also be set per group.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (``lr`` a float, or a one-element
            tensor read each step).
        state_bits: 8 or 4 (quantized moments), or 32 (fp32 moments everywhere: the same fused
            kernel with torch's math, useful as a control).
        bf16_stochastic_round: for bf16 parameters: compute the update in fp32 and write it back
            with stochastic rounding (counter-based RNG from ``ciuic_kernels._rng``; torch's global
            RNG is never touched), so bf16 weights train without an fp32 master copy. When False, bf16
            (and fp16) parameters are written back rounded to nearest, and updates smaller than half
            a bf16 ulp of the weight are lost, as with ``torch.optim.AdamW`` on bf16 weights. No
            effect on fp32/fp16 parameters.
        block_size: elements per quantization block, one of 64, 128, 256, 512; None picks 256 at 8
            bits and 128 at 4 bits (the bitsandbytes / torchao choices).
        min_quantized_numel: parameters with fewer elements keep fp32 moments (default 4096, as
            bitsandbytes and torchao).

    ``state_dict()`` holds plain tensors (uint8 codes, fp32 scales, fp32 moments, the step) and
    Python numbers only, so it loads with ``torch.load(..., weights_only=True)``; ``load_state_dict``
    keeps the saved dtypes (``torch.optim.Optimizer`` would cast them to the parameter's dtype) and
    also accepts a ``torch.optim.AdamW`` state dict (its moments are quantized on the next step).
    See ``from_torch`` / ``to_torch`` for converting optimizers.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, state_bits: int = 8, bf16_stochastic_round: bool = False,
                 block_size: int | None = None, min_quantized_numel: int = 4096) -> None:
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, state_bits=state_bits, block_size=block_size,
                        bf16_stochastic_round=bf16_stochastic_round, min_quantized_numel=min_quantized_numel)
        _check_group(defaults)
        self._param_index: dict[torch.Tensor, int] | None = None
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:  # unpickling skips __init__
        super().__setstate__(state)
        self._param_index = None

    # -- groups ------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        try:
            _check_group(group)
        except ValueError:
            self.param_groups.pop()
            raise
        for p in group["params"]:
            if not p.is_floating_point():
                self.param_groups.pop()
                raise ValueError(f"a parameter of dtype {p.dtype} is not valid; allowed: floating point "
                                 "(float32, bfloat16, float16) real tensors")
        self._param_index = None

    def _index_of(self, p: torch.Tensor) -> int:
        """Position of ``p`` over all groups (stable across save/load; seeds stochastic rounding)."""
        if self._param_index is None:
            self._param_index = {q: i for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups))}
        return self._param_index[p]

    # -- state -------------------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, bits: int, block: int, exp_avg: torch.Tensor | None = None,
                    exp_avg_sq: torch.Tensor | None = None, step: torch.Tensor | None = None) -> dict:
        """A fresh state for ``p`` in layout (bits, block), from fp32 moments if given (else zeros)."""
        dev = p.device
        state: dict[str, Any] = {
            "step": step.detach().to(torch.float32).cpu().clone() if step is not None else torch.tensor(0.0),
            "state_bits": bits,
        }
        if bits == 32:
            state["exp_avg"] = (torch.zeros(p.shape, dtype=torch.float32, device=dev) if exp_avg is None
                                else exp_avg.detach().to(device=dev, dtype=torch.float32).reshape(p.shape).clone())
            state["exp_avg_sq"] = (torch.zeros(p.shape, dtype=torch.float32, device=dev) if exp_avg_sq is None
                                   else exp_avg_sq.detach().to(device=dev, dtype=torch.float32).reshape(p.shape).clone())
        else:
            state["block_size"] = block
            n = p.numel()
            for name, signed, value in (("exp_avg", True, exp_avg), ("exp_avg_sq", False, exp_avg_sq)):
                if value is None:
                    codes = torch.zeros(_kernels.code_bytes(n, bits), dtype=torch.uint8, device=dev)
                    scale = torch.zeros(_kernels.num_blocks(n, block), dtype=torch.float32, device=dev)
                else:
                    codes, scale = _kernels.quantize_state(value.to(dev), signed=signed, bits=bits, block_size=block)
                state[f"{name}_codes"] = codes
                state[f"{name}_scale"] = scale
        return state

    def _moments_fp32(self, p: torch.Tensor, state: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(exp_avg, exp_avg_sq) of ``p`` as fp32 tensors shaped like ``p`` (dequantized if needed)."""
        if "exp_avg_codes" in state:
            bits, block = state["state_bits"], state["block_size"]
            out = []
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                flat = _kernels.dequantize_state(state[f"{name}_codes"], state[f"{name}_scale"], signed=signed,
                                                 bits=bits, block_size=block, numel=p.numel())
                out.append(flat.view(p.shape))
            return out[0], out[1]
        return (state["exp_avg"].to(torch.float32).reshape(p.shape), state["exp_avg_sq"].to(torch.float32).reshape(p.shape))

    def _prepared_state(self, p: torch.Tensor, group: dict) -> dict:
        """``p``'s state in the layout its group asks for (created, converted or checked)."""
        bits, block = _layout(p, group)
        state = self.state[p]
        if not state:
            state.update(self._init_state(p, bits, block))
            return state
        have_bits = state.get("state_bits", 32 if "exp_avg" in state else None)
        if have_bits is None:
            raise RuntimeError(f"optimizer state of a parameter of shape {tuple(p.shape)} has keys {sorted(state)}; "
                               "expected ciuic.optim.AdamW or torch.optim.AdamW state")
        state.setdefault("state_bits", have_bits)  # a torch.optim.AdamW state: fp32 moments
        consistent = have_bits == bits and (bits == 32 or state.get("block_size") == block)
        if consistent and bits == 32:
            consistent = all(state[k].dtype == torch.float32 and state[k].device == p.device
                             and state[k].is_contiguous() and state[k].numel() == p.numel()
                             for k in ("exp_avg", "exp_avg_sq"))
        elif consistent:
            n = p.numel()
            consistent = (state["exp_avg_codes"].numel() == _kernels.code_bytes(n, bits)
                          and state["exp_avg_scale"].numel() == _kernels.num_blocks(n, block)
                          and state["exp_avg_codes"].device == p.device
                          and state["exp_avg_scale"].dtype == torch.float32)
        if not consistent:  # another layout (changed group options, a torch AdamW state, another device)
            m, v = self._moments_fp32(p, state)
            step = state["step"] if isinstance(state["step"], torch.Tensor) else torch.tensor(float(state["step"]))
            state.clear()
            state.update(self._init_state(p, bits, block, m, v, step))
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping each saved state tensor's dtype.

        The base class casts floating state tensors to the parameter's dtype (bf16 parameters would
        get bf16 scales and moments); the saved tensors are put back as they were saved.
        """
        saved = {pid: {k: v for k, v in st.items() if isinstance(v, torch.Tensor) and k != "step"}
                 for pid, st in state_dict.get("state", {}).items()}
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            for key, value in saved.get(pid, {}).items():
                self.state[p][key] = value.to(device=p.device, copy=True)
        for i, group in enumerate(self.param_groups):  # a torch.optim.AdamW state dict lacks our options
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for option in _TORCH_ONLY_OPTIONS[:2]:
                if group.get(option, False):
                    raise ValueError(f"loaded param_groups[{i}] has {option}=True, which ciuic.optim.AdamW does not "
                                     f"implement; allowed: {option}=False")
            _check_group(group)
        self._param_index = None

    # -- the update --------------------------------------------------------------------------------

    def _update(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        """One AdamW step of parameter ``p`` with ``grad`` (used by ``step`` and ``fuse_into_backward``)."""
        if grad.is_sparse:
            raise RuntimeError("ciuic.optim.AdamW does not support sparse gradients; use torch.optim.SparseAdam")
        if grad.dtype != p.dtype and grad.dtype != torch.float32:
            grad = grad.to(torch.float32)
        state = self._prepared_state(p, group)
        state["step"] += 1
        step = int(state["step"].item())
        lr = float(group["lr"]) if isinstance(group["lr"], torch.Tensor) else group["lr"]
        beta1, beta2 = group["betas"]
        bits = state["state_bits"]
        seed = (step << 32) | self._index_of(p)
        if bits == 32:
            tensors = (state["exp_avg"], state["exp_avg_sq"], None, None)
            block = _kernels.DEFAULT_BLOCK_SIZE[8]  # unused at 32 bits
        else:
            tensors = (state["exp_avg_codes"], state["exp_avg_sq_codes"], state["exp_avg_scale"],
                       state["exp_avg_sq_scale"])
            block = state["block_size"]
        _kernels.adamw_update(p.detach(), grad, *tensors, bits=bits, block_size=block, lr=lr, beta1=beta1,
                              beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=step,
                              stochastic_round=group["bf16_stochastic_round"], seed=seed)

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter is not in this optimizer")

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter that has a gradient; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_group(group)
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, p.grad)
        return loss

    # -- conversions -------------------------------------------------------------------------------

    @classmethod
    def from_torch(cls, optimizer: torch.optim.Optimizer, state_bits: int = 8, **kwargs) -> "AdamW":
        """A ``ciuic.optim.AdamW`` with ``optimizer``'s parameter groups, hyperparameters and
        quantized copies of its moments (step counts kept).

        ``optimizer`` must be a ``torch.optim.AdamW`` (or ``torch.optim.Adam`` with
        ``decoupled_weight_decay=True``) without ``amsgrad`` or ``maximize``. Extra group keys
        (``initial_lr`` of a scheduler, your own) are kept. ``kwargs``: the keyword-only options
        of ``AdamW`` (``bf16_stochastic_round``, ``block_size``, ``min_quantized_numel``).
        Create LR schedulers for the new optimizer after converting.
        """
        decoupled = isinstance(optimizer, torch.optim.AdamW) or (
            isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("decoupled_weight_decay", False))
        if not decoupled:
            raise TypeError(f"from_torch needs a torch.optim.AdamW, got {type(optimizer).__name__}")
        unknown = set(kwargs) - {"bf16_stochastic_round", "block_size", "min_quantized_numel"}
        if unknown:
            raise TypeError(f"from_torch got unexpected options {sorted(unknown)}; allowed: bf16_stochastic_round, "
                            "block_size, min_quantized_numel")
        groups = []
        for i, group in enumerate(optimizer.param_groups):
            for option in _TORCH_ONLY_OPTIONS[:2]:
                if group.get(option, False):
                    raise ValueError(f"param_groups[{i}] has {option}=True, which ciuic.optim.AdamW does not "
                                     f"implement; allowed: {option}=False")
            new = {k: v for k, v in group.items() if k not in _TORCH_GROUP_KEYS}
            if isinstance(new["lr"], torch.Tensor):
                new["lr"] = float(new["lr"])
            new["betas"] = tuple(float(b) for b in new["betas"])
            groups.append(new)
        d = optimizer.defaults
        lr = float(d["lr"]) if isinstance(d["lr"], torch.Tensor) else d["lr"]
        ours = cls(groups, lr=lr, betas=tuple(d["betas"]), eps=d["eps"], weight_decay=d["weight_decay"],
                   state_bits=state_bits, **kwargs)
        for group in ours.param_groups:
            for p in group["params"]:
                theirs = optimizer.state.get(p)
                if not theirs or "exp_avg" not in theirs:
                    continue
                bits, block = _layout(p, group)
                step = theirs["step"] if isinstance(theirs["step"], torch.Tensor) else torch.tensor(float(theirs["step"]))
                ours.state[p] = ours._init_state(p, bits, block, theirs["exp_avg"], theirs["exp_avg_sq"], step)
        return ours

    def to_torch(self, **kwargs) -> torch.optim.AdamW:
        """A ``torch.optim.AdamW`` over the same parameter groups with the dequantized moments (in
        each parameter's dtype, as torch keeps them) and the same step counts. ``kwargs`` go to
        ``torch.optim.AdamW`` (e.g. ``foreach=False``, ``fused=True``)."""
        ours_only = {"state_bits", "block_size", "bf16_stochastic_round", "min_quantized_numel"}
        groups = [{k: v for k, v in g.items() if k not in ours_only} for g in self.param_groups]
        d = self.defaults
        theirs = torch.optim.AdamW(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                   weight_decay=d["weight_decay"], **kwargs)
        for p, state in self.state.items():
            if not state:
                continue
            m, v = self._moments_fp32(p, state)
            step = state["step"] if isinstance(state["step"], torch.Tensor) else torch.tensor(float(state["step"]))
            theirs.state[p] = {"step": step.detach().to(torch.float32).cpu().clone(),
                               "exp_avg": m.to(dtype=p.dtype, device=p.device).clone(),
                               "exp_avg_sq": v.to(dtype=p.dtype, device=p.device).clone()}
        return theirs


def state_nbytes(optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in the optimizer state (``numel * element_size``, nested containers
    included); also accepts an iterable (or dict values) of optimizers."""
    if isinstance(optimizer, dict):
        optimizer = optimizer.values()
    if not isinstance(optimizer, torch.optim.Optimizer):
        return sum(state_nbytes(o) for o in optimizer)
    seen: set[int] = set()

    def count(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key in seen:
                return 0
            seen.add(key)
            if hasattr(value, "__tensor_flatten__") and type(value) is not torch.Tensor:
                # a tensor subclass (torchao's quantized states): the bytes are its inner tensors'
                names, _ = value.__tensor_flatten__()
                return sum(count(getattr(value, name)) for name in names)
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return sum(count(state) for state in optimizer.state.values())
