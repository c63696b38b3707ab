"""What is running when a tensor is saved: the torch function (op), the modules, and whether the
tensor is a copy of a parameter or buffer. Module hooks only *name* things (and, during
calibration, watch gradients); passes are delimited by autograd (see ``planner``).

Everything here is invisible to ``torch.compile``: under Dynamo tracing the op tracker and the
module hooks return at once, so they cause no graph break in the user's model.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

_tls = threading.local()


def compiling() -> bool:
    return torch.compiler.is_compiling()


def state() -> Any:
    """This thread's engine state (dies with the thread: nothing it holds outlives it)."""
    s = _tls
    if not hasattr(s, "engines"):
        s.engines = []  # active engines, innermost last
        s.op = ""  # the outermost torch function running now
        s.op_args = ()  # and its positional arguments
        s.op_packs = 0  # tensors that op saved so far
        s.op_saved = []  # (object with an ``anchor``, storage address) made while that op ran
        s.modules = []  # (name, class name, module) of the running modules, innermost last
        s.root = None  # weak reference to the outermost running module
        s.in_codec = False
        s.global_engine = None  # what enable_compression() turned on
        s.planners = {}  # config -> planner (the plan outlives the contexts of one thread)
        s.param_copies = {}  # id(copy) -> (weak copy, param, version): .to()/.half() of a parameter
        s.hooks_token = None
    return s


# ----------------------------------------------------------------------------------------------
# The op tracker
# ----------------------------------------------------------------------------------------------
# Cheap elementwise ops whose output ciuic can rebuild in backward from inputs it already keeps
# (SwiGLU's silu(gate) and silu(gate) * up, GELU's output that feeds the next linear layer):
# storing nothing beats storing 2 bits. Never used by "lossless" (a recompute is not bit-exact
# in every kernel) nor for the sensitive classes (attention, softmax, loss).
RECOMPUTABLE = frozenset({"silu", "gelu", "relu", "sigmoid", "tanh", "mul", "__mul__", "__rmul__", "multiply"})
_COPY_OPS = frozenset({"to", "half", "float", "bfloat16", "double", "type", "_to_copy"})


class OpTracker(TorchFunctionMode):
    """Remembers which torch function is running, so pack knows which op saves a tensor; notes
    how the outputs of cheap elementwise ops were made (see ``RECOMPUTABLE``) and which tensors
    are dtype copies of parameters or buffers."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if compiling():
            return func(*args, **kwargs)
        st = state()
        if st.in_codec or st.op:
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        st.op = name
        st.op_args = args
        st.op_packs = 0
        try:
            result = func(*args, **kwargs)
        finally:
            st.op = ""
            st.op_args = ()
        if st.op_saved:
            _reanchor(st.op_saved, result)
            st.op_saved = []
        if st.engines and _writes_in_place(name, args, kwargs):
            watched = st.engines[-1].planner.current.watched
            if watched:
                for a in (args[0], kwargs.get("out")):
                    if isinstance(a, torch.Tensor):
                        _note_write(watched, a)
        if type(result) is torch.Tensor and st.engines:
            if name in RECOMPUTABLE and result.requires_grad:
                st.engines[-1]._note_recipe(func, args, kwargs, result)
            elif name in _COPY_OPS and args and isinstance(args[0], torch.Tensor):
                _note_copy(st, args[0], result)
        return result


_IN_PLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                               "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                               "__setitem__"})


def _writes_in_place(name: str, args: tuple, kwargs: dict) -> bool:
    return bool(args) and (
        (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS
        or kwargs.get("inplace") is True or kwargs.get("out") is not None)


def _note_write(watched: dict, a: torch.Tensor) -> None:
    """An op wrote to ``a`` in place: every tensor saved from its storage before the write is
    stale (autograd would raise when backward needs it). Seen here, the write is caught even when
    the tensor object is gone by the time backward runs."""
    try:
        address = a.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # sparse, nested or wrapper tensors have no storage
        return
    holders = watched.get(address)
    if not holders:
        return
    version = a._version
    alive = []
    for ref, saved_storage in holders:
        holder = ref()
        # A freed storage's address is reused by new tensors: only a write to the very storage
        # that was saved counts.
        if holder is None or saved_storage.expired():
            continue
        alive.append((ref, saved_storage))
        if holder.version != version and holder.written is None:
            holder.written = version
    watched[address] = alive


def _reanchor(saved: list, result: Any) -> None:
    """An op's output is saved through a short-lived alias (autograd hands pack hooks a
    ``tensor_data()`` copy of an output, sharing its storage and version counter): once the op
    has returned, anchor what pack made for it on the output the program holds, so in-place
    writes to that output are seen and later saves of it are recognised."""
    outputs = [result] if isinstance(result, torch.Tensor) else [
        r for r in result if isinstance(r, torch.Tensor)] if isinstance(result, (tuple, list)) else []
    if not outputs:
        return
    by_storage = {}
    for out in outputs:
        base = out._base if out._base is not None else out
        try:
            by_storage.setdefault(base.untyped_storage().data_ptr(), base)
        except (RuntimeError, NotImplementedError):  # no storage (sparse, nested, wrapper)
            continue
    for holder, address, storage in saved:
        # A composite op (MultiheadAttention's forward, a custom Function) saves temporaries that
        # die before it returns, and its output may reuse a dead temporary's address: only the
        # very storage that was saved, still alive, is re-anchored.
        if holder.anchor() is None and not storage.expired():
            owner = by_storage.get(address)
            if owner is not None:
                holder.anchor = weakref.ref(owner)


def note_saved(holder: Any, t: torch.Tensor) -> None:
    """``holder`` (anything with an ``anchor`` weak reference) was made for saved tensor ``t``
    while an op runs: re-anchored on the op's output when ``t`` is an alias of it."""
    st = state()
    storage = t.untyped_storage()
    address = storage.data_ptr()
    ref = None
    if st.op:
        ref = StorageWeakRef(storage)
        st.op_saved.append((holder, address, ref))
    if hasattr(holder, "written") and st.engines:
        st.engines[-1].planner.current.watched.setdefault(address, []).append(
            (weakref.ref(holder), ref or StorageWeakRef(storage)))


