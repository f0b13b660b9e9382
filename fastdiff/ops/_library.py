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
from torch import _C

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
            if not _C._any_requires_grad(*args):    # nothing to keep out of autograd
                return _kernel(*args)
            with _C._AutoDispatchBelowAutograd():
                return _kernel(*args)

        LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
        kernel = below_autograd
    LIB.impl(name, torch._disable_dynamo(kernel), "CompositeExplicitAutograd")
    torch.library.register_fake(f"fastdiff::{name}", fake, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(f"fastdiff::{name}", backward, setup_context=setup_context, lib=LIB)
    return getattr(torch.ops.fastdiff, name).default


def plain_eager(*tensors) -> bool:
    """Whether calling an op's kernel on `tensors` directly does what calling the op does.

    True in plain eager mode: not traced (torch.compile, export), no dispatch
    or torch-function mode, functorch transform or profiler active, and the
    tensors are plain torch.Tensor (no subclass such as FakeTensor or DTensor)
    that do not require grad. Then the dispatcher would only call the kernel.
    Costs about a microsecond; the op's call through the dispatcher into Python
    costs tens.
    """
    if (torch.compiler.is_compiling() or _C._len_torch_dispatch_stack() or _C._is_torch_function_mode_enabled()
            or _C._are_functorch_transforms_active() or _C._any_requires_grad(*tensors)
            or torch.autograd._profiler_enabled()):
        return False
    for t in tensors:
        if type(t) is not torch.Tensor:
            return False
    return True
