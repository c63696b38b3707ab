"""Accelerate: a ``--ciuic`` launch flag, and a plugin for the ``Accelerator``.

No change to the training script (every process compresses its training forwards)::

    ciuic-accelerate launch --ciuic 4:1 [any accelerate launch option] train.py [script args]

``ciuic-accelerate launch`` is ``accelerate launch`` (its own parser and launcher, so every option and
``--help`` work) plus ``--ciuic MODE`` (``lossless``, ``2:1``, ``4:1``, ``8:1``, or a JSON object of
``ciuic.CompressionConfig`` options such as ``'{"mode": "auto", "budget": "12GB"}'``) and
``--ciuic_stats DIR`` (each process writes its accounting to ``DIR/ciuic_stats_rank<R>.json`` and
its ``ciuic.memory_report()`` to ``DIR/ciuic_report.json`` / ``.png``). The
mode reaches every process as ``CIUIC_MODE`` in the environment accelerate passes on, and each process
runs the script through ``python -m ciuic_integrations._bootstrap``, which turns compression on for
the process before running the script as ``__main__``. Other subcommands (``ciuic-accelerate config``,
``env``, ...) are accelerate's own.

In code, like accelerate's ``DeepSpeedPlugin`` / ``FullyShardedDataParallelPlugin`` (accelerate's
``kwargs_handlers`` accept only its own handler types, hence the subclass)::

    accelerator = CiuicAccelerator(ciuic_plugin=CiuicPlugin(mode="4:1"))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

compresses the saved activations of each training forward of the prepared model (``model.training``
with grad enabled); evaluation forwards are untouched.

Gradient and optimizer-state memory, also without changing the script::

    ciuic-accelerate launch --ciuic 4:1 --ciuic_optim adamw4bit [--ciuic_fuse_update] ... train.py
    accelerator = CiuicAccelerator(ciuic_plugin=CiuicPlugin(mode="4:1", optimizer="adamw8bit"))

``--ciuic_optim adamw8bit|adamw4bit`` (``CiuicPlugin(optimizer=...)``) turns every
``torch.optim.AdamW`` given to ``accelerator.prepare`` into ``ciuic.optim.AdamW`` with the same
hyperparameters and groups (``AdamW.from_torch``; schedulers prepared with it follow; bf16
parameters get stochastic rounding); another optimizer type raises TypeError.
``--ciuic_fuse_update`` (``fuse_update=True``) updates each parameter inside ``accelerator.backward``
and frees its gradient; it raises ValueError with gradient accumulation, fp16 loss scaling or
several processes, and ``accelerator.clip_grad_norm_`` then raises too. The launch flags travel as
``CIUIC_OPTIM`` / ``CIUIC_FUSE_UPDATE``; the bootstrap applies them to accelerate's own
``Accelerator`` in each process (``--ciuic_optim`` works without ``--ciuic``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ._common import (
    ENV_MODE,
    ENV_STATS_DIR,
    CompressionSession,
    compress_forward,
    parse_setting,
    require,
    resolve_config,
    setting_for_env,
)

from ._optim import (
    ENV_FUSE_UPDATE,
    ENV_OPTIM,
    check_fusable,
    convert_optimizer,
    optimizer_from_env,
    parse_flag,
    parse_optimizer,
    retarget_scheduler,
)

_accelerate = require("accelerate", "accelerate")
Accelerator = _accelerate.Accelerator

_BOOTSTRAP = "ciuic_integrations._bootstrap"
_HELP_GROUP = "ciuic Arguments"


@dataclass
class CiuicPlugin:
    """Activation compression for ``CiuicAccelerator``.

    ``mode``: ``"lossless"``, ``"2:1"``, ``"4:1"``, ``"8:1"``, ``"auto"`` (with ``budget`` in
    ``options``), a dict of options or a ``ciuic.CompressionConfig``; default: ``CIUIC_MODE`` from
    the environment (what ``ciuic-accelerate launch --ciuic`` sets), else ``"4:1"``.
    ``options``: further ``CompressionConfig`` options, e.g. ``{"group_size": 128}``.
    """

    mode: Any = field(
        default=None,
        metadata={"help": "Compression mode: lossless, 2:1, 4:1, 8:1 or auto. Default: $CIUIC_MODE, else 4:1."},
    )
    options: dict = field(
        default_factory=dict,
        metadata={"help": "Further ciuic.CompressionConfig options, e.g. {'budget': '12GB'}."},
    )
    optimizer: str | None = field(
        default=None,
        metadata={"help": "adamw8bit or adamw4bit: prepared torch.optim.AdamW become ciuic.optim.AdamW. "
                  "Default: $CIUIC_OPTIM, else off."},
    )
    fuse_update: bool | None = field(
        default=None,
        metadata={"help": "Update each parameter inside backward and free its gradient. Default: $CIUIC_FUSE_UPDATE."},
    )
    compression_config: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        env_optimizer, env_fuse = optimizer_from_env()
        self.optimizer = env_optimizer if self.optimizer is None else parse_optimizer(self.optimizer, "optimizer")
        self.fuse_update = env_fuse if self.fuse_update is None else parse_flag(self.fuse_update, "fuse_update")
        if self.mode is None:
            self.mode = os.environ.get(ENV_MODE) or "4:1"
        config = resolve_config(self.mode, self.options)
        if config is None:
            raise ValueError(
                f"CiuicPlugin(mode={self.mode!r}) turns compression off; omit the plugin instead, or pass "
                f"one of 'lossless', '2:1', '4:1', '8:1', 'auto'"
            )
        self.compression_config = config


class CiuicAccelerator(Accelerator):
    """``accelerate.Accelerator`` that also takes ``ciuic_plugin=CiuicPlugin(...)``: models it
    prepares for training compress the activations their forward saves for backward."""

    def __init__(self, *args: Any, ciuic_plugin: CiuicPlugin | None = None, **kwargs: Any) -> None:
        if ciuic_plugin is not None and not isinstance(ciuic_plugin, CiuicPlugin):
            raise TypeError(f"ciuic_plugin must be a CiuicPlugin, got {type(ciuic_plugin).__name__}")
        super().__init__(*args, **kwargs)
        self.ciuic_plugin = ciuic_plugin
        self._ciuic_sessions: list[CompressionSession] = []

    def prepare_model(self, model: Any, device_placement: bool | None = None, evaluation_mode: bool = False) -> Any:
        session = None
        if self.ciuic_plugin is not None and not evaluation_mode and not getattr(model, "_ciuic_session", None):
            # Built on the unwrapped model before accelerate wraps its forward (autocast), so that
            # ciuic's preparation of a Hugging Face causal LM ends up inside that wrapper.
            session = CompressionSession(self.ciuic_plugin.compression_config, model=model)
            session.prepare()
        prepared = super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        if session is not None:
            compress_forward(prepared, session)
            self._ciuic_sessions.append(session)
        return prepared

    def prepare_optimizer(self, optimizer: Any, device_placement: Any = None) -> Any:
        plugin = self.ciuic_plugin
        if plugin is not None:
            optimizer = _ciuic_optimizer(self, optimizer, plugin.optimizer, plugin.fuse_update)
        return super().prepare_optimizer(optimizer, device_placement=device_placement)

    def prepare_scheduler(self, scheduler: Any) -> Any:
        _follow_optimizer(scheduler)
        return super().prepare_scheduler(scheduler)

    def clip_grad_norm_(self, parameters: Any, max_norm: Any, norm_type: Any = 2) -> Any:
        _refuse_clipping_when_fused(self)
        return super().clip_grad_norm_(parameters, max_norm, norm_type)

    def free_memory(self, *objects: Any) -> Any:
        for handle in getattr(self, "_ciuic_fused", []):
            handle.remove()
        self._ciuic_fused = []
        for session in self._ciuic_sessions:
            session.close()
        self._ciuic_sessions = []
        return super().free_memory(*objects)


# ------------------------------------------------------------------------------------------------
# The optimizer setting, shared by CiuicAccelerator and the launch flags (patch_accelerator)
# ------------------------------------------------------------------------------------------------
def _ciuic_optimizer(accelerator: Any, optimizer: Any, name: str | None, fuse_update: bool) -> Any:
    """``optimizer`` converted (``name``) and fused into backward (``fuse_update``), as configured."""
    inner = getattr(optimizer, "optimizer", optimizer)  # an already prepared optimizer
    if name is not None:
        inner = convert_optimizer(inner, name)
    if fuse_update and getattr(inner, "_ciuic_fused_handle", None) is None:
        check_fusable(
            accumulation_steps=accelerator.gradient_accumulation_steps,
            loss_scaling=getattr(accelerator, "scaler", None) is not None,
            where="accelerate: gradient_accumulation_steps, mixed_precision='fp16'",
        )
        if accelerator.num_processes > 1:
            raise ValueError(f"the ciuic update fused into backward cannot be used with {accelerator.num_processes} "
                             "processes: it would run before DDP averages the gradients; allowed: one process")
        from ciuic.optim import fuse_into_backward

        handle = fuse_into_backward(inner)
        handle._warned = True  # the training loop calls optimizer.step(): expected
        accelerator.__dict__.setdefault("_ciuic_fused", []).append(handle)
    return inner


def _follow_optimizer(scheduler: Any) -> None:
    old = getattr(scheduler, "optimizer", None)
    new = getattr(old, "_ciuic_replaced_by", None)
    if new is not None:
        retarget_scheduler(scheduler, old, new)


def _refuse_clipping_when_fused(accelerator: Any) -> None:
    if any(handle.active for handle in accelerator.__dict__.get("_ciuic_fused", [])):
        check_fusable(clipping="accelerator.clip_grad_norm_", where="accelerate")


def patch_accelerator(name: str | None, fuse_update: bool) -> None:
    """Make accelerate's own ``Accelerator`` (every instance in this process) apply the optimizer
    setting in ``prepare``: what ``--ciuic_optim`` / ``--ciuic_fuse_update`` do in launched processes."""
    cls = _accelerate.Accelerator
    if getattr(cls, "_ciuic_patched", None) == (name, fuse_update):
        return
    prepare_optimizer = cls.__dict__.get("_ciuic_original_prepare_optimizer", cls.prepare_optimizer)
    prepare_scheduler = cls.__dict__.get("_ciuic_original_prepare_scheduler", cls.prepare_scheduler)
    clip_grad_norm_ = cls.__dict__.get("_ciuic_original_clip_grad_norm_", cls.clip_grad_norm_)

    def patched_prepare_optimizer(self: Any, optimizer: Any, device_placement: Any = None) -> Any:
        if not isinstance(self, CiuicAccelerator):  # CiuicAccelerator applies its own plugin
            optimizer = _ciuic_optimizer(self, optimizer, name, fuse_update)
        return prepare_optimizer(self, optimizer, device_placement=device_placement)

    def patched_prepare_scheduler(self: Any, scheduler: Any) -> Any:
        _follow_optimizer(scheduler)
        return prepare_scheduler(self, scheduler)

    def patched_clip_grad_norm_(self: Any, parameters: Any, max_norm: Any, norm_type: Any = 2) -> Any:
        _refuse_clipping_when_fused(self)
        return clip_grad_norm_(self, parameters, max_norm, norm_type)

    cls._ciuic_original_prepare_optimizer = prepare_optimizer
    cls._ciuic_original_prepare_scheduler = prepare_scheduler
    cls._ciuic_original_clip_grad_norm_ = clip_grad_norm_
    cls.prepare_optimizer = patched_prepare_optimizer
    cls.prepare_scheduler = patched_prepare_scheduler
    cls.clip_grad_norm_ = patched_clip_grad_norm_
    cls._ciuic_patched = (name, fuse_update)


# ------------------------------------------------------------------------------------------------
# ciuic-accelerate: accelerate's CLI with --ciuic on `launch`
# ------------------------------------------------------------------------------------------------
def launch_parser(subparsers: Any = None) -> Any:
    """``accelerate launch``'s parser (``launch_command_parser``) plus the ciuic arguments."""
    from accelerate.commands.launch import CustomHelpFormatter, launch_command_parser

    class HelpFormatter(CustomHelpFormatter):
        # accelerate's formatter hides the groups it does not know once other flags are given
        # (`launch --cpu --help`); ours is always shown.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.titles.append(_HELP_GROUP)

    parser = launch_command_parser(subparsers)
    parser.formatter_class = HelpFormatter
    group = parser.add_argument_group(_HELP_GROUP, "Activation compression in every launched process.")
    group.add_argument(
        "--ciuic",
        default=None,
        metavar="MODE",
        help="Compress saved activations in every process: lossless, 2:1, 4:1, 8:1, or a JSON object of "
        "ciuic.CompressionConfig options, e.g. '{\"mode\": \"auto\", \"budget\": \"12GB\"}'. 'off' disables.",
    )
    group.add_argument(
        "--ciuic_stats",
        default=None,
        metavar="DIR",
        help="Each process writes its ciuic accounting (bytes kept for backward, per module and codec) "
        "to DIR/ciuic_stats_rank<RANK>.json and its memory report (table as JSON, plot as PNG) to "
        "DIR/ciuic_report.json/.png (ciuic_report_rank<RANK>.* with several processes) when the script ends.",
    )
    group.add_argument(
        "--ciuic_optim",
        default=None,
        metavar="NAME",
        help="Turn every torch.optim.AdamW given to accelerator.prepare into ciuic.optim.AdamW with 8- or "
        "4-bit moments and the same hyperparameters: adamw8bit or adamw4bit.",
    )
    group.add_argument(
        "--ciuic_fuse_update",
        action="store_true",
        help="Update each parameter inside backward and free its gradient (one process, no gradient "
        "accumulation or clipping).",
    )
    if subparsers is not None:
        parser.set_defaults(func=launch_command)
    return parser


