"""The optimizer step fused into backward: each parameter is updated as soon as its gradient is
ready, and the gradient is freed at once, so the full set of gradients never exists.

This follows PyTorch's "How to save memory by fusing the optimizer step into the backward pass"
tutorial (``Tensor.register_post_accumulate_grad_hook``), for a whole optimizer at once.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch

from ..policy import wide_norm
from .adamw import AdamW


class FusedBackwardHandle:
    """What ``fuse_into_backward`` returns: ``.remove()`` (or leaving a ``with`` block) undoes it.

    Attributes: ``optimizer``; ``updates`` (parameter updates run in backward so far).
    With ``fuse_into_backward(..., track_grad_norm=True)``, ``grad_norm()`` gives the global norm
    of the gradients applied since the last ``optimizer.step()``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, track_grad_norm: bool = False) -> None:
        self.optimizer = optimizer
        self.updates = 0
        self.active = True
        self.track_grad_norm = track_grad_norm
        self._square_sum: torch.Tensor | None = None  # sum of squared gradient norms since the last step()
        self._hooks: list[Any] = []
        self._since_step: dict[int, int] = {}  # parameter id -> updates since the last optimizer.step()
        self._warned = False
        self._step_attr: Any = None

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients the fused updates applied since the last
        ``optimizer.step()`` (what ``torch.nn.utils.clip_grad_norm_(params, max_norm=inf)`` would return
        before the step without fusing, but each parameter's norm taken in fp32 for fp16/bf16
        gradients): a 0-dim tensor on the first gradient's device, 0 when none was applied yet.
        Reading it does not synchronize a GPU. Needs ``track_grad_norm=True``."""
        if not self.track_grad_norm:
            raise RuntimeError("grad_norm() needs fuse_into_backward(optimizer, track_grad_norm=True): the gradients "
                               "are freed inside backward, so their norm is only known if it is taken there")
        return torch.zeros(()) if self._square_sum is None else self._square_sum.sqrt()

    def remove(self) -> None:
        """Unregister the hooks and give ``optimizer.step`` back its normal behaviour."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.active = False
        opt = self.optimizer
        if "step" in opt.__dict__ and getattr(opt.__dict__["step"], "__func__", None) is getattr(
                self._step_attr, "__func__", self):
            del opt.__dict__["step"]
        if getattr(opt, "_ciuic_fused_handle", None) is self:
            del opt._ciuic_fused_handle

    def __enter__(self) -> "FusedBackwardHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _update_one(optimizer: torch.optim.Optimizer, p: torch.Tensor, group_index: int) -> None:
    """Run ``optimizer``'s update for ``p`` alone (with ``p.grad``), reading the group's current
    hyperparameters (so LR schedulers keep working)."""
    group = optimizer.param_groups[group_index]
    if isinstance(optimizer, AdamW):
        with torch.no_grad():
            optimizer._update(p, group, p.grad)
        return
    # Any other torch optimizer: its own step over a view of the groups holding only ``p``.
    saved = [g["params"] for g in optimizer.param_groups]
    try:
        for g in optimizer.param_groups:
            g["params"] = []
        group["params"] = [p]
        type(optimizer).step(optimizer)
    finally:
        for g, params in zip(optimizer.param_groups, saved):
            g["params"] = params


def fuse_into_backward(optimizer: torch.optim.Optimizer, *, accumulation_steps: int = 1,
                       track_grad_norm: bool = False) -> FusedBackwardHandle:
    """Run ``optimizer``'s update of each parameter inside ``backward()``, as soon as that
    parameter's gradient is accumulated, and free the gradient right after: at most about two
    parameters' gradients are alive during backward instead of all of them.

    Works with ``ciuic.optim.AdamW`` and with torch optimizers (for those, each parameter is
    stepped on its own through the optimizer's ``step``; ``foreach``/``fused`` batching across
    parameters is lost). The optimizer keeps its ``param_groups`` and ``state``: LR schedulers,
    ``state_dict``/``load_state_dict`` and checkpoints work as before.

    After fusing, ``optimizer.step(closure=None)`` does no update (it already happened in backward):
    it calls ``closure`` if given (Lightning passes one that runs forward and backward), warns
    once, and checks that no parameter was updated more than once since the previous ``step()``.
    ``zero_grad()`` works as usual (the gradients are already None).

    What cannot work with the update in backward, and what to do instead:
      * gradient accumulation (several backward passes per optimizer step): each backward would
        update the weights. Detected: ``optimizer.step()`` raises if a parameter was updated more
        than once since the previous call. Use the unfused optimizer for accumulation.
      * clipping by the global gradient norm (``clip_grad_norm_``) needs every gradient before
        any update; gradients are None by the time you could call it. Not detectable from here:
        don't fuse when you clip by global norm.
      * ``torch.amp.GradScaler`` (fp16 loss scaling) unscales and checks gradients before the
        step; with the update in backward it would see none. Use bf16 autocast instead.
    ``accumulation_steps`` other than 1 raises ``ValueError`` (low-bit accumulation buffers are not
    implemented).

    ``track_grad_norm=True`` takes each gradient's norm before it is freed (one reduction per
    parameter), so that ``handle.grad_norm()`` can report the global gradient norm for logging
    (the Hugging Face Trainer's ``grad_norm`` uses it); it cannot clip.

    Returns a ``FusedBackwardHandle``; ``handle.remove()`` restores the normal behaviour.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fuse_into_backward needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if accumulation_steps != 1:
        raise ValueError(
            f"accumulation_steps={accumulation_steps!r} is not supported with the update fused into backward; "
            "allowed: 1. For gradient accumulation, use the optimizer unfused (backward k times, then step())."
        )
    if getattr(optimizer, "_ciuic_fused_handle", None) is not None:
        raise RuntimeError("this optimizer is already fused into backward; call handle.remove() first")
    if not isinstance(track_grad_norm, bool):
        raise TypeError(f"track_grad_norm={track_grad_norm!r} is not valid; allowed: True, False")
    handle = FusedBackwardHandle(optimizer, track_grad_norm)
    seen: set[int] = set()
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))

            def hook(param: torch.Tensor, index: int = index) -> None:
                if not handle.active or param.grad is None:
                    return
                if handle.track_grad_norm:
                    square = wide_norm(param.grad.detach()).square()
                    total = handle._square_sum
                    handle._square_sum = square if total is None else total + square.to(total.device)
                _update_one(optimizer, param, index)
                param.grad = None
                handle.updates += 1
                handle._since_step[id(param)] = handle._since_step.get(id(param), 0) + 1
                optimizer._opt_called = True  # LR schedulers check that the optimizer stepped

            handle._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def fused_step(self, closure=None):
        if not handle.active:
            return type(self).step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        repeated = max(handle._since_step.values(), default=0)
        handle._since_step.clear()
        handle._square_sum = None
        if repeated > 1:
            raise RuntimeError(
                f"a parameter was updated {repeated} times since the previous optimizer.step(): with the update "
                "fused into backward every backward() updates the weights, so gradient accumulation cannot work. "
                "Remove fuse_into_backward (handle.remove()) to accumulate gradients."
            )
        if not handle._warned:
            handle._warned = True
            warnings.warn("optimizer.step() does nothing after ciuic.optim.fuse_into_backward: parameters are "
                          "updated during backward()", UserWarning, stacklevel=2)
        return loss

    # a bound method, so LR schedulers can wrap it (they read ``step.__func__``)
    handle._step_attr = types.MethodType(fused_step, optimizer)
    optimizer.step = handle._step_attr
    optimizer._ciuic_fused_handle = handle
    return handle
