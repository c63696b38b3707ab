"""Hugging Face causal LMs: the memory-lean LM head (``ciuic.linear_cross_entropy`` in place of
``lm_head`` + loss), and what ``ciuic.compression(model=...)`` does to such a model.

Kept out of the core package (which knows no model names); ``import ciuic`` registers
``prepare_model`` as a model preparer without importing transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable

import torch

from ciuic.lm_head import linear_cross_entropy

# model_type -> name of the config attribute holding a final logit soft-cap (None: no cap).
# Each entry's *ForCausalLM.forward was checked on transformers 5.24 to be "base model ->
# last_hidden_state -> lm_head [-> soft-cap] -> ForCausalLMLoss" and nothing more.
SUPPORTED_MODEL_TYPES = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gemma": None,
    "gemma2": "final_logit_softcapping",
    "phi3": None,
    "olmo2": None,
    "gpt2": None,
}

_ORIGINAL = "_ciuic_lean_lm_head_original"  # instance attribute: the forward we replaced
_NO_INSTANCE_FORWARD = "class"  # marker: the instance had no forward of its own


def _lean_forward(model, *args, **kwargs):
    """The patched ``forward``: the lean loss for a training forward with labels, else the original."""
    previous = model.__dict__[_ORIGINAL]
    # Resolved per call so a deepcopy of the model (which rebinds the patched method) calls its own.
    original = functools.partial(type(model).forward, model) if isinstance(previous, str) else previous
    signature = inspect.signature(type(model).forward)
    try:
        bound = signature.bind(model, *args, **kwargs)
    except TypeError:
        return original(*args, **kwargs)  # let the original forward raise its own error
    arguments = dict(bound.arguments)
    arguments.pop("self", None)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))

    labels = arguments.pop("labels", None)
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if labels is None or not model.training or not keeps_all or not torch.is_grad_enabled():
        return original(*args, **kwargs)

    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    loss_options = {
        "num_items_in_batch": arguments.pop("num_items_in_batch", None),
        "ignore_index": arguments.pop("ignore_index", -100),
    }
    shift_labels = arguments.pop("shift_labels", None)

    outputs = model.base_model(**arguments, return_dict=True)
    head = model.get_output_embeddings()
    softcap_attribute = SUPPORTED_MODEL_TYPES[model.config.model_type]
    softcap = getattr(model.config, softcap_attribute, None) if softcap_attribute else None
    loss = linear_cross_entropy(
        outputs.last_hidden_state, head.weight, labels if shift_labels is None else shift_labels,
        head.bias, shift=shift_labels is None, logit_softcap=softcap, **loss_options)

    # The same output class the model would return, carrying the base model's extra outputs.
    output_class = _output_class(model)
    fields = {field.name for field in dataclasses.fields(output_class)}
    extras = {name: value for name, value in outputs.items() if name in fields and name not in ("loss", "logits")}
    result = output_class(loss=loss, logits=None, **extras)
    return result if return_dict else result.to_tuple()


def _output_class(model):
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast

    if model.config.model_type == "gpt2":
        return CausalLMOutputWithCrossAttentions
    return CausalLMOutputWithPast


def apply_lean_lm_head(model):
    """Patch a transformers ``*ForCausalLM`` instance (not its class) to use ``linear_cross_entropy``.

    After patching, ``model(..., labels=labels)`` in training mode (with grad enabled) computes the loss
    from the last hidden state in chunks and returns the model's usual output with ``loss`` set and
    ``logits=None``: the full logits are never built. Labels are shifted as in HF's
    ``ForCausalLMLoss`` (or ``shift_labels=`` is used as given), and ``num_items_in_batch`` (passed by
    the HF Trainer) gives the same gradient-accumulation-correct loss. Without labels, in eval mode,
    or with ``logits_to_keep`` set, the original forward runs unchanged. Returns ``model``; calling it
    twice is a no-op. Supported ``config.model_type`` values: ``SUPPORTED_MODEL_TYPES``.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"apply_lean_lm_head does not support model_type={model_type!r} "
                         f"({type(model).__name__}); supported: {sorted(SUPPORTED_MODEL_TYPES)}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if not isinstance(head, torch.nn.Linear) or base is None or base is model:
        raise ValueError(f"{type(model).__name__} has no linear LM head over a base model; "
                         f"apply_lean_lm_head expects a *ForCausalLM / *LMHeadModel instance")
    if _ORIGINAL in model.__dict__:
        return model
    # An instance-level forward (e.g. from accelerate's hooks) is kept and called; else the class's.
    setattr(model, _ORIGINAL, model.__dict__.get("forward", _NO_INSTANCE_FORWARD))

    # functools.wraps keeps the original signature visible to inspect (the HF Trainer reads it to
    # drop dataset columns and to decide whether to pass num_items_in_batch).
    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return _lean_forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)
    return model


def remove_lean_lm_head(model):
    """Undo ``apply_lean_lm_head``: restore the forward the instance had. Returns ``model``."""
    if _ORIGINAL not in model.__dict__:
        return model
    previous = model.__dict__.pop(_ORIGINAL)
    if isinstance(previous, str):
        model.__dict__.pop("forward", None)
    else:
        model.forward = previous
    return model


def prepare_model(model: Any, config: Any) -> "Callable[[], None] | None":
    """What ``ciuic.compression(model=...)`` does to a Hugging Face causal LM: the lean LM head
    (unless ``lean_lm_head=False`` or ``"lossless"``). Returns the undo, or None when nothing changed.
    The undo leaves the model alone when something else wrapped its forward on top meanwhile."""
    if not config.lean_lm_head or config.mode == "lossless":
        return None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or _ORIGINAL in getattr(model, "__dict__", {}):
        return None
    apply_lean_lm_head(model)
    patched = model.__dict__.get("forward")

    def undo() -> None:
        if model.__dict__.get("forward") is patched:
            remove_lean_lm_head(model)

    return undo
