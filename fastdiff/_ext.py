"""Loads the compiled extension `fastdiff._C`, remembering why it failed if it did."""
from __future__ import annotations

import torch

try:
    from fastdiff import _C  # noqa: F401  (registers torch.ops.fastdiff_ext.*)

    LOAD_ERROR: str | None = None
except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
    _C = None
    LOAD_ERROR = f"the C++ extension fastdiff._C did not load ({type(exc).__name__}: {exc}); " \
                 "build it with `pip install --no-build-isolation -e .`"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered `fastdiff_ext::<op>` for `dispatch_key` ("CPU", "CUDA")."""
    if _C is None:
        return False
    name = f"fastdiff_ext::{op}"
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)
    except RuntimeError:
        return False
