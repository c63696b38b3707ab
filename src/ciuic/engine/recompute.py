"""Saved tensors rebuilt in backward by re-running a cheap elementwise op on inputs ciuic keeps.

Right after a recomputable op runs (``tracking.RECOMPUTABLE``), the engine notes a ``Recipe``: the
op and where each input can be had again without storing it twice (a parameter, a tensor kept
exact, a pack, another recompute). Only weak references are held, so nothing is kept alive. When
the op's output is then saved, ``build`` turns the recipe into a ``Recompute`` handle.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from .handles import ParamCast, Ref, View, anchor_of, check_version


@dataclass
class Const:
    value: Any  # a Python number, None, a parameter (alive anyway) or a ParamCast


@dataclass
class FromPack:
    pack: weakref.ref
    view: tuple
    site: tuple | None
    anchor: weakref.ref  # the input's storage owner and version: its in-place check
    version: int


@dataclass
class FromTensor:
    tensor: weakref.ref  # a tensor kept exact, held by the graph
    view: tuple  # (shape, stride, offset) of the input, stride None when it is the tensor itself
    version: int  # its version when the recipe was noted


@dataclass
class FromRecompute:
    recompute: weakref.ref


@dataclass
class Recipe:
    result: weakref.ref
    version: int
    func: Any
    sources: list
    kwargs: dict


class Recompute:
    """A saved tensor rebuilt in backward by re-running a cheap op on inputs ciuic keeps."""

    __slots__ = ("func", "args", "kwargs", "dtype", "view", "sites", "anchor", "version", "written", "__weakref__")

    def __init__(self, func: Any, args: list, kwargs: dict, dtype: torch.dtype, view: tuple | None,
                 sites: tuple, anchor: weakref.ref, version: int) -> None:
        self.func, self.args, self.kwargs, self.dtype, self.view = func, args, kwargs, dtype, view
        self.sites = sites  # plan sites of the packs it is rebuilt from (their errors reach it)
        self.anchor, self.version = anchor, version  # the saved tensor's in-place check
        self.written = None

    def again(self, view: tuple | None, anchor: weakref.ref, version: int) -> "Recompute":
        """Another use (another saved view) of the same recomputed tensor: its pack inputs are
        used once more, so they are counted once more."""
        args = [a.again() if isinstance(a, View) else
                a.again(a.view, a.anchor, a.version) if isinstance(a, Recompute) else a for a in self.args]
        return Recompute(self.func, args, self.kwargs, self.dtype, view, self.sites, anchor, version)

    def unpack(self) -> torch.Tensor:
        check_version(self.anchor(), self.version, self.written)
        args = [a.unpack() if isinstance(a, _HANDLES) else a for a in self.args]
        with torch.no_grad():
            out = self.func(*args, **self.kwargs)
        if out.dtype != self.dtype:
            out = out.to(self.dtype)
        return out if self.view is None else out.as_strided(*self.view)


_HANDLES = (View, Ref, Recompute, ParamCast)


def build(recipe: Recipe, owner: torch.Tensor, t: torch.Tensor) -> "Recompute | None":
    """The ``Recompute`` for saved tensor ``t`` (``owner`` or a view of it), or None when one of
    its inputs is gone."""
    args, sites = [], []
    for s in recipe.sources:
        if isinstance(s, Const):
            args.append(s.value)
            continue
        target = (s.pack if isinstance(s, FromPack) else s.tensor if isinstance(s, FromTensor) else s.recompute)()
        if target is None:
            return None
        if isinstance(s, FromPack):
            args.append(View(target, s.view, s.anchor, s.version))
            if s.site is not None:
                sites.append(s.site)
        elif isinstance(s, FromTensor):
            shape, stride, offset = s.view
            if stride is not None and not (tuple(target.shape) == shape and target.stride() == stride
                                           and target.storage_offset() == offset):
                target = target.as_strided(shape, stride, offset)
            args.append(Ref(target, s.version))
        else:
            args.append(target.again(target.view, target.anchor, target.version))
            sites.extend(target.sites)
    view = None
    if t is not owner or t.shape != owner.shape:
        view = (tuple(t.shape), t.stride(), t.storage_offset())
    return Recompute(recipe.func, args, recipe.kwargs, owner.dtype, view, tuple(dict.fromkeys(sites)),
                     weakref.ref(anchor_of(t)), t._version)