def launch_command(args: Any) -> None:
    """Run accelerate's ``launch_command`` with each process started through the ciuic bootstrap."""
    from accelerate.commands.launch import launch_command as accelerate_launch_command

    try:
        optim = parse_optimizer(getattr(args, "ciuic_optim", None), "--ciuic_optim")
    except ValueError as error:
        raise SystemExit(f"ciuic-accelerate: error: {error}") from None
    fuse_update = bool(getattr(args, "ciuic_fuse_update", False))
    if optim is not None or fuse_update:
        os.environ[ENV_OPTIM] = optim or "off"
        os.environ[ENV_FUSE_UPDATE] = "1" if fuse_update else "0"
    setting = parse_setting(getattr(args, "ciuic", None))
    stats_dir = getattr(args, "ciuic_stats", None)
    if setting is not None:
        try:
            config = resolve_config(setting)  # a bad mode fails here, before any process starts
        except ValueError as error:
            raise SystemExit(f"ciuic-accelerate: error: --ciuic {args.ciuic!r}: {error}") from None
        if args.no_python:
            raise SystemExit(
                "ciuic-accelerate: error: --ciuic needs a Python training script and cannot be used with "
                f"--no_python; set {ENV_MODE} and call ciuic.enable_from_env() in the program instead"
            )
        os.environ[ENV_MODE] = setting_for_env(config)
        if stats_dir:
            os.environ[ENV_STATS_DIR] = os.path.abspath(stats_dir)
        script = ["-m", args.training_script] if args.module else [args.training_script]
        args.training_script_args = script + list(args.training_script_args)
        args.training_script = _BOOTSTRAP
        args.module = True
    elif optim is not None or fuse_update:
        # the optimizer setting alone: the bootstrap applies it, compression stays off
        if args.no_python:
            raise SystemExit("ciuic-accelerate: error: --ciuic_optim/--ciuic_fuse_update need a Python training "
                             "script and cannot be used with --no_python")
        os.environ[ENV_MODE] = "off"
        script = ["-m", args.training_script] if args.module else [args.training_script]
        args.training_script_args = script + list(args.training_script_args)
        args.training_script = _BOOTSTRAP
        args.module = True
        if stats_dir:
            raise SystemExit("ciuic-accelerate: error: --ciuic_stats needs --ciuic MODE")
    elif stats_dir:
        raise SystemExit("ciuic-accelerate: error: --ciuic_stats needs --ciuic MODE")
    accelerate_launch_command(args)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``ciuic-accelerate``: ``launch`` gains ``--ciuic``; other subcommands are
    accelerate's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] != "launch" and not argv[0].startswith("-"):
        from accelerate.commands.accelerate_cli import main as accelerate_main

        sys.argv = ["accelerate", *argv]
        accelerate_main()
        return

    from accelerate.commands.utils import CustomArgumentParser

    parser = CustomArgumentParser(
        "ciuic-accelerate",
        usage="ciuic-accelerate launch --ciuic MODE [accelerate launch options] script.py [script args]",
        description="accelerate's CLI; `launch` has a --ciuic MODE flag that compresses saved "
        "activations in every process. Other commands are accelerate's (ciuic-accelerate config, env, ...).",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(help="commands")
    launch_parser(subparsers)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        sys.exit(1)
    args.func(args)


__all__ = ["CiuicAccelerator", "CiuicPlugin", "launch_command", "launch_parser", "main", "patch_accelerator"]

if __name__ == "__main__":
    main()
