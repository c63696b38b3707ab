"""What every framework integration shares for gradient and optimizer-state memory: reading the
optimizer setting (``adamw8bit`` / ``adamw4bit``), turning the framework's ``torch.optim.AdamW``
into ``ciuic.optim.AdamW`` with the same hyperparameters, and fusing the update into backward with
the checks a framework's config allows.

Which setting turns on what (the same in Lightning, Accelerate and the HF Trainer):

===================  ==========================================================================
``adamw8bit``        ``ciuic.optim.AdamW(state_bits=8)`` built from the framework's AdamW by
                     ``AdamW.from_torch`` (lr, betas, eps, weight decay, parameter groups, LR
                     scheduler all kept); bf16 parameters are updated with stochastic rounding
``adamw4bit``        the same with 4-bit moments
fuse update          ``ciuic.optim.fuse_into_backward``: each parameter is updated in backward and
                     its gradient freed; refused (ValueError) with gradient accumulation, gradient
                     clipping or fp16 loss scaling, which need every gradient before the step
===================  ==========================================================================

``ciuic`` is imported inside functions only (as in ``_common``).
"""

from __future__ import annotations

import os
from typing import Any, Iterable

# Launchers set these for their child processes (``ciuic-accelerate launch --ciuic_optim``).
ENV_OPTIM = "CIUIC_OPTIM"
ENV_FUSE_UPDATE = "CIUIC_FUSE_UPDATE"

# optimizer setting -> bits of the AdamW moments
OPTIMIZERS = {"adamw8bit": 8, "adamw4bit": 4}
_OFF = ("", "off", "none", "no", "false", "0")
_TRUE = ("1", "true", "yes", "on")


def parse_optimizer(value: Any, what: str = "optimizer") -> str | None:
    """``"adamw8bit"`` / ``"adamw4bit"`` (any case), or None for None/"off"/"none". Anything else
    raises ValueError naming the allowed values; ``what`` names the flag in the message."""
    if value is None or value is False:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _OFF:
            return None
        if text in OPTIMIZERS:
            return text
    allowed = ", ".join(repr(name) for name in OPTIMIZERS)
    raise ValueError(f"{what}={value!r} is not valid; allowed: {allowed}, or None / 'off'")


