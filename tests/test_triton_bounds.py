"""tests/triton_bounds.py, the interpreter's bounds check, on a copy kernel: masked lanes pass; a lane past its
tensor raises, also where it lands in another argument of the launch (the pointer's own argument is followed),
and with ``storage=True`` only past the tensor's storage; the interpreter is restored afterwards (nesting too)."""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from triton_bounds import checked_bounds

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the Triton interpreter")


@triton.jit
def _copy_kernel(x, y, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < n
    if MASKED:
        tl.store(y + r, tl.load(x + r, mask=ok), mask=ok)
    else:
        tl.store(y + r, tl.load(x + r))


def test_masked_lanes_pass_and_stray_lanes_raise():
    before = interpreter.InterpreterBuilder.create_masked_load  # conftest's check may be active around the test
    buffer = torch.arange(26.0)
    x, y = buffer[:10], buffer[10:20]  # x's 6 lanes past its end fall in y
    with checked_bounds():
        _copy_kernel[(1,)](x, y, 10, BLOCK=16, MASKED=True)
        assert torch.equal(y, x)
        with pytest.raises(Exception, match=r"load in kernel _copy_kernel program \(0, 0, 0\), 6 stray lanes, "
                                            r"first at argument 'x' \(10 elements\): element offset 10"):
            _copy_kernel[(1,)](x, y, 10, BLOCK=16, MASKED=False)
    with checked_bounds(storage=True):
        _copy_kernel[(1,)](x, y, 10, BLOCK=16, MASKED=False)  # every lane stays in the storage
        with pytest.raises(Exception, match="store in kernel _copy_kernel"):  # buffer[26:32] is past it
            _copy_kernel[(1,)](x, buffer[16:], 10, BLOCK=16, MASKED=False)
    assert interpreter.InterpreterBuilder.create_masked_load is before