def _note_copy(st: Any, a: torch.Tensor, result: torch.Tensor) -> None:
    if result is a or result.dtype == a.dtype or not result.is_floating_point() or result.grad_fn is not None:
        return  # trainable parameters' copies are found from their grad_fn
    if not (isinstance(a, torch.nn.Parameter) or _is_buffer(st, a)):
        return
    if len(st.param_copies) > 1024:
        st.param_copies = {k: v for k, v in st.param_copies.items() if v[0]() is not None}
    st.param_copies[id(result)] = (weakref.ref(result), a, result._version)


def _is_buffer(st: Any, a: torch.Tensor) -> bool:
    for _, _, module in reversed(st.modules[-2:]):
        if any(b is a for b in module._buffers.values()):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Copies of parameters and buffers
# ----------------------------------------------------------------------------------------------
def _grad_fn_source(base: torch.Tensor) -> torch.Tensor | None:
    """The trainable parameter ``base`` is a plain dtype copy of (``ToCopyBackward0`` straight
    into an ``AccumulateGrad``), else None."""
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or len(fn.next_functions) != 1:
        return None
    nxt = fn.next_functions[0][0]
    if nxt is None or type(nxt).__name__ != "AccumulateGrad":
        return None
    return nxt.variable


_verified: dict = {}  # id(param) -> (weak param, {place: verdict})


def param_source(t: torch.Tensor, st: Any) -> torch.Tensor | None:
    """The parameter or buffer that ``t`` (or the tensor ``t`` is a view of) is a dtype copy of,
    however it was made, else None:

    * a trainable parameter's copy has a ``ToCopyBackward0`` grad_fn (autocast's cast cache);
    * ``.to()``/``.half()``/... of a frozen parameter or a buffer was seen by the op tracker;
    * autocast's cast of a frozen parameter or buffer happens inside the op that saves it (no
      grad_fn, not one of the op's own arguments, the shape of a parameter/buffer argument and
      another dtype). The first time such a candidate is seen at a place in the model it is
      compared with the parameter bit for bit; the verdict is remembered for that place.
    """
    base = t._base if t._base is not None else t
    if not base.is_contiguous():
        return None
    param = _grad_fn_source(base)
    if param is None and base.grad_fn is None:
        entry = st.param_copies.get(id(base))
        if entry is not None and entry[0]() is base and entry[2] == base._version:
            param = entry[1]
        elif st.op_args:
            param = _cast_inside_op(base, st)
    if param is None or param.shape != base.shape or param.is_complex():
        return None
    return param


