"""Lightning and Fabric: ``strategy="ciuic"`` compresses saved activations in every training step.

    import ciuic                                   # registers the strategy names (lazily)
    trainer = lightning.Trainer(strategy="ciuic")  # or "ciuic_ddp", "ciuic_8:1", "ciuic_ddp_2:1", ...
    trainer = lightning.Trainer(strategy=CiuicStrategy(mode="auto", budget="12GB"))
    fabric = lightning.Fabric(strategy="ciuic")

Trainer: ``CiuicStrategy`` (one device) and ``CiuicDDPStrategy`` run ``Strategy.training_step`` inside
ciuic's compression engine. Autograd packs what the step saves for backward while the step runs; the
unpack hooks travel with the saved tensors, so they still fire in the backward that Lightning runs
after ``training_step`` returns. Validation, test and predict steps are untouched.

Fabric: ``CiuicFabricStrategy`` / ``CiuicFabricDDPStrategy`` enter the engine in the precision
plugin's ``forward_context``, which Fabric opens around every forward of a module returned by
``fabric.setup`` (and in ``fabric.autocast()``); forwards without grad save nothing.

Keyword arguments that are ``ciuic.CompressionConfig`` options (``budget``, ``group_size``,
``rounding``, ...) configure compression; the others go to the Lightning strategy (``device``,
``find_unused_parameters``, ``process_group_backend``, ...). ``lean_lm_head=True``, given
explicitly, patches every Hugging Face causal LM inside the LightningModule with the memory-lean LM
head (``ciuic.apply_lean_lm_head``: its training forward with labels computes the loss in chunks
and returns ``logits=None``; off unless asked, since a ``training_step`` may read the logits).

Gradient and optimizer-state memory (Trainer strategies only; one config, no change to the
LightningModule):

    Trainer(strategy=CiuicStrategy(optimizer="adamw4bit", fuse_update=True), precision="bf16-true")
    Trainer(strategy=CiuicDDPStrategy(optimizer="adamw8bit"))         # gradients all-reduced in 8 bits
    Trainer(strategy="ciuic_ddp")                                     # the same gradient hook, default on

``optimizer="adamw8bit" | "adamw4bit"`` turns each ``torch.optim.AdamW`` that ``configure_optimizers``
returns into ``ciuic.optim.AdamW`` with the same hyperparameters and parameter groups
(``AdamW.from_torch``; LR schedulers are moved to it; bf16 parameters, e.g. under
``precision="bf16-true"``, get stochastic rounding and no fp32 master copy). Any other optimizer
type raises TypeError. ``fuse_update=True`` (single device only) runs each parameter's update
inside backward and frees its gradient (``ciuic.optim.fuse_into_backward``); it raises ValueError
with ``accumulate_grad_batches > 1``, ``gradient_clip_val`` or ``precision="16-mixed"``.
``CiuicDDPStrategy`` all-reduces gradients as 8-bit block codes with error feedback
(``ciuic.distributed``; ``gradient_bits=4`` for 4-bit, ``gradient_bits=None`` for DDP's own fp32
all-reduce); the hook's state, with the bytes sent per step, is ``strategy.ciuic_gradient_state``.

Registered names (Trainer and Fabric alike): ``ciuic``, ``ciuic_ddp`` (4:1), and per mode
``ciuic_<mode>``, ``ciuic_ddp_<mode>`` for lossless, 2:1, 4:1, 8:1. They exist after ``import ciuic``
(see ``ciuic_integrations._register_lazy``); ``register_strategies()`` registers them explicitly.
The classes are built on the ``lightning`` package; for the standalone ``pytorch_lightning`` and
``lightning_fabric`` packages use the strategy names or ``strategy_classes("pytorch_lightning")``.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from ._common import CompressionSession, require, resolve_config, split_options
from ._optim import check_fusable, convert_optimizer, fuse, parse_flag, parse_optimizer, retarget_scheduler

# Modes with a registered name (auto needs a budget, so it is only reachable through the class).
_NAMED_MODES = ("lossless", "2:1", "4:1", "8:1")
_DEFAULT_MODE = "4:1"

# package -> (single-device class name, DDP class name): the names the classes are importable
# (and picklable) under from this module.
_CLASS_NAMES = {
    "lightning.pytorch": ("CiuicStrategy", "CiuicDDPStrategy"),
    "lightning.fabric": ("CiuicFabricStrategy", "CiuicFabricDDPStrategy"),
    "pytorch_lightning": ("PytorchLightningCiuicStrategy", "PytorchLightningCiuicDDPStrategy"),
    "lightning_fabric": ("LightningFabricCiuicStrategy", "LightningFabricCiuicDDPStrategy"),
}
_FABRIC_PACKAGES = ("lightning.fabric", "lightning_fabric")
_built: dict[str, tuple[type, type]] = {}
_build_lock = threading.RLock()


# ------------------------------------------------------------------------------------------------
# What the Trainer and Fabric strategies share
# ------------------------------------------------------------------------------------------------
def _init_compression(strategy: Any, mode: Any, kwargs: dict) -> dict:
    """Set ``strategy.ciuic_config`` and its session; return the kwargs meant for Lightning.
    ``report_dir`` (optional): where each process writes ``ciuic.memory_report()`` (JSON + PNG)
    at teardown."""
    report_dir = kwargs.pop("report_dir", None)
    # lean_lm_head=True given explicitly: the Hugging Face causal LMs inside the LightningModule get
    # the lean LM head (their training forward with labels then returns logits=None, so it is not
    # the default: a training_step may read the logits)
    strategy.ciuic_lean_lm_head = kwargs.get("lean_lm_head") is True
    options, strategy_kwargs = split_options(kwargs)
    config = resolve_config(_DEFAULT_MODE if mode is None else mode, options)
    if config is None:
        raise ValueError(
            f"mode={mode!r} turns compression off; a ciuic strategy needs one of "
            f"{', '.join(map(repr, _NAMED_MODES + ('auto',)))} (or use Lightning's own strategy)"
        )
    strategy.ciuic_config = config
    strategy._ciuic = CompressionSession(config)
    strategy.ciuic_report_dir = report_dir
    if report_dir is not None:
        _report_on_close(strategy._ciuic, str(report_dir))
    return strategy_kwargs


def _report_on_close(session: CompressionSession, directory: str) -> None:
    """Every teardown closes the session: write the memory report there first."""
    close = session.close

    def close_with_report() -> None:
        from ciuic.report import write_report

        write_report(directory)
        close()

    session.close = close_with_report


def _device_list(devices: Any) -> list:
    return list(devices) if devices is not None else []


# ------------------------------------------------------------------------------------------------
# Optimizer and gradients (Trainer strategies)
# ------------------------------------------------------------------------------------------------
def _init_optimizer(strategy: Any, optimizer: Any, fuse_update: Any) -> None:
    strategy.ciuic_optimizer = parse_optimizer(optimizer, "optimizer")
    strategy.ciuic_fuse_update = parse_flag(fuse_update, "fuse_update")
    strategy._ciuic_fused: list = []


def _apply_optimizer(strategy: Any, trainer: Any) -> None:
    """After Lightning built the optimizers from ``configure_optimizers``: convert, then fuse (and,
    with ``lean_lm_head=True``, patch the module's Hugging Face causal LMs; undone at teardown)."""
    if getattr(strategy, "ciuic_lean_lm_head", False):
        import ciuic

        for module in strategy.lightning_module.modules():
            if _is_causal_lm(module):
                strategy._ciuic.on_close(ciuic._prepare_model(module, strategy.ciuic_config))
    if strategy.ciuic_optimizer is not None:
        converted = []
        for old in strategy.optimizers:
            new = convert_optimizer(old, strategy.ciuic_optimizer)
            for config in strategy.lr_scheduler_configs:
                retarget_scheduler(config.scheduler, old, new)
            converted.append(new)
        strategy.optimizers = converted
    if strategy.ciuic_fuse_update:
        check_fusable(
            accumulation_steps=trainer.accumulate_grad_batches, clipping=trainer.gradient_clip_val,
            loss_scaling=getattr(strategy.precision_plugin, "scaler", None) is not None,
            where="Lightning Trainer: accumulate_grad_batches, gradient_clip_val, precision",
        )
        strategy._ciuic_fused = fuse(strategy.optimizers)
        for handle in strategy._ciuic_fused:
            handle._warned = True  # Lightning calls optimizer.step(closure): expected, not worth a warning


def _is_causal_lm(module: Any) -> bool:
    """A transformers ``*ForCausalLM``: a config, a linear LM head, over a base model of its own."""
    import torch

    if getattr(getattr(module, "config", None), "model_type", None) is None:
        return False
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    base = getattr(module, "base_model", None)
    return isinstance(head, torch.nn.Linear) and base is not None and base is not module


def _remove_fused(strategy: Any) -> None:
    for handle in getattr(strategy, "_ciuic_fused", []):
        handle.remove()
    strategy._ciuic_fused = []


class _SingleDeviceMixin:
    """Follows the Trainer's/Fabric's device when none was given, as Lightning's own strategy
    selection does: the connector hands over its devices through ``parallel_devices``."""

    _ciuic_device_given: bool
    _root_device: Any

    @property
    def parallel_devices(self) -> list | None:
        return [self._root_device] if self._ciuic_device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: Any) -> None:
        devices = _device_list(devices)
        if len(devices) > 1:
            raise ValueError(
                f"strategy {type(self).__name__} (strategy='ciuic') trains on one device, but "
                f"{len(devices)} devices were selected ({', '.join(map(str, devices))}); use "
                f"strategy='ciuic_ddp' for several devices, or devices=1"
            )
        if devices:
            import torch

            device = devices[0]
            self._root_device = device if isinstance(device, torch.device) else torch.device(device)


