"""Registration of the fastdiff:: ops with torch.library, at a low cost per call.

Each op is defined by its schema on one torch.library.Library fragment, with
one Python kernel for every device (CompositeExplicitAutograd: the kernel
resolves the backend from the dispatch table itself), a fake impl for
FakeTensor / torch.compile, and, where the op is differentiable, an autograd
formula (torch.library.register_autograd). The op is the returned OpOverload,
torch.ops.fastdiff.<name>.default.

This is what torch.library.custom_op builds too, less the Python layers it
puts around every eager call (CustomOpDef.__call__, a per-device kernel
wrapper that checks the output does not alias an input, an autograd kernel
for ops that have no gradient): on tiny inputs those cost about as much as
the rest of the call (benchmarks/test_overhead_bench.py). The kernel is still
hidden from Dynamo (torch._disable_dynamo, as custom_op does), so a Python
frame the dispatcher enters from a graph break is not traced.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("fastdiff", "FRAGMENT")


def define(schema: str, kernel: Callable, fake: Callable, *, backward: Callable | None = None,
           setup_context: Callable | None = None) -> torch._ops.OpOverload:
    """Defines fastdiff::<schema>; returns the op (an OpOverload).

    With `backward` (and `setup_context`), the op is differentiable through
    torch.library.register_autograd. Without, it is non-differentiable: its
    outputs never require grad, and the kernel runs below autograd (the
    pattern torch.library recommends for such ops, with a fallthrough at the
    Autograd key instead of a Python kernel that re-dispatches, which would
    cost a third of the call again).
    """
    name = schema.partition("(")[0]
    LIB.define(schema)
    if backward is None:
        def below_autograd(*args, _kernel=kernel):
            with torch._C._AutoDispatchBelowAutograd():
                return _kernel(*args)

        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
        kernel = below_autograd
    LIB.impl(name, torch._disable_dynamo(kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastdiff::{name}", fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(f"fastdiff::{name}", backward, setup_context=setup_context, lib=LIB)
    return getattr(torch.ops.fastdiff, name).default