def _cast_inside_op(base: torch.Tensor, st: Any) -> torch.Tensor | None:
    storage = base.untyped_storage().data_ptr()
    candidates = []
    for a in st.op_args:
        if not isinstance(a, torch.Tensor):
            continue
        if a.untyped_storage().data_ptr() == storage:
            return None  # one of the op's own inputs, not something the op made
        if a.shape == base.shape and a.dtype != base.dtype and (
                isinstance(a, torch.nn.Parameter) or _is_buffer(st, a)):
            candidates.append(a)
    if len(candidates) != 1:
        return None
    param = candidates[0]
    where = (st.modules[-1][0] if st.modules else "", st.op, st.op_packs, base.dtype)
    entry = _verified.get(id(param))
    if entry is None or entry[0]() is not param:
        if len(_verified) > 4096:
            for key in [k for k, v in _verified.items() if v[0]() is None]:
                del _verified[key]
        entry = _verified[id(param)] = (weakref.ref(param), {})
    verdicts = entry[1]
    verdict = verdicts.get(where)
    if verdict is None:
        with torch.no_grad():
            verdict = bool(torch.equal(param.to(base.dtype), base))
        verdicts[where] = verdict
    return param if verdict else None


# ----------------------------------------------------------------------------------------------
# Module hooks: names (and gradient watches while calibrating)
# ----------------------------------------------------------------------------------------------
_module_names: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def _names_under(root: torch.nn.Module) -> "weakref.WeakKeyDictionary":
    names = weakref.WeakKeyDictionary()
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(module, name)
    _module_names[root] = names
    return names


def _name_of(root: torch.nn.Module, module: torch.nn.Module) -> str:
    names = _module_names.get(root)
    name = names.get(module) if names is not None else None
    if name is None:
        # Not seen under this root yet: submodules replaced after the first forward (PEFT injects
        # adapters that way) are found by walking the root again.
        names = _names_under(root)
        name = names.get(module)
        if name is None:
            name = type(module).__name__
            names[module] = name
    return name


def _pre_forward(module: torch.nn.Module, args: Any) -> None:
    if compiling():
        return
    st = state()
    if not st.engines:
        return
    if not st.modules:
        st.root = weakref.ref(module)
    root = st.root()
    name = _name_of(root, module) if root is not None else type(module).__name__
    st.modules.append((name, type(module).__name__, module))


def _post_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
    if compiling():
        return
    st = state()
    if not st.modules:
        return
    name = st.modules.pop()[0]
    if not st.engines:
        return
    planner = st.engines[-1].planner
    if planner.calibrating:
        if isinstance(output, (tuple, list)) and output:
            output = output[0]  # (attention output, weights), (hidden, cache), ...
        if isinstance(output, torch.Tensor) and output.requires_grad:
            planner.watch_gradient(name, output)


_module_hooks: list = []
_module_hooks_users = 0
_module_hooks_lock = threading.Lock()


class _HooksToken:
    """This thread's claim on the global module hooks. Kept in thread-local state: when the
    thread ends with compression on, the token dies with it and the claim is released."""

    __slots__ = ("_finalizer", "__weakref__")

    def __init__(self) -> None:
        _acquire_module_hooks()
        self._finalizer = weakref.finalize(self, _release_module_hooks)

    def release(self) -> None:
        self._finalizer()


def claim_module_hooks() -> None:
    st = state()
    if st.hooks_token is None:
        st.hooks_token = _HooksToken()


def unclaim_module_hooks() -> None:
    st = state()
    if st.hooks_token is not None and not st.engines:
        st.hooks_token.release()
        st.hooks_token = None
        st.modules.clear()


_module_hook_ids: list[int] = []  # the ids the global hooks got the first time (see _same_id)


def _same_id(handle: Any, index: int) -> Any:
    """Give a re-registered global hook the id it had the first time. torch.compile guards on the
    keys of torch's global hook dicts: a new id per compression block (hooks go when the last
    engine of a thread exits) would recompile a compiled model at every step."""
    if index == len(_module_hook_ids):
        _module_hook_ids.append(handle.id)
        return handle
    old, new = _module_hook_ids[index], handle.id
    for d in handle.hooks_dict_ref(), *(ref() for ref in handle.extra_dict_ref):
        if d is not None and new in d and old not in d:
            d[old] = d.pop(new)
    handle.id = old
    return handle


def _acquire_module_hooks() -> None:
    global _module_hooks_users
    with _module_hooks_lock:
        if _module_hooks_users == 0:
            from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

            _module_hooks.append(_same_id(register_module_forward_pre_hook(_pre_forward), 0))
            _module_hooks.append(_same_id(register_module_forward_hook(_post_forward, always_call=True), 1))
        _module_hooks_users += 1


def _release_module_hooks() -> None:
    global _module_hooks_users
    with _module_hooks_lock:
        _module_hooks_users -= 1
        if _module_hooks_users == 0:
            while _module_hooks:
                _module_hooks.pop().remove()


def module_hooks_installed() -> int:
    """How many global module hooks ciuic has installed now (0 when no thread compresses)."""
    with _module_hooks_lock:
        return len(_module_hooks)
