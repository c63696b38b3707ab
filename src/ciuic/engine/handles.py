"""What pack returns for a saved tensor, and what unpack turns back into it.

Every handle that stands for a tensor the program could still write to remembers that tensor's
version counter at pack time and raises autograd's own error at unpack if it changed: with
saved-tensor hooks set, autograd no longer checks versions itself, so ciuic must (a program raises
exactly where plain PyTorch raises). A handle that holds no reference to the tensor (a compressed
copy) checks through a weak reference: a tensor that died cannot be written to any more.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

import ciuic_kernels
from ciuic_kernels import Packed

# ----------------------------------------------------------------------------------------------
# keep_exact: a tensor the caller wants kept as it is (and still counted)
# ----------------------------------------------------------------------------------------------
_keep_ids: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def keep_exact(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` so the engine saves it exactly (it is still counted in the stats). Returns ``t``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"keep_exact expects a torch.Tensor, got {type(t).__name__}")
    _keep_ids[id(t)] = t
    return t


def is_kept(t: torch.Tensor) -> bool:
    return _keep_ids.get(id(t)) is t


# ----------------------------------------------------------------------------------------------
# In-place checks
# ----------------------------------------------------------------------------------------------
def check_version(tensor: torch.Tensor | None, expected: int, written: int | None = None) -> None:
    """Raise autograd's in-place error when ``tensor`` was written to after it was saved (or, once
    it is gone, when the op tracker saw a write to its storage: ``written`` is the version then)."""
    if tensor is not None and tensor._version != expected:
        _raise_inplace(f"{tensor.dtype} {list(tensor.shape)}", tensor._version, expected)
    if written is not None:
        _raise_inplace("a saved tensor", written, expected)


def _raise_inplace(what: str, version: int, expected: int) -> None:
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace "
        f"operation: [{what}] is at version {version}; expected version {expected} instead. Hint: "
        "the tensor was saved for backward (under ciuic's compression) and written to in place "
        "before backward ran; write to a copy (x = x.clone()) or use the out-of-place op."
    )


def anchor_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor owning ``t``'s storage (a view made by an op dies at once, its base lives as
    long as the storage is in use): what weak references are anchored on."""
    return t._base if t._base is not None else t