def parse_flag(value: Any, what: str) -> bool:
    """A boolean from a bool or an environment/command-line string."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _OFF:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{what}={value!r} is not valid; allowed: True, False (or 1/0, true/false)")


def optimizer_from_env() -> tuple[str | None, bool]:
    """(optimizer setting, fuse update) from ``CIUIC_OPTIM`` / ``CIUIC_FUSE_UPDATE``."""
    name = parse_optimizer(os.environ.get(ENV_OPTIM), ENV_OPTIM)
    fuse = parse_flag(os.environ.get(ENV_FUSE_UPDATE) or "0", ENV_FUSE_UPDATE)
    return name, fuse


def convert_optimizer(optimizer: Any, name: str, *, bf16_stochastic_round: bool | None = None) -> Any:
    """``ciuic.optim.AdamW`` equivalent of ``optimizer`` (a ``torch.optim.AdamW``) for setting
    ``name``; a ciuic AdamW with the same state bits is returned as it is.

    The new optimizer shares the old one's parameter-group dicts, so an LR scheduler already built
    on the old optimizer still sets the learning rate the new one uses (call ``retarget_scheduler``
    where the framework gives access to the scheduler, to move it entirely). ``bf16_stochastic_round``:
    default True when any parameter is bf16 (there is no fp32 master copy to round from).
    Raises TypeError for any other optimizer type (naming it) instead of silently keeping it.
    """
    import torch

    from ciuic.optim import AdamW

    bits = OPTIMIZERS[parse_optimizer(name)]
    if isinstance(optimizer, AdamW):
        have = {g["state_bits"] for g in optimizer.param_groups}
        if have != {bits}:
            raise ValueError(f"the optimizer is already a ciuic.optim.AdamW with state_bits={sorted(have)}, but "
                             f"{name!r} asks for state_bits={bits}; pass one of them")
        return optimizer
    decoupled = isinstance(optimizer, torch.optim.AdamW) or (
        isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("decoupled_weight_decay", False))
    if not decoupled:
        raise TypeError(
            f"ciuic optimizer {name!r} replaces a torch.optim.AdamW, but the training code built a "
            f"{type(optimizer).__module__}.{type(optimizer).__name__}; return torch.optim.AdamW (or "
            f"ciuic.optim.AdamW) from the training code, or turn the ciuic optimizer setting off"
        )
    if bf16_stochastic_round is None:
        bf16_stochastic_round = any(p.dtype == torch.bfloat16 for g in optimizer.param_groups for p in g["params"])
    ours = AdamW.from_torch(optimizer, state_bits=bits, bf16_stochastic_round=bf16_stochastic_round)
    # Share the group dicts: schedulers holding the old optimizer keep driving ours.
    for old_group, new_group in zip(optimizer.param_groups, ours.param_groups):
        old_group.clear()
        old_group.update(new_group)
    ours.param_groups = optimizer.param_groups
    ours._param_index = None
    optimizer._ciuic_replaced_by = ours
    return ours


def retarget_scheduler(scheduler: Any, old: Any, new: Any) -> None:
    """Point an LR scheduler built on ``old`` at ``new`` (after ``convert_optimizer``)."""
    if scheduler is not None and getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new
        new._opt_called = getattr(old, "_opt_called", False)
        _track_step(new)


def _track_step(optimizer: Any) -> None:
    """What ``torch.optim.lr_scheduler.LRScheduler`` does to the optimizer it is built on: wrap
    ``step`` so that ``_opt_called`` records a step (else schedulers warn that step was overridden)."""
    import functools
    import weakref

    step = optimizer.step
    if hasattr(step, "_wrapped_by_lr_sched") or not hasattr(step, "__func__"):
        return
    func, ref = step.__func__, weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = ref()
        opt._opt_called = True
        return func.__get__(opt, opt.__class__)(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def check_fusable(*, accumulation_steps: int = 1, clipping: Any = None, loss_scaling: bool = False,
                  where: str = "") -> None:
    """Raise ValueError when the framework's config needs every gradient before the update."""
    suffix = f" ({where})" if where else ""
    if accumulation_steps != 1:
        raise ValueError(
            f"the ciuic update fused into backward cannot accumulate gradients over {accumulation_steps} "
            f"micro-batches{suffix}: every backward would update the weights. Set gradient accumulation to 1 "
            "or turn fuse_update off")
    if clipping:
        raise ValueError(
            f"the ciuic update fused into backward cannot clip gradients (clipping={clipping!r}){suffix}: the "
            "global norm needs every gradient before any update. Turn clipping off (e.g. gradient_clip_val=None, "
            "--max_grad_norm 0) or turn fuse_update off")
    if loss_scaling:
        raise ValueError(
            f"the ciuic update fused into backward cannot be used with fp16 loss scaling (GradScaler){suffix}: "
            "the scaler checks every gradient before the step. Use bf16 (mixed or true) or turn fuse_update off")


def fuse(optimizers: Iterable[Any]) -> list:
    """``ciuic.optim.fuse_into_backward`` for each optimizer; returns the handles."""
    from ciuic.optim import fuse_into_backward

    return [fuse_into_backward(optimizer) for optimizer in optimizers]


def describe_optimizer(name: str | None, fuse_update: bool) -> str:
    """One line for logs: what the optimizer setting turned on."""
    if name is None:
        return "ciuic: optimizer unchanged" + (" (update fused into backward)" if fuse_update else "")
    return (f"ciuic: {name} (ciuic.optim.AdamW, state_bits={OPTIMIZERS[name]})"
            + (", update fused into backward" if fuse_update else ""))
