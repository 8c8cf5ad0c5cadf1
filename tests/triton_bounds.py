"""Bounds checking for Triton kernels run by the interpreter (TRITON_INTERPRET=1), a test utility.

On a GPU an out-of-bounds tl.load / tl.store faults ("an illegal memory access") or silently touches a neighbouring
allocation; the interpreter reads and writes host memory through raw addresses and checks nothing. Inside
``checked_bounds()`` every enabled (unmasked) lane of every tl.load / tl.store (and atomic) must address bytes of the
tensor argument its pointer was derived from: that tensor's own extent [data_ptr, data_ptr + span), span covering
its last element through its strides (with ``storage=True``, its whole untyped storage). The argument a pointer
comes from is followed through pointer arithmetic (addptr, splat, broadcast, expand_dims); a pointer that
loses it (formed by another op) must fall inside some tensor argument. A stray lane raises OutOfBounds naming the
kernel, the program id, the argument and the offset in its elements; the interpreter re-raises it as an
InterpreterError whose message contains it.

    with checked_bounds():
        o = some_op(x)          # interpreted kernels; raises at the first stray lane
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
import torch
import triton.language as tl
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


class _Extent(NamedTuple):
    name: str
    lo: int  # first byte
    hi: int  # one past the last byte
    itemsize: int


_launch: dict = {"kernel": None, "extents": []}
_DERIVING = ("create_addptr", "create_splat", "create_broadcast", "create_expand_dims")


def _extents(names, values, storage: bool) -> list[_Extent]:
    out = []
    for name, value in zip(names, values):
        if isinstance(value, tuple):
            out += _extents([f"{name}[{i}]" for i in range(len(value))], value, storage)
        elif isinstance(value, torch.Tensor) and value.numel() > 0:
            if storage:
                lo = value.untyped_storage().data_ptr()
                hi = lo + value.untyped_storage().nbytes()
            else:
                lo = value.data_ptr()
                hi = lo + (sum((n - 1) * s for n, s in zip(value.shape, value.stride())) + 1) * value.element_size()
            out.append(_Extent(name, lo, hi, value.element_size()))
    return out


def _base(handle):
    """The extent a pointer handle derives from: carried in its attr, or an argument's own address (the widest
    extent starting there, as arguments may alias). None when unknown."""
    if "bounds_base" in handle.attr or not isinstance(handle.dtype, tl.pointer_type):
        return handle.attr.get("bounds_base")
    data = np.asarray(handle.data).ravel()
    if data.size == 0 or not (data == data[0]).all():
        return None
    starting = [e for e in _launch["extents"] if e.lo == int(data[0])]
    return max(starting, key=lambda e: e.hi, default=None)


def _check(ptrs, mask, op: str):
    addr = ptrs.data if mask is None else ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
    addr = np.asarray(addr, dtype=np.uint64).ravel()
    if addr.size == 0:
        return
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    base = _base(ptrs)
    extents = [base] if base is not None else _launch["extents"]
    inside = np.zeros(addr.shape, dtype=bool)
    for e in extents:
        inside |= (addr >= e.lo) & (addr + width <= e.hi)
    if inside.all():
        return
    bad = int(addr[~inside][0])
    nearest = min(extents, key=lambda e: min(abs(bad - e.lo), abs(bad - e.hi)), default=None)
    where = "no tensor arguments" if nearest is None else (
        f"{'argument' if base is not None else 'nearest argument'} '{nearest.name}' "
        f"({(nearest.hi - nearest.lo) // nearest.itemsize} elements): element offset {(bad - nearest.lo) / nearest.itemsize:g}")
    grid_idx = tuple(int(i) for i in interpreter.interpreter_builder.grid_idx)
    raise OutOfBounds(f"out of bounds: {op} in kernel {_launch['kernel']} program {grid_idx}, "
                      f"{int((~inside).sum())} stray lanes, first at {where}")


@contextlib.contextmanager
def checked_bounds(storage: bool = False):
    """Check every interpreted kernel launch's loads and stores while active (see the module docstring)."""
    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    originals = {name: getattr(builder, name) for name in
                 ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas", *_DERIVING)}
    original_init_args = executor._init_args_hst

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = original_init_args(self, args_dev, kwargs)
        names = list(self.arg_names[:len(args_hst)]) + list(kwargs_hst)
        _launch["kernel"] = self.fn.__name__
        _launch["extents"] = _extents(names, list(args_hst) + list(kwargs_hst.values()), storage)
        return args_hst, kwargs_hst

    def deriving(name):
        def derive(self, *args):
            source = next(a for a in args if isinstance(a, interpreter.TensorHandle))
            out = originals[name](self, *args)
            base = _base(source)
            if base is not None:
                out.attr = {**out.attr, "bounds_base": base}
            return out
        return derive

    def masked_load(self, ptrs, mask, *args):
        _check(ptrs, mask, "load")
        return originals["create_masked_load"](self, ptrs, mask, *args)

    def masked_store(self, ptrs, value, mask, *args):
        _check(ptrs, mask, "store")
        return originals["create_masked_store"](self, ptrs, value, mask, *args)

    def atomic_rmw(self, op, ptr, val, mask, *args):
        _check(ptr, mask, "atomic")
        return originals["create_atomic_rmw"](self, op, ptr, val, mask, *args)

    def atomic_cas(self, ptr, cmp, val, *args):
        _check(ptr, None, "atomic")
        return originals["create_atomic_cas"](self, ptr, cmp, val, *args)

    replacements = {"create_masked_load": masked_load, "create_masked_store": masked_store,
                    "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas,
                    **{name: deriving(name) for name in _DERIVING}}
    for name, fn in replacements.items():
        setattr(builder, name, fn)
    executor._init_args_hst = init_args
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(builder, name, fn)
        executor._init_args_hst = original_init_args
        _launch.update(kernel=None, extents=[])