def _mode_description(mode: str) -> str:
    return "lossless (bit-identical)" if mode == "lossless" else f"{mode} compression"


# ------------------------------------------------------------------------------------------------
# Class factories: one pair per Lightning package, built on that package's strategies module
# ------------------------------------------------------------------------------------------------
def _build_trainer_strategies(package: str) -> tuple[type, type]:
    strategies = require(f"{package}.strategies", "lightning")
    single_name, ddp_name = _CLASS_NAMES[package]

    class CiuicStrategy(_SingleDeviceMixin, strategies.SingleDeviceStrategy):
        """``SingleDeviceStrategy`` whose training steps compress saved activations with ciuic.

        ``mode``: ``"lossless"``, ``"2:1"``, ``"4:1"`` (default), ``"8:1"``, ``"auto"`` (with
        ``budget="12GB"``), a dict of options or a ``ciuic.CompressionConfig``. ``device``: default
        the Trainer's device. ``report_dir``: write ``ciuic.memory_report()`` there (JSON + PNG)
        at teardown. Other keywords: ``CompressionConfig`` options or the strategy's own.
        """

        strategy_name = "ciuic"

        def __init__(self, mode: Any = _DEFAULT_MODE, device: Any = None, *, optimizer: str | None = None,
                     fuse_update: bool = False, **kwargs: Any) -> None:
            # optimizer: "adamw8bit" | "adamw4bit" | None; fuse_update: see the module docstring
            _init_optimizer(self, optimizer, fuse_update)
            strategy_kwargs = _init_compression(self, mode, kwargs)
            self._ciuic_device_given = device is not None
            super().__init__(device="cpu" if device is None else device, **strategy_kwargs)

        def setup_optimizers(self, trainer: Any) -> None:
            super().setup_optimizers(trainer)
            _apply_optimizer(self, trainer)

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            with self._ciuic.step():
                return super().training_step(*args, **kwargs)

        def teardown(self) -> None:
            _remove_fused(self)
            super().teardown()
            self._ciuic.close()

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            _register_names(strategy_registry, cls, "ciuic", "one device")

    class CiuicDDPStrategy(strategies.DDPStrategy):
        """``DDPStrategy`` whose training steps compress saved activations with ciuic (each process
        compresses its own activations; gradients are communicated as usual).

        ``mode`` as for ``CiuicStrategy``; other keywords: ``CompressionConfig`` options or
        ``DDPStrategy``'s own (``find_unused_parameters``, ``start_method``, ...).
        ``gradient_bits``: 8 (default) or 4: gradients are all-reduced as block codes with error
        feedback (``ciuic.distributed``); None: DDP's own all-reduce (or your ``ddp_comm_hook``).
        ``gradient_block_size``: elements per shared scale (default 256 at 8 bits, 64 at 4).
        ``optimizer``: as for ``CiuicStrategy``. (``fuse_update`` cannot work under DDP: the
        post-accumulate-grad hook fires before DDP has averaged the gradient.)
        """

        strategy_name = "ciuic_ddp"

        def __init__(self, mode: Any = _DEFAULT_MODE, *, optimizer: str | None = None, fuse_update: bool = False,
                     gradient_bits: int | None = 8, gradient_block_size: int | None = None,
                     **kwargs: Any) -> None:
            _init_optimizer(self, optimizer, fuse_update)
            if self.ciuic_fuse_update:
                raise ValueError(
                    "fuse_update=True cannot be used with DDP: each parameter's update would run on its local "
                    "gradient, before DDP averages it across processes; allowed: fuse_update=False")
            if gradient_bits is not None:
                from ciuic.distributed import CompressedAllReduceState

                if kwargs.get("ddp_comm_hook") is not None:
                    raise ValueError("gradient_bits and ddp_comm_hook both set a DDP communication hook; pass "
                                     "gradient_bits=None to use your own ddp_comm_hook")
                # validates gradient_bits and gradient_block_size now, not when DDP starts
                CompressedAllReduceState(bits=gradient_bits, block_size=gradient_block_size)
            self.ciuic_gradient_bits = gradient_bits
            self.ciuic_gradient_block_size = gradient_block_size
            self.ciuic_gradient_state: Any = None
            strategy_kwargs = _init_compression(self, mode, kwargs)
            super().__init__(**strategy_kwargs)

        def _register_ddp_hooks(self) -> None:
            if self.ciuic_gradient_bits is None:
                return super()._register_ddp_hooks()
            from ciuic.distributed import compress_ddp_gradients

            # Lightning registers comm hooks on CUDA only; ciuic's hook also runs on gloo (CPU).
            self.ciuic_gradient_state = compress_ddp_gradients(
                self.model, bits=self.ciuic_gradient_bits, block_size=self.ciuic_gradient_block_size)

        def setup_optimizers(self, trainer: Any) -> None:
            super().setup_optimizers(trainer)
            _apply_optimizer(self, trainer)

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            with self._ciuic.step():
                return super().training_step(*args, **kwargs)

        def teardown(self) -> None:
            _remove_fused(self)
            super().teardown()
            self._ciuic.close()

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            _register_names(strategy_registry, cls, "ciuic_ddp", "DDP")

    return _name(CiuicStrategy, single_name), _name(CiuicDDPStrategy, ddp_name)


