"""Hugging Face Trainer: a ``--ciuic MODE`` training argument, as ``--use_liger_kernel`` is one.

The one line a script adds (everything else, including ``HfArgumentParser(TrainingArguments)``,
stays as it is)::

    from ciuic_integrations.transformers import CiuicTrainer as Trainer, CiuicTrainingArguments as TrainingArguments

    python train.py --ciuic 4:1 ...           # compression on
    python train.py ...                       # nothing is hooked

``CiuicTrainingArguments`` adds ``ciuic`` (mode: ``lossless``, ``2:1``, ``4:1``, ``8:1``, ``auto``;
default None = off), ``ciuic_config`` (a dict, or JSON on the command line, of further
``ciuic.CompressionConfig`` options, e.g. ``'{"mode": "auto", "budget": "12GB"}'``) and
``ciuic_report`` (``--ciuic_report DIR``: each process writes ``ciuic.memory_report()`` there,
JSON + PNG, when training ends).

``CiuicTrainer`` compresses inside ``compute_loss_context_manager``: exactly each training
micro-batch's forward, however many gradient-accumulation steps there are. Evaluation, prediction
and ``generate`` run without grad and are never hooked. The engine exists only while ``train()``
runs; so does ciuic's preparation of the model (the memory-lean LM head of causal LMs, which never
builds the full logits; ``ciuic_config={"lean_lm_head": false}`` skips it), except under mixed
precision, where accelerate wraps the forward on top of it: it then stays, acting only in training
forwards with labels.

Gradient and optimizer-state memory (``CiuicTrainer`` only; independent of ``--ciuic``):
``--ciuic_optim adamw8bit|adamw4bit`` turns the AdamW the Trainer builds (``--optim adamw_torch``
or ``adamw_torch_fused``, the default, with ``--learning_rate``, ``--adam_beta1/2``,
``--adam_epsilon``, ``--weight_decay`` and the Trainer's no-decay groups) into
``ciuic.optim.AdamW(state_bits=8|4)`` with the same settings (bf16 parameters get stochastic
rounding: no fp32 master copy); another ``--optim`` raises TypeError. ``--ciuic_fuse_update``
updates each parameter inside backward and frees its gradient; it needs ``--max_grad_norm 0``,
``--gradient_accumulation_steps 1``, no ``--fp16`` and one process (ValueError otherwise). The
logged ``grad_norm`` is then the norm of the gradients the fused updates applied (taken before each
is freed), not 0.

For a trainer class you cannot swap (e.g. a TRL trainer), ``CiuicCallback`` does the same with any
``Trainer``: ``trainer.add_callback(CiuicCallback("4:1"))`` (or ``CiuicCallback()`` to follow
``args.ciuic``). It opens the engine in ``on_step_begin`` and closes it in ``on_step_end``, which
spans every micro-batch of an optimizer step and nothing else; it does not patch the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from ._common import CompressionSession, require, resolve_config
from ._optim import check_fusable, convert_optimizer, parse_optimizer

_transformers = require("transformers", "transformers")
TrainingArguments = _transformers.TrainingArguments
Trainer = _transformers.Trainer
TrainerCallback = _transformers.TrainerCallback


@dataclass
class CiuicTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with ``--ciuic MODE`` and ``--ciuic_config JSON``."""

    ciuic: str | None = field(
        default=None,
        metadata={
            "help": "Compress the activations saved for backward with ciuic: lossless, 2:1, 4:1, 8:1 "
            "or auto (with a budget in --ciuic_config). Default: off."
        },
    )
    ciuic_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Further ciuic.CompressionConfig options as a JSON object, e.g. "
            "'{\"budget\": \"12GB\"}' or '{\"group_size\": 128, \"lean_lm_head\": false}'."
        },
    )

    ciuic_report: str | None = field(
        default=None,
        metadata={
            "help": "Folder where each process writes ciuic's memory report (ciuic_report.json and "
            "ciuic_report.png: bytes kept for backward per module, codecs, bits, budget) when training ends."
        },
    )

    ciuic_optim: str | None = field(
        default=None,
        metadata={
            "help": "Replace the Trainer's AdamW with ciuic.optim.AdamW with 8- or 4-bit moments and the same "
            "hyperparameters: adamw8bit or adamw4bit. Default: off."
        },
    )
    ciuic_fuse_update: bool = field(
        default=False,
        metadata={
            "help": "Run each parameter's optimizer update inside backward and free its gradient at once "
            "(needs --max_grad_norm 0 and --gradient_accumulation_steps 1)."
        },
    )

    # TrainingArguments parses these fields from JSON strings in __post_init__.
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "ciuic_config"]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ciuic_compression_config  # a bad mode or option fails at parse time, not mid-training
        self.ciuic_optim = parse_optimizer(self.ciuic_optim, "--ciuic_optim")
        if self.ciuic_fuse_update:
            _check_fuse_args(self)

    @property
    def ciuic_compression_config(self) -> Any:
        """The ``ciuic.CompressionConfig`` these arguments ask for, or None (compression off)."""
        return resolve_config(self.ciuic, self.ciuic_config)


def _config_from_args(args: Any) -> Any:
    return resolve_config(getattr(args, "ciuic", None), getattr(args, "ciuic_config", None))


