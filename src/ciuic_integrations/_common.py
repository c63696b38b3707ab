"""What every framework integration shares: reading a compression setting from a framework's config,
importing the framework with a message naming the extra to install, and wrapping a call in one
long-lived compression engine.

Nothing here imports a framework, and ``ciuic`` is imported inside functions only: this module is
loaded while ``import ciuic`` is still running (by the lazy Lightning registration).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

# The variable a launcher (``ciuic-accelerate``) sets for its child processes: a mode string such as
# ``"4:1"`` or a JSON object of ``CompressionConfig`` options.
ENV_MODE = "CIUIC_MODE"
# Where the launched processes write their accounting at exit (one JSON per rank), when set.
ENV_STATS_DIR = "CIUIC_STATS_DIR"

# Values of a mode flag that mean "compression off" (``--ciuic off``).
_OFF = ("", "off", "none", "no", "false", "0")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that says which ``ciuic[extra]`` to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"ciuic's {extra} integration needs the {module.split('.')[0]!r} package, which could not be "
            f"imported ({error}). Install it with: pip install 'ciuic[{extra}]'"
        ) from error


def parse_setting(value: Any) -> Any:
    """A command-line or environment value -> what ``CompressionConfig.from_value`` takes.

    ``"4:1"`` stays a mode string; ``'{"mode": "auto", "budget": "12GB"}'`` becomes a dict;
    ``None``/``"off"``/``"none"`` become None (compression off). Anything else passes through.
    """
    if value is None or value is False:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _OFF:
            return None
        if text.startswith("{"):
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"ciuic setting {value!r} is not valid JSON: {error}") from None
        return text
    return value


def resolve_config(mode: Any = None, options: Mapping[str, Any] | str | None = None) -> Any:
    """A ``CompressionConfig`` from a mode (string, JSON string, dict or config) and extra options,
    or None when both say "off". Bad values raise ValueError naming the valid ones (from ciuic)."""
    from ciuic import CompressionConfig

    setting = parse_setting(mode)
    extra = parse_setting(options) or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"ciuic options {options!r} are not valid; allowed: a dict or a JSON object")
    if setting is None:
        # Options alone (e.g. only ``ciuic_config`` given) turn compression on, in their mode or 4:1.
        return CompressionConfig.from_value(dict(extra)) if extra else None
    if "mode" in extra and isinstance(setting, str) and extra["mode"] != setting:
        raise ValueError(f"ciuic mode given twice: {setting!r} and options mode={extra['mode']!r}; give it once")
    return CompressionConfig.from_value(setting, **{k: v for k, v in extra.items() if k != "mode"})


def split_options(kwargs: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split keyword arguments into ``CompressionConfig`` options and the rest (the framework's)."""
    from ciuic import CompressionConfig

    names = set(CompressionConfig.options()) - {"mode"}
    ours = {k: v for k, v in kwargs.items() if k in names}
    theirs = {k: v for k, v in kwargs.items() if k not in names}
    return ours, theirs


def setting_for_env(config: Any) -> str:
    """The ``CIUIC_MODE`` value that rebuilds ``config``: its mode alone when every other option is
    at its default, else a JSON object of the options that differ."""
    import dataclasses

    from ciuic import CompressionConfig

    default = CompressionConfig()
    changed = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name != "mode" and getattr(config, f.name) != getattr(default, f.name)
    }
    if not changed:
        return config.mode
    changed = {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}
    return json.dumps({"mode": config.mode, **changed})


def config_from_env() -> Any:
    """The config ``CIUIC_MODE`` asks for, or None when it is unset or "off"."""
    return resolve_config(os.environ.get(ENV_MODE))


class CompressionSession:
    """One compression engine kept for a whole run and entered around each training step.

    ``step()`` is a no-op when the engine is already active (a nested call, e.g. Fabric's
    ``autocast()`` inside a forward) or when nothing will be saved for backward. ``prepare()``
    prepares the model (a Hugging Face causal LM's lean LM head) for the whole run; ``close()``
    undoes it, and undoes ``compress_forward`` on the modules it wrapped: after ``close()`` the
    model's forward is the object it was before, and its steps save tensors uncompressed.
    """

    def __init__(self, config: Any, model: Any = None) -> None:
        self.config = config
        self._model = model
        self._engine: Any = None
        self._undo: list[Callable[[], None]] = []

    @property
    def engine(self) -> Any:
        if self._engine is None:
            import ciuic

            self._engine = ciuic.compression(self.config)
        return self._engine

    def prepare(self) -> None:
        """Build the engine now and prepare the model, instead of at the first step."""
        self.engine
        if self._model is not None:
            import ciuic

            self._undo.append(ciuic._prepare_model(self._model, self.engine.config))
            self._model = None

    def on_close(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` at ``close()`` (last registered, first run)."""
        self._undo.append(undo)

    @contextlib.contextmanager
    def step(self, training: bool = True) -> Iterator[None]:
        import torch

        if not training or not torch.is_grad_enabled() or (self._engine is not None and self._engine.active):
            yield
            return
        with self.engine:
            yield

    def close(self) -> None:
        """Leave the engine if a callback left it entered, drop it, and undo what was patched."""
        if self._engine is not None and self._engine.active:
            self._engine.__exit__(None, None, None)
        self._engine = None
        while self._undo:
            self._undo.pop()()
        import ciuic

        ciuic.empty_pool()  # training is over: the pack buffers kept for the next step are not needed

    def __getstate__(self) -> dict:
        # Strategies are pickled by spawn launchers; an engine holds hooks and is rebuilt lazily.
        return {"config": self.config, "_model": None, "_engine": None, "_undo": []}


def compress_forward(module: Any, session: CompressionSession) -> None:
    """Run ``module``'s forward inside ``session`` when it trains (an instance attribute, as
    accelerate does for autocast; ``__wrapped__`` lets accelerate's ``unwrap_model`` peel it).
    ``session.close()`` puts the forward back."""
    if getattr(module, "_ciuic_session", None) is not None:
        module._ciuic_session = session
        return
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    forward: Callable = module.forward

    @functools.wraps(forward)
    def compressed_forward(*args: Any, **kwargs: Any) -> Any:
        with module._ciuic_session.step(training=module.training):
            return forward(*args, **kwargs)

    module._ciuic_session = session
    module.forward = compressed_forward

    def undo() -> None:
        if module.__dict__.get("forward") is compressed_forward:
            if had_own:
                module.forward = previous
            else:
                del module.forward
        module.__dict__.pop("_ciuic_session", None)

    session.on_close(undo)


def describe(stats: Any) -> str:
    """One line about what ``ciuic.stats()`` measured, for logs and the launcher's exit message."""
    if not stats.tensors_packed:
        return "ciuic: no saved activations were seen (no training forward ran under compression)"
    mib = 2.0**20
    peak_before, peak_after = stats.peak_live_before, stats.peak_live_after
    return (
        f"ciuic: saved activations at peak {peak_before / mib:.2f} MiB -> {peak_after / mib:.2f} MiB "
        f"({(peak_before - peak_after) / mib:.2f} MiB saved); overall ratio {stats.ratio:.2f}x "
        f"over {stats.tensors_packed} tensors"
    )