def _install_forward_context(precision: Any, session: CompressionSession) -> Any:
    """Make ``precision.forward_context()`` also enter ``session`` (an instance attribute, so the
    precision plugin keeps its class and every ``isinstance`` check Fabric makes)."""
    if precision.__dict__.get("_ciuic_session") is session:
        return precision
    original = precision.__dict__.get("_ciuic_original_forward_context", precision.forward_context)

    import contextlib

    @contextlib.contextmanager
    def forward_context() -> Any:
        with session.step(), original():
            yield

    precision._ciuic_original_forward_context = original
    precision._ciuic_session = session
    precision.forward_context = forward_context
    return precision


def _build_fabric_strategies(package: str) -> tuple[type, type]:
    strategies = require(f"{package}.strategies", "lightning")
    single_name, ddp_name = _CLASS_NAMES[package]

    def precision_property(base: type) -> property:
        def get(self: Any) -> Any:
            return _install_forward_context(base.precision.fget(self), self._ciuic)

        def set(self: Any, precision: Any) -> None:
            base.precision.fset(self, precision)

        return property(get, set, doc="The precision plugin; its forward_context also compresses.")

    class CiuicFabricStrategy(_SingleDeviceMixin, strategies.SingleDeviceStrategy):
        """Fabric ``SingleDeviceStrategy`` whose forwards (through ``fabric.setup`` modules)
        compress saved activations with ciuic. Arguments as for the Trainer's ``CiuicStrategy``."""

        def __init__(self, mode: Any = _DEFAULT_MODE, device: Any = None, **kwargs: Any) -> None:
            strategy_kwargs = _init_compression(self, mode, kwargs)
            self._ciuic_device_given = device is not None
            super().__init__(device="cpu" if device is None else device, **strategy_kwargs)

        precision = precision_property(strategies.SingleDeviceStrategy)

        def teardown(self) -> None:
            super().teardown()
            self._ciuic.close()

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            _register_names(strategy_registry, cls, "ciuic", "one device")

    class CiuicFabricDDPStrategy(strategies.DDPStrategy):
        """Fabric ``DDPStrategy`` whose forwards compress saved activations with ciuic."""

        def __init__(self, mode: Any = _DEFAULT_MODE, **kwargs: Any) -> None:
            strategy_kwargs = _init_compression(self, mode, kwargs)
            super().__init__(**strategy_kwargs)

        precision = precision_property(strategies.DDPStrategy)

        def teardown(self) -> None:
            super().teardown()
            self._ciuic.close()

        @classmethod
        def register_strategies(cls, strategy_registry: Any) -> None:
            _register_names(strategy_registry, cls, "ciuic_ddp", "DDP")

    return _name(CiuicFabricStrategy, single_name), _name(CiuicFabricDDPStrategy, ddp_name)