def _check_fuse_args(args: Any) -> None:
    check_fusable(
        accumulation_steps=args.gradient_accumulation_steps,
        clipping=args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None,
        loss_scaling=bool(args.fp16),
        where="--ciuic_fuse_update with --gradient_accumulation_steps, --max_grad_norm, --fp16",
    )
    if args.world_size > 1:
        raise ValueError(f"--ciuic_fuse_update cannot be used with {args.world_size} processes (DDP averages "
                         "gradients after the update would have run); allowed: one process")


class _RemoveFusedUpdate(TrainerCallback):
    """Gives ``optimizer.step`` back its normal behaviour when training ends."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        handle = self._trainer.__dict__.pop("_ciuic_fused", None)
        if handle is not None:
            handle.remove()


def _write_report(directory: str | None) -> None:
    if directory:
        from ciuic.report import write_report

        write_report(directory)


class CiuicTrainer(Trainer):
    """``transformers.Trainer`` that compresses saved activations when ``args.ciuic`` is set (or
    ``ciuic=`` is given here: a mode string, a dict of options or a ``CompressionConfig``, which
    takes precedence over the arguments). With neither, it is exactly the stock ``Trainer``."""

    def __init__(self, *args: Any, ciuic: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ciuic_config = resolve_config(ciuic) if ciuic is not None else _config_from_args(self.args)
        self._ciuic: CompressionSession | None = None
        self.ciuic_optim = parse_optimizer(getattr(self.args, "ciuic_optim", None), "--ciuic_optim")
        self.ciuic_fuse_update = bool(getattr(self.args, "ciuic_fuse_update", False))
        if self.ciuic_fuse_update:
            _check_fuse_args(self.args)
            self.add_callback(_RemoveFusedUpdate(self))

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's optimizer, turned into ``ciuic.optim.AdamW`` by ``--ciuic_optim`` and fused
        into backward by ``--ciuic_fuse_update``."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.ciuic_optim is not None:
            optimizer = self.optimizer = convert_optimizer(optimizer, self.ciuic_optim)
        if self.ciuic_fuse_update and getattr(optimizer, "_ciuic_fused_handle", None) is None:
            from ciuic.optim import fuse_into_backward

            self._ciuic_fused = fuse_into_backward(optimizer, track_grad_norm=True)
            self._ciuic_fused._warned = True  # the Trainer calls optimizer.step(): expected
        return optimizer

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # The Trainer logs `grad_norm` from the gradients it finds before optimizer.step(); with
        # the update fused into backward they are already freed, and it would log 0 every step.
        # The fused hooks took each gradient's norm before freeing it: report that instead.
        handle = getattr(self, "_ciuic_fused", None)
        if grad_norm is None and handle is not None and handle.active:
            return handle.grad_norm()
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.ciuic_config is None:
            return super().train(*args, **kwargs)
        # With model_init, train() builds a new model: only the engine is set up here.
        model = self.model if self.model_init is None else None
        session = CompressionSession(self.ciuic_config, model=model)
        # Before accelerate prepares the model, so that its autocast wrapper sits outside
        # ciuic's preparation of the forward. close() undoes that preparation, unless accelerate
        # wrapped the forward on top of it (mixed precision): it then stays, acting only in
        # training forwards with labels.
        session.prepare()
        self._ciuic = session
        try:
            return super().train(*args, **kwargs)
        finally:
            self._ciuic = None
            _write_report(getattr(self.args, "ciuic_report", None))
            session.close()

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        stack = super().compute_loss_context_manager()
        if self._ciuic is not None and self.model.training:
            stack.enter_context(self._ciuic.step())
        return stack


class CiuicCallback(TrainerCallback):
    """Compression for any ``Trainer``, from ``on_step_begin`` to ``on_step_end``.

    ``mode`` (and keyword ``CompressionConfig`` options) as for ``ciuic.compression``; without
    them the callback follows ``args.ciuic`` / ``args.ciuic_config`` and does nothing when unset.
    ``report_dir`` (default ``args.ciuic_report``): where the memory report is written when
    training ends.
    """

    def __init__(self, mode: Any = None, *, report_dir: str | None = None, **options: Any) -> None:
        self.ciuic_config = resolve_config(mode, options) if mode is not None or options else None
        self.report_dir = report_dir
        self._session: CompressionSession | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        config = self.ciuic_config if self.ciuic_config is not None else _config_from_args(args)
        self._session = CompressionSession(config) if config is not None else None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._session is not None and not self._session.engine.active:
            self._session.engine.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A run stopped between micro-batches never reaches on_step_end.
        if self._session is not None:
            _write_report(self.report_dir or getattr(args, "ciuic_report", None))
            self._session.close()
        self._session = None

    def _leave(self) -> None:
        if self._session is not None and self._session.engine.active:
            self._session.engine.__exit__(None, None, None)


from ._hf_lm_head import SUPPORTED_MODEL_TYPES, apply_lean_lm_head, remove_lean_lm_head  # noqa: E402

__all__ = ["CiuicCallback", "CiuicTrainer", "CiuicTrainingArguments", "SUPPORTED_MODEL_TYPES", "apply_lean_lm_head",
           "remove_lean_lm_head"]
