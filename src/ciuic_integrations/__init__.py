"""ciuic inside the training frameworks: each one's own config turns activation compression on.

=================  =======================================================================
Lightning          ``Trainer(strategy="ciuic")`` / ``"ciuic_ddp"`` / ``"ciuic_8:1"``, or
                   ``CiuicStrategy(mode="8:1")`` (``ciuic_integrations.lightning``)
Fabric             ``Fabric(strategy="ciuic")`` / ``"ciuic_ddp"``
Accelerate         ``ciuic-accelerate launch --ciuic 4:1 ... train.py``, or
                   ``CiuicAccelerator(ciuic_plugin=CiuicPlugin(mode="4:1"))``
                   (``ciuic_integrations.accelerate``)
HF Trainer         ``--ciuic 4:1`` with ``CiuicTrainingArguments`` + ``CiuicTrainer``, or
                   ``CiuicCallback`` on a stock ``Trainer`` (``ciuic_integrations.transformers``)
=================  =======================================================================

Lightning finds strategies only in its own registry and has no plugin discovery, so the strategy
names are registered lazily: ``import ciuic`` calls ``_register_lazy()``, which registers them at
once if Lightning is already imported, and otherwise installs an import hook that registers them
right after Lightning's ``strategies`` module is loaded. ``import ciuic`` itself never imports a
framework. The frameworks are optional extras: ``pip install 'ciuic[lightning]'`` (or
``[accelerate]``, ``[transformers]``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from typing import Any

# strategies module -> the package whose strategies ciuic_integrations.lightning builds for it.
_LIGHTNING_STRATEGY_MODULES = {
    "lightning.pytorch.strategies": "lightning.pytorch",
    "lightning.fabric.strategies": "lightning.fabric",
    "pytorch_lightning.strategies": "pytorch_lightning",
    "lightning_fabric.strategies": "lightning_fabric",
}
# The attribute each strategies module defines last: present means the module finished loading.
_REGISTRY_ATTRIBUTE = {
    "lightning.pytorch": "StrategyRegistry",
    "pytorch_lightning": "StrategyRegistry",
    "lightning.fabric": "STRATEGY_REGISTRY",
    "lightning_fabric": "STRATEGY_REGISTRY",
}


def _register_now(package: str) -> None:
    try:
        from .lightning import register_strategies

        register_strategies(package)
    except Exception as error:  # never break the user's `import lightning` because of ciuic
        warnings.warn(
            f"ciuic could not register its strategies in {package}: {error!r}; "
            f"strategy='ciuic' will not be available (CiuicStrategy(...) instances still may be)",
            RuntimeWarning,
            stacklevel=2,
        )


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs the real loader, then registers ciuic's strategies in the module just loaded."""

    def __init__(self, loader: Any, package: str) -> None:
        self._loader = loader
        self._package = package

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        _register_now(self._package)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class _LightningImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only reacts to Lightning's ``strategies`` modules: it asks
    the other finders for the real spec and wraps its loader (no import happens here)."""

    def __init__(self) -> None:
        self._busy = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package = _LIGHTNING_STRATEGY_MODULES.get(fullname)
        if package is None or getattr(self._busy, "active", False):
            return None
        self._busy.active = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy.active = False
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenRegister(spec.loader, package)
        return spec


_hook: _LightningImportHook | None = None
_lock = threading.Lock()


def _register_lazy() -> None:
    """Make ``strategy="ciuic"`` (and the other names) work in Lightning and Fabric without
    importing them: register now in what is already imported, hook the import of the rest.
    Idempotent; called by ``import ciuic``. Also registers the Hugging Face model preparer (the
    lean LM head of ``compression(model=...)``), which imports nothing from transformers."""
    global _hook
    import ciuic

    from ._hf_lm_head import prepare_model

    ciuic._register_model_preparer(prepare_model)
    with _lock:
        for module_name, package in _LIGHTNING_STRATEGY_MODULES.items():
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, _REGISTRY_ATTRIBUTE[package]):
                _register_now(package)
        if _hook is None:
            _hook = _LightningImportHook()
            sys.meta_path.insert(0, _hook)


__all__: list[str] = []

# A first import of a submodule (``from ciuic_integrations.transformers import ...`` before any
# ``import ciuic``) must leave ciuic fully imported and registered, the same as ``import ciuic``
# first. This runs last, once ``_register_lazy`` exists: ``import ciuic`` calls it, and its
# ``_hf_lm_head`` import then finds ``ciuic`` already defining everything it uses.
importlib.import_module("ciuic")
