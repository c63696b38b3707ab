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

import os
from typing import Any

from .config import MODES, CompressionConfig, parse_bytes
from .engine import CompressionStats, Engine, keep_exact, reset_stats, stats
from .lm_head import SUPPORTED_MODEL_TYPES, apply_lean_lm_head, linear_cross_entropy, remove_lean_lm_head

__version__ = "0.1.0"

_ENV_MODE = "CIUIC_MODE"


def compression(mode: Any = None, **options: Any) -> Engine:
    """A context manager that compresses saved activations inside its block.

    ``mode`` is a mode string (``"lossless"``, ``"2:1"``, ``"4:1"``, ``"8:1"``, ``"auto"``), a dict
    of options or a ``CompressionConfig``; keyword options are those of ``CompressionConfig``
    (``config=`` is accepted as an alias of ``mode``). The returned object can also be entered and
    exited from two callbacks (``__enter__()`` in one, ``__exit__(None, None, None)`` in the other),
    on the same thread. Unpack still happens in backward, after the block has exited.
    """
    if "config" in options:
        if mode is not None:
            raise ValueError("pass either mode=... or config=..., not both")
        mode = options.pop("config")
    model = options.pop("model", None)
    config = CompressionConfig.from_value("4:1" if mode is None else mode, **options)
    engine = Engine(config)
    if model is not None:
        _prepare_model(model, config)
    return engine


_global: dict = {}


def _thread_key() -> int:
    import threading

    return threading.get_ident()


def enable_compression(mode: Any = "4:1", *, model: Any = None, **options: Any) -> CompressionConfig:
    """Turn activation compression on for every following forward pass of the calling thread.

    Replaces a previous ``enable_compression`` of this thread. ``model`` (optional): a Hugging Face
    causal LM gets the memory-lean LM head (``lean_lm_head=True``, the default). Returns the config.
    A bad mode or option raises ``ValueError`` naming the valid values.
    """
    engine = compression(mode, **options)
    disable_compression()
    if model is not None:
        _prepare_model(model, engine.config)
    engine.__enter__()
    _global[_thread_key()] = engine
    return engine.config


def disable_compression() -> None:
    """Undo ``enable_compression`` for the calling thread (packs already made still unpack)."""
    engine = _global.get(_thread_key())
    if engine is not None:
        engine.__exit__(None, None, None)  # raises (and changes nothing) inside a compression() block
        _global.pop(_thread_key(), None)


def is_enabled() -> bool:
    """True when compression is on in this thread (globally or inside a ``compression`` block)."""
    from .engine import _state

    return bool(_state().engines)


def current_config() -> CompressionConfig | None:
    """The config of the innermost active compression of this thread, or None."""
    from .engine import _state

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


def _prepare_model(model: Any, config: CompressionConfig) -> None:
    if not config.lean_lm_head or config.mode == "lossless":
        return
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        apply_lean_lm_head(model)


__all__ = [
    "MODES",
    "SUPPORTED_MODEL_TYPES",
    "apply_lean_lm_head",
    "linear_cross_entropy",
    "remove_lean_lm_head",
    "CompressionConfig",
    "CompressionStats",
    "compression",
    "current_config",
    "disable_compression",
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
    try:
        from ciuic_integrations import _register_lazy
    except ImportError:  # a partial install without the integrations package
        return
    _register_lazy()


_register_integrations()
