"""Memory-lean language-model head: linear + cross-entropy without the full logits.

The LM head is usually the largest activation a causal LM keeps for backward: ``F.linear`` produces
``B*T x V`` logits, the loss upcasts them to fp32 and ``log_softmax`` saves that fp32 copy. With a
vocabulary of 128k and 8k tokens that is 4 GiB for one tensor.

``linear_cross_entropy`` follows Liger-Kernel's fused linear cross-entropy
(https://github.com/linkedin/Liger-Kernel, ``ops/fused_linear_cross_entropy.py``): the rows of
``hidden`` are processed in chunks; for each chunk the logits are computed, the loss and the
gradient of the loss w.r.t. the logits, ``softmax(z) - onehot(y)``, are formed in fp32, and that
gradient is immediately contracted with ``weight`` and ``hidden``. Only ``grad_hidden`` (``B*T x H``),
``grad_weight`` (``V x H``) and ``grad_bias`` (``V``) survive the forward pass; backward just scales
them by the incoming gradient. Peak extra memory is one chunk of logits, sized by default to be
about as large as ``hidden``.

``ciuic_integrations.transformers.apply_lean_lm_head(model)`` (also ``ciuic.apply_lean_lm_head``)
patches a transformers ``*ForCausalLM`` instance so that a training forward with ``labels`` uses it
(and returns ``logits=None``, as Liger does); the model-specific code lives there.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["linear_cross_entropy"]

_REDUCTIONS = ("mean", "sum")


def _keep_exact(tensor):
    """Tell the activation engine to keep ``tensor`` exactly (and count it) when it is saved.

    Resolved lazily: the engine imports this package, and may not define ``keep_exact`` at all in an
    older version, in which case the tensor is saved as is.
    """
    if tensor is None:
        return None
    try:
        engine = importlib.import_module("ciuic.engine")
    except ImportError:
        return tensor
    keep_exact = getattr(engine, "keep_exact", None)
    return tensor if keep_exact is None else keep_exact(tensor)


def _default_chunk_size(rows, vocab_size, hidden_size):
    # Liger's rule: a chunk's logits (chunk x V) are about the size of hidden (BT x H).
    chunks = max(1, math.ceil(vocab_size / max(hidden_size, 1)))
    rows_per_chunk = max(1, math.ceil(rows / chunks))
    return 1 << (rows_per_chunk - 1).bit_length()


def _compute_dtype(hidden, weight):
    """The dtype of the matmul: the autocast dtype if autocast is on, as ``F.linear`` would use."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked ``cross_entropy(linear(hidden, weight, bias).float(), labels)`` with gradients computed
    in forward.

    For a row with logits ``z`` (fp32, optionally soft-capped ``z = c * tanh(z' / c)``) and label ``y``:
    ``loss = logsumexp(z) - z[y]`` and ``dloss/dz = softmax(z) - onehot(y)`` (times ``1 - tanh^2`` under
    the cap). Rows whose label is ``ignore_index`` contribute nothing. The summed loss is multiplied by
    ``scale`` (1 for "sum", 1 / #valid labels for "mean", 1 / num_items_in_batch), and so are the
    gradients: ``grad_hidden = G @ W`` and ``grad_weight = G^T @ hidden`` (fp32 accumulation over
    chunks), ``grad_bias = sum_rows G``, where ``G`` is cast to the matmul dtype as autograd would.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, scale, chunk_size, logit_softcap,
                compute_dtype):
        rows, _ = hidden.shape
        vocab_size = weight.shape[0]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_bias = need_bias and bias is not None

        # Explicit casts replace autocast inside the loop so every op runs in a known dtype.
        weight_c = weight.to(compute_dtype)
        bias_c = None if bias is None else bias.to(compute_dtype)
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0)
        row_scale = torch.where(valid, scale, 0.0).float()  # ignored rows get exactly zero gradient

        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab_size, dtype=torch.float32, device=bias.device) if need_bias else None
        weight_chunk_buffer = None

        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows, chunk_size):
                end = min(start + chunk_size, rows)
                hidden_c = hidden[start:end].to(compute_dtype)
                target = safe_labels[start:end, None]
                logits = F.linear(hidden_c, weight_c, bias_c).float()
                if logit_softcap is not None:
                    tanh = torch.tanh(logits / logit_softcap)
                    logits = tanh * logit_softcap
                lse = torch.logsumexp(logits, dim=-1)
                row_loss = lse - logits.gather(1, target).squeeze(1)
                loss_sum += torch.where(valid[start:end], row_loss, 0.0).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue

                # softmax - onehot, built in the logits buffer to keep one chunk-sized fp32 tensor.
                grad = logits.sub_(lse[:, None]).exp_()
                grad.scatter_add_(1, target, torch.full_like(grad[:, :1], -1.0))
                grad.mul_(row_scale[start:end, None])
                if logit_softcap is not None:
                    grad.mul_(1.0 - tanh * tanh)
                if need_bias:
                    grad_bias += grad.sum(0)
                grad_c = grad.to(compute_dtype)
                if need_hidden:
                    if grad_hidden.dtype == compute_dtype:
                        torch.mm(grad_c, weight_c, out=grad_hidden[start:end])
                    else:
                        grad_hidden[start:end] = grad_c @ weight_c
                if need_weight:
                    if compute_dtype == torch.float32:
                        grad_weight.addmm_(grad_c.t(), hidden_c)
                    else:
                        # addmm_ cannot mix dtypes: one reused low-precision buffer, summed in fp32.
                        if weight_chunk_buffer is None:
                            weight_chunk_buffer = torch.empty(weight.shape, dtype=compute_dtype, device=weight.device)
                        grad_weight += torch.mm(grad_c.t(), hidden_c, out=weight_chunk_buffer)

        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        ctx.save_for_backward(_keep_exact(grad_hidden), _keep_exact(grad_weight), _keep_exact(grad_bias))
        return loss_sum * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        # The usual case (loss.backward()) needs no copy; Liger skips the multiply the same way.
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            saved = tuple(None if g is None else g * grad_output.to(g.dtype) for g in saved)
        grad_hidden, grad_weight, grad_bias = saved
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean",
                         chunk_size=None, shift=False, num_items_in_batch=None, logit_softcap=None):
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), labels)`` without the full logits.

    Args:
        hidden: ``(..., H)`` float tensor, e.g. a causal LM's last hidden state ``(B, T, H)``.
        weight: ``(V, H)`` LM-head weight (a Parameter, trainable or frozen).
        labels: integer tensor of shape ``hidden.shape[:-1]``; ``ignore_index`` marks rows to skip.
        bias: optional ``(V,)`` bias.
        reduction: ``"mean"`` (over non-ignored labels) or ``"sum"``.
        chunk_size: rows per chunk; default ``next_pow2(ceil(BT / ceil(V / H)))`` so a chunk's logits
            are about the size of ``hidden``.
        shift: shift labels left by one per sequence like HF's ``ForCausalLMLoss``
            (``pad(labels, (0, 1), ignore_index)[..., 1:]``), so position t predicts token t+1.
        num_items_in_batch: HF's gradient-accumulation-correct loss, ``sum / num_items_in_batch``
            (int or tensor); replaces the mean's divisor, needs ``reduction="mean"``.
        logit_softcap: if set, logits become ``c * tanh(logits / c)`` before the loss (Gemma 2).

    Returns a 0-d fp32 loss. The matmul runs in the autocast dtype when autocast is on, else in the
    inputs' dtype; logits, softmax and loss are fp32. Gradients are computed during this call and only
    they are kept for backward (``B*T x H`` + ``V x H`` + ``V``), so ``create_graph`` is not supported.
    Like ``F.cross_entropy``, a mean over zero valid labels is NaN with zero gradients.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; choose one of {_REDUCTIONS}")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., H) and weight (V, H) do not match: {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the summed loss (HF's mean over the whole batch); "
                         f"it needs reduction='mean', got reduction={reduction!r}")
    if logit_softcap is not None and not logit_softcap > 0:
        raise ValueError(f"logit_softcap must be a positive number or None, got {logit_softcap!r}")

    labels = labels.to(device=hidden.device, dtype=torch.long)
    if shift:
        if labels.dim() == 0:
            raise ValueError("shift=True needs labels with a sequence dimension, got a 0-d tensor")
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    labels_1d = labels.reshape(-1)
    vocab_size, hidden_size = weight.shape

    valid = labels_1d != ignore_index
    out_of_range = valid & ((labels_1d < 0) | (labels_1d >= vocab_size))
    if bool(out_of_range.any()):
        bad = labels_1d[out_of_range][0].item()
        raise ValueError(f"label {bad} is out of range [0, {vocab_size}) and is not ignore_index={ignore_index}")

    if reduction == "sum":
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
    elif num_items_in_batch is not None:
        count = torch.as_tensor(num_items_in_batch, device=hidden.device)
        scale = 1.0 / count.to(torch.float32)
    else:
        scale = 1.0 / valid.sum().to(torch.float32)  # a tensor: no host sync

    if chunk_size is None:
        chunk_size = _default_chunk_size(hidden_2d.shape[0], vocab_size, hidden_size)
    compute_dtype = _compute_dtype(hidden, weight)
    return _LinearCrossEntropyFunction.apply(hidden_2d, weight, bias, labels_1d, ignore_index, scale,
                                             chunk_size, logit_softcap, compute_dtype)
