"""Lets Triton 3.6's interpreter run under NumPy >= 2.4 (tests only).

Triton < 3.7's interpreter turns a scalar kernel argument used as a loop bound
(`for d0 in range(0, D, BD)`) into an int with `int(handle.data)`, where the
data is a 1-element array; NumPy 2.4 made int() of an array with ndim > 0 an
error. Compiled kernels are not affected (the GPU machine runs them with
triton 3.6), only the interpreter our CPU tests use, so the interpreter's
`__index__` is wrapped here, in the test processes that set TRITON_INTERPRET=1,
and nowhere in the library.
"""
from __future__ import annotations

import numpy as np


def patch_triton_interpreter() -> bool:
    """Applies the wrapper when this triton and numpy need it; returns whether it did."""
    try:
        int(np.zeros(1))
        return False                      # numpy still converts 1-element arrays
    except TypeError:
        pass
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "fastdiff_wrapped", False):
        return False

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched.fastdiff_wrapped = True
    interpreter._patch_lang_tensor = patched
    return True