class Ref:
    """A tensor kept as it is (a parameter, a tensor kept exact): checked for in-place writes."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor, version: int | None = None) -> None:
        self.tensor = tensor
        self.version = tensor._version if version is None else version

    def unpack(self) -> torch.Tensor:
        check_version(self.tensor, self.version)
        return self.tensor


class CopyRef(Ref):
    """A small view kept as a copy (so its large storage can be freed): checked for in-place
    writes against the tensor it was copied from, through a weak reference."""

    __slots__ = ("anchor", "written")

    def __init__(self, copy: torch.Tensor, t: torch.Tensor) -> None:
        super().__init__(copy)
        self.anchor = weakref.ref(anchor_of(t))
        self.version = t._version
        self.written = None

    def unpack(self) -> torch.Tensor:
        check_version(self.anchor(), self.version, self.written)
        return self.tensor


class ParamCast:
    """A dtype copy of a parameter or buffer (autocast's weight cast, ``.to()``, ``.half()``), or a
    view of one: rebuilt from the parameter in backward, bit-identical, zero bytes."""

    __slots__ = ("param", "dtype", "version", "view", "__weakref__")

    def __init__(self, param: torch.Tensor, t: torch.Tensor) -> None:
        self.param = param
        self.dtype = t.dtype
        self.version = param._version
        self.view = None if t._base is None else (tuple(t.shape), t.stride(), t.storage_offset())

    def unpack(self) -> torch.Tensor:
        check_version(self.param, self.version)
        with torch.no_grad():
            full = self.param.to(self.dtype)
            return full if self.view is None else full.as_strided(*self.view)


# ----------------------------------------------------------------------------------------------
# What gets packed for a saved tensor: its whole storage, or a dense copy of a partial view
# ----------------------------------------------------------------------------------------------
def covers_storage(t: torch.Tensor) -> bool:
    """True when ``t`` touches every byte of its storage (contiguous, transposed, permuted or
    broadcast views), so packing the storage costs no more than packing ``t``."""
    nbytes = t.untyped_storage().nbytes()
    size = t.element_size()
    return nbytes % size == 0 and nbytes <= t.numel() * size


def view_of(t: torch.Tensor) -> tuple:
    """How ``t`` is rebuilt from what ``source`` packs: (shape, stride, offset) into the decoded
    flat storage, or (shape, None, 0) for a dense copy of a partial view."""
    if covers_storage(t):
        return (tuple(t.shape), t.stride(), t.storage_offset())
    return (tuple(t.shape), None, 0)


def source(t: torch.Tensor, view: tuple) -> torch.Tensor:
    """The flat tensor to compress for saved tensor ``t`` (``view`` from ``view_of``).

    When ``t`` covers its whole storage (SDPA's output and the o_proj input that is its reshape
    are one storage on CPU), the storage itself is packed and every view of it is rebuilt with
    ``as_strided``: one pack per storage, like the memory the uncompressed run holds. A view of
    part of a larger storage is packed on its own (copied dense)."""
    if view[1] is not None:
        storage = t.untyped_storage()
        flat = torch.empty(0, dtype=t.dtype, device=t.device)
        flat.set_(storage, 0, (storage.nbytes() // t.element_size(),), (1,))
        return flat
    return t.contiguous().view(-1)


def pack_key(t: torch.Tensor, view: tuple) -> tuple:
    """Cache key of what ``source`` packs for ``t``: its whole storage, or (for a partial view,
    packed as a dense copy that is freed after encoding) the view itself — never the copy's
    address, which the next copy may reuse."""
    storage = t.untyped_storage()
    if view[1] is not None:
        return ("storage", storage.data_ptr(), storage.nbytes(), t.dtype, t.device, t._version)
    return ("view", storage.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype,
            t.device, t._version)


def storage_key(t: torch.Tensor) -> tuple:
    """Identifies a live storage (counted once per pass, whatever views of it are saved)."""
    storage = t.untyped_storage()
    return ("seen", storage.data_ptr(), storage.nbytes(), t.device)


def rebuild(flat: torch.Tensor, view: tuple) -> torch.Tensor:
    shape, stride, offset = view
    if stride is None:
        return flat.view(shape)
    return flat.as_strided(shape, stride, offset)


# ----------------------------------------------------------------------------------------------
# Compressed storages
# ----------------------------------------------------------------------------------------------
class Pack:
    """A compressed storage (or dense copy of a partial view), shared by every op that saved it."""

    __slots__ = ("packed", "level", "cls", "uses", "charge", "pool", "_decoded", "__weakref__")

    def __init__(self, packed: Packed, level: int, cls: str, pool: Any = None) -> None:
        self.packed = packed
        self.level = level
        self.cls = cls
        self.uses = 0  # views handed out and not yet unpacked
        self.charge: Any = None  # stats.Charge, adjusted when the pack is re-encoded finer
        self.pool = pool  # the PackPool its memory came from (None: allocated from torch)
        self._decoded = None

    def __del__(self) -> None:
        # autograd freed the last saved tensor of this pack: its memory goes back to the pool
        # (handed out again only once no view of it is alive: see ciuic_kernels._pool)
        pool = self.pool
        if pool is not None:
            try:
                pool.give(self.packed)
            except Exception:  # at interpreter exit the pool's module may be gone: nothing to reuse
                pass

    def replace(self, packed: Packed, level: int) -> None:
        """Re-encoded (finer): the old pack's memory goes back to the pool."""
        old, self.packed, self.level = self.packed, packed, level
        if self.pool is not None:
            self.pool.give(old)

    def decode(self) -> torch.Tensor:
        # Several consumers (q/k/v projections) unpack the same pack one after the other in
        # backward: decode once, keep the result until the last of them has it.
        out = self._decoded
        if out is None:
            with torch.no_grad():
                out = ciuic_kernels.decode(self.packed)
        self.uses -= 1
        self._decoded = out if self.uses > 0 else None
        return out


class View:
    """One saved tensor of a pack: the view to rebuild from the decode, and the in-place check
    (``anchor``: a weak reference to the tensor owning the saved storage, ``version``: its version
    counter when saved). Each ``View`` is one use of its pack (unpacked once by autograd, or once
    by a recompute)."""

    __slots__ = ("pack", "view", "anchor", "version", "written", "__weakref__")

    def __init__(self, pack: Pack, view: tuple, anchor: weakref.ref, version: int) -> None:
        self.pack, self.view, self.anchor, self.version = pack, view, anchor, version
        self.written = None  # the version an in-place write seen by the op tracker left
        pack.uses += 1

    @classmethod
    def of(cls, pack: Pack, view: tuple, t: torch.Tensor) -> "View":
        return cls(pack, view, weakref.ref(anchor_of(t)), t._version)

    def again(self) -> "View":
        """Another use of the same saved tensor (a recompute copied for a second consumer)."""
        return View(self.pack, self.view, self.anchor, self.version)

    def unpack(self) -> torch.Tensor:
        check_version(self.anchor(), self.version, self.written)
        return rebuild(self.pack.decode(), self.view)
