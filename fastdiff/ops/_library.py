"""Registration of the fastdiff:: ops with torch.library, at a low cost per call.

Each op is defined by its schema on one torch.library.Library fragment, with
one Python kernel for every device (CompositeExplicitAutograd: the kernel
resolves the backend from the dispatch table itself), a fake impl for
FakeTensor / torch.compile, and an Autograd kernel: for a differentiable op,
an autograd.Function around the op re-dispatched below autograd (what
torch.library.register_autograd builds); for a non-differentiable one, a
fallthrough. The op is the returned OpOverload, torch.ops.fastdiff.<name>.default.

This is what torch.library.custom_op builds too, less the Python layers it
puts around every eager call (CustomOpDef.__call__, a per-device kernel
wrapper that checks the output does not alias an input, an autograd kernel
in Python also for ops that have no gradient, argument handling for schemas
with defaults): on tiny inputs those cost as much as the rest of the call
(benchmarks/test_overhead_bench.py). The kernel is still hidden from Dynamo
(torch._disable_dynamo, as custom_op does), so a Python frame the dispatcher
enters from a graph break is not traced.

plain_eager() says when a public function may skip the dispatcher and call
the kernel itself.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import _C

LIB = torch.library.Library("fastdiff", "FRAGMENT")


def define(schema: str, kernel: Callable, fake: Callable, *, backward: Callable | None = None,
           setup_context: Callable | None = None) -> torch._ops.OpOverload:
    """Defines fastdiff::<schema>; returns the op (an OpOverload).

    With `backward` (and `setup_context`, as for torch.library.register_autograd),
    the op is differentiable. Without, it is non-differentiable: its
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
    op = getattr(torch.ops.fastdiff, name).default
    if backward is not None:
        LIB.impl(name, _autograd_kernel(op, backward, setup_context), "Autograd", with_keyset=True)
    return op


_AFTER_AUTOGRAD = _C._after_autograd_keyset


def _autograd_kernel(op: torch._ops.OpOverload, backward: Callable, setup_context: Callable) -> Callable:
    """The op's Autograd kernel: torch.library.register_autograd's, for our simpler schemas.

    Same contract (setup_context(ctx, inputs, output), backward(ctx, *grads)
    returning one gradient per input, ctx.needs_input_grad per input), less
    the generality our schemas do not need (keyword-only and defaulted
    arguments, tensor lists), which costs a fifth of a small call's forward
    and backward.
    """
    if any(a.kwarg_only or a.has_default_value() for a in op._schema.arguments):
        raise NotImplementedError(f"{op}: keyword-only or defaulted arguments need torch.library.register_autograd")

    def forward(ctx, *args):
        keyset = args[-1]
        args = args[:-1]
        with _C._AutoDispatchBelowAutograd():
            output = op.redispatch(keyset & _AFTER_AUTOGRAD, *args)
        setup_context(ctx, args, output)
        return output

    def backward_(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]            # without the trailing keyset
        try:
            return (*backward(ctx, *grads), None)
        finally:
            ctx.needs_input_grad = needs

    fn = type(f"{op._opname}_autograd", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(backward_)})

    def kernel(keyset, *args):
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            return fn.apply(*args, keyset)
        with _C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & _AFTER_AUTOGRAD, *args)

    return kernel


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