def _name(cls: type, name: str) -> type:
    # Importable as ciuic_integrations.lightning.<name>, so spawn launchers can pickle instances.
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = __name__
    return cls


def _register_names(registry: Any, cls: type, prefix: str, what: str) -> None:
    entries = [(prefix, _DEFAULT_MODE)] + [(f"{prefix}_{mode}", mode) for mode in _NAMED_MODES]
    for name, mode in entries:
        if name in registry:  # idempotent, and never replaces a strategy someone else registered
            continue
        registry.register(
            name, cls, description=f"ciuic {_mode_description(mode)} of saved activations, {what}", mode=mode
        )


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------
def strategy_classes(package: str = "lightning.pytorch") -> tuple[type, type]:
    """``(single-device class, DDP class)`` for ``package``: ``"lightning.pytorch"`` (Trainer),
    ``"lightning.fabric"``, or the standalone ``"pytorch_lightning"`` / ``"lightning_fabric"``."""
    if package not in _CLASS_NAMES:
        raise ValueError(f"package={package!r} is not valid; allowed: {', '.join(map(repr, _CLASS_NAMES))}")
    with _build_lock:
        if package not in _built:
            build = _build_fabric_strategies if package in _FABRIC_PACKAGES else _build_trainer_strategies
            _built[package] = build(package)
        return _built[package]


def register_strategies(package: str | None = None) -> None:
    """Register ciuic's names in ``package``'s strategy registry (default: every Lightning package
    already imported). Idempotent. ``import ciuic`` arranges this automatically."""
    packages = [package] if package is not None else [
        p for p in _CLASS_NAMES if f"{p}.strategies" in sys.modules
    ]
    for name in packages:
        strategies = require(f"{name}.strategies", "lightning")
        registry = getattr(strategies, "STRATEGY_REGISTRY" if name in _FABRIC_PACKAGES else "StrategyRegistry")
        for cls in strategy_classes(name):
            cls.register_strategies(registry)


def __getattr__(name: str) -> Any:
    # The classes are built on first access, so importing this module imports no Lightning.
    for package, names in _CLASS_NAMES.items():
        if name in names:
            return strategy_classes(package)[names.index(name)]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CiuicStrategy",
    "CiuicDDPStrategy",
    "CiuicFabricStrategy",
    "CiuicFabricDDPStrategy",
    "register_strategies",
    "strategy_classes",
]
