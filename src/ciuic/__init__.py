"""ciuic: cut the memory of PyTorch training by compressing what autograd keeps for backward.

    import ciuic
    ciuic.enable_compression(mode="4:1")     # every forward of this thread from now on
    ...
    with ciuic.compression(mode="8:1"):      # or just for a block
        loss = model(batch).loss
    loss.backward()
    print(ciuic.stats().ratio)
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

from .config import MODES, CompressionConfig, parse_bytes
from .engine import CompressionStats, Engine, keep_exact, reset_stats, stats
from .engine.tracking import state as _state
from .lm_head import linear_cross_entropy

__version__ = "0.1.0"

_ENV_MODE = "CIUIC_MODE"


def compression(mode: Any = None, **options: Any) -> Engine:
    """A context manager that compresses saved activations inside its block.

    ``mode`` is a mode string (``"lossless"``, ``"2:1"``, ``"4:1"``, ``"8:1"``, ``"auto"``), a dict
    of options or a ``CompressionConfig``; keyword options are those of ``CompressionConfig``
    (``config=`` is accepted as an alias of ``mode``). ``model=`` (optional) is prepared while the
    block is active (a Hugging Face causal LM gets the memory-lean LM head) and restored on exit.
    The returned object can also be entered and exited from two callbacks (``__enter__()`` in one,
    ``__exit__(None, None, None)`` in the other), on the same thread. Unpack still happens in
    backward, after the block has exited.

    The bit plan belongs to the configuration, not to the block: a block per training step reuses
    the plan calibrated in the first steps (per thread), as one long block would.
    """
    if "config" in options:
        if mode is not None:
            raise ValueError("pass either mode=... or config=..., not both")
        mode = options.pop("config")
    model = options.pop("model", None)
    config = CompressionConfig.from_value("4:1" if mode is None else mode, **options)
    _configure_allocator(config)
    return Engine(config, model=model, prepare=_prepare_model if model is not None else None)


def enable_compression(mode: Any = "4:1", *, model: Any = None, **options: Any) -> CompressionConfig:
    """Turn activation compression on for every following forward pass of the calling thread.

    Replaces a previous ``enable_compression`` of this thread. ``model`` (optional): a Hugging Face
    causal LM gets the memory-lean LM head (``lean_lm_head=True``, the default) until
    ``disable_compression()``. Returns the config. A bad mode or option raises ``ValueError``
    naming the valid values.
    """
    engine = compression(mode, model=model, **options)
    disable_compression()
    engine.__enter__()
    _state().global_engine = engine
    return engine.config


def disable_compression() -> None:
    """Undo ``enable_compression`` for the calling thread (packs already made still unpack), and
    free the pack buffers waiting in the pool (``empty_pool()``)."""
    st = _state()
    engine = st.global_engine
    if engine is not None:
        engine.__exit__(None, None, None)  # raises (and changes nothing) inside a compression() block
        st.global_engine = None
        empty_pool()


def empty_pool() -> None:
    """Free the pack buffers waiting in ciuic's pack pool for the next forward (see
    ``CompressionConfig.pool``); buffers of packs still alive stay theirs. Like
    ``torch.cuda.empty_cache()``, for when training is over or memory is needed elsewhere."""
    from ciuic_kernels._pool import clear_all

    clear_all()


def is_enabled() -> bool:
    """True when compression is on in this thread (globally or inside a ``compression`` block)."""
    return bool(_state().engines)


def current_config() -> CompressionConfig | None:
    """The config of the innermost active compression of this thread, or None."""
    engines = _state().engines
    return engines[-1].config if engines else None


def enable_from_env() -> CompressionConfig | None:
    """Enable compression from ``CIUIC_MODE`` (set by launchers such as ``ciuic-accelerate``).

    The value is a mode (``"4:1"``), a JSON object of ``CompressionConfig`` options
    (``{"mode": "auto", "budget": "12GB"}``), or empty / ``"off"`` for nothing. Returns the config
    enabled, or None.
    """
    value = os.environ.get(_ENV_MODE, "").strip()
    if not value or value.lower() in ("off", "none", "0", "false"):
        return None
    if value.startswith("{"):
        import json

        try:
            options = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{_ENV_MODE}={value!r} is not valid JSON ({error}); allowed: a mode "
                             f"({', '.join(MODES)}) or a JSON object of CompressionConfig options") from None
        return enable_compression(options)
    return enable_compression(value)


# ----------------------------------------------------------------------------------------------
# Model preparation: what compression(model=...) does to a model, and its undo. The framework
# specific preparers (Hugging Face's lean LM head) register themselves from ciuic_integrations.
# ----------------------------------------------------------------------------------------------
_model_preparers: list = []


def _register_model_preparer(preparer: Callable[[Any, CompressionConfig], "Callable[[], None] | None"]) -> None:
    if preparer not in _model_preparers:
        _model_preparers.append(preparer)


def _prepare_model(model: Any, config: CompressionConfig) -> Callable[[], None]:
    """Run every registered preparer on ``model``; returns one undo for all they changed."""
    undos = [undo for undo in (p(model, config) for p in list(_model_preparers)) if undo is not None]

    def undo() -> None:
        for u in reversed(undos):
            u()
        undos.clear()

    return undo


def _configure_allocator(config: CompressionConfig) -> None:
    memory = importlib.import_module(".memory", __name__)
    configure = getattr(memory, "configure_allocator", None)
    if configure is not None:
        configure(config)


# Lazy attributes: subpackages that import more than the core needs, and names that moved.
_LAZY = {
    "optim": (".optim", None),
    "distributed": (".distributed", None),
    "memory_report": (".report", "memory_report"),
    "MemoryReport": (".report", "MemoryReport"),
    "apply_lean_lm_head": ("ciuic_integrations._hf_lm_head", "apply_lean_lm_head"),
    "remove_lean_lm_head": ("ciuic_integrations._hf_lm_head", "remove_lean_lm_head"),
    "SUPPORTED_MODEL_TYPES": ("ciuic_integrations._hf_lm_head", "SUPPORTED_MODEL_TYPES"),
}


def __getattr__(name: str) -> Any:
    entry = _LAZY.get(name)
    if entry is None:
        raise AttributeError(f"module 'ciuic' has no attribute {name!r}")
    module_name, attribute = entry
    module = importlib.import_module(module_name, __name__ if module_name.startswith(".") else None)
    return module if attribute is None else getattr(module, attribute)


__all__ = [
    "MODES",
    "MemoryReport",
    "memory_report",
    "optim",
    "SUPPORTED_MODEL_TYPES",
    "apply_lean_lm_head",
    "linear_cross_entropy",
    "remove_lean_lm_head",
    "CompressionConfig",
    "CompressionStats",
    "compression",
    "current_config",
    "disable_compression",
    "empty_pool",
    "enable_compression",
    "enable_from_env",
    "is_enabled",
    "keep_exact",
    "parse_bytes",
    "reset_stats",
    "stats",
]


def _register_integrations() -> None:
    # Lightning has no plugin discovery: make Trainer(strategy="ciuic") work after `import ciuic`
    # alone, without importing lightning here (registration happens when lightning is imported).
    # Model preparers (the lean LM head of Hugging Face causal LMs) register the same way.
    try:
        from ciuic_integrations import _register_lazy
    except ModuleNotFoundError as error:  # a partial install without the integrations package
        if error.name != "ciuic_integrations":
            raise
        return
    _register_lazy()


_register_integrations()
