"""The fused weighted mean-squared error of a diffusion objective.

    loss = mean_j weight_j * (pred_j - target_j)^2        (mean over all elements)

with the gradient with respect to pred,

    grad_j = 2 * weight_j * (pred_j - target_j) / numel,

computed in the same pass over the data and saved for the backward, which
only scales it by the incoming grad_output (the pattern of Liger-Kernel's
fused linear cross-entropy): the forward reads pred and target once and
writes the gradient, no input is kept alive for the backward, and no float32
temporary of the input's size is made besides the gradient (which has pred's
dtype).

This module holds the public function, its argument checks, the
torch.library registration and the plain-PyTorch backend. The other backends
(C++ in csrc/, Triton in kernels/) implement the same backend contract:

    impl(pred, target, weight, loss_out, grad_out, need_grad) -> None

with pred (R, D) contiguous in float32, float16, bfloat16 or float64;
target (R, D) contiguous in pred's dtype or float32; weight (R,) contiguous in
the accumulation dtype (float64 for float64 pred, float32 otherwise), one
weight per row of D consecutive elements; loss_out a 0-d tensor in the
accumulation dtype;
grad_out (R, D) in pred's dtype, or an empty tensor when need_grad is False.
The impl writes loss_out and, if need_grad, every element of grad_out.
Sums are accumulated in float32 (float64 for float64 pred) in a fixed order
that depends only on the shape: results are bitwise reproducible.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastdiff.ops import _dispatch, _library
from fastdiff.ops._checks import check_tensor


# Elements per piece of the torch backend: its float32 temporaries stay this
# small whatever the input's size.
CHUNK_ELEMENTS = 1 << 20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and weight) dtype for pred of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------

def _weight_rows(weight: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, int, int]:
    """weight as one value per row of the (R, D) view of pred; returns (w (R,), R, D).

    A 1-d weight whose length is pred's batch size is per sample (B,), even
    where it would also broadcast along pred's last dimension; otherwise
    weight broadcasts against pred by the usual rules. D is the product of
    the trailing dimensions along which weight is constant, so per-sample
    weights give R = B rows, a scalar weight one row of all elements.
    """
    nd = len(shape)
    if nd >= 1 and weight.dim() == 1 and weight.shape[0] == shape[0]:
        if shape[0] != 1:     # per sample, the common case: weight is already (R,) = (B,)
            return weight, shape[0], math.prod(shape[1:])
        wshape = (shape[0],) + (1,) * (nd - 1)
    else:
        ok = weight.dim() <= nd
        wshape = (1,) * (nd - weight.dim()) + tuple(weight.shape) if ok else ()
        ok = ok and all(ws in (1, ps) for ws, ps in zip(wshape, shape))
        if not ok:
            batch = f"({shape[0]},) per sample or " if nd else ""
            raise ValueError(f"weight must have shape {batch}a shape broadcastable to pred's "
                             f"{tuple(shape)}; got {tuple(weight.shape)}")
    k = 0                            # dims [0, k) of pred are rows; a loop, as dynamo (torch 2.11)
    for i, s in enumerate(wshape):   # cannot trace max(genexpr, default=...)
        if s != 1:
            k = i + 1
    R = math.prod(shape[:k])
    D = math.prod(shape[k:])
    w = weight.reshape(wshape[:k]).expand(tuple(shape[:k])).reshape(R)
    return w, R, D


def _prepare(pred, target, weight):
    """Checks the arguments; returns pred and target as (R, D), weight as (R,)."""
    check_tensor("pred", pred)
    check_tensor("target", target)
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        weight = torch.tensor(float(weight), dtype=acc_dtype(pred.dtype), device=pred.device)
    check_tensor("weight", weight)
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}; got {tuple(target.shape)}")
    if target.device != pred.device:
        raise ValueError(f"target must be on pred's device {pred.device}; got {target.device}")
    if weight.device != pred.device:
        raise ValueError(f"weight must be on pred's device {pred.device}; got {weight.device}")
    if pred.numel() == 0:
        raise ValueError(f"pred is empty (shape {tuple(pred.shape)}): the mean of no elements is undefined")
    w, R, D = _weight_rows(weight, pred.shape)
    acc = acc_dtype(pred.dtype)
    if target.dtype not in (pred.dtype, torch.float32):
        # The kernels read target in pred's dtype or float32; other pairings
        # (rare: fp16 pred with a bf16 target, ...) pay for one conversion.
        target = target.to(acc)
    if pred.dim() != 2 or pred.shape[1] != D:
        pred, target = pred.reshape(R, D), target.reshape(R, D)
    if w.dtype != acc:
        w = w.to(acc)
    return pred.contiguous(), target.detach().contiguous(), w.detach().contiguous()


# ----------------------------------------------------------------------------
# the op (a torch.library registration, see ops/_library.py)
# ----------------------------------------------------------------------------

def _weighted_mse_kernel(pred, target, weight, need_grad, backend):
    _, impl = _dispatch.resolve("weighted_mse", backend, pred.device.type)
    loss = torch.empty((), dtype=acc_dtype(pred.dtype), device=pred.device)
    grad = torch.empty_like(pred) if need_grad else pred.new_empty(0)
    impl(pred, target, weight, loss, grad, need_grad)
    return loss, grad


def _weighted_mse_fake(pred, target, weight, need_grad, backend):
    grad = torch.empty_like(pred) if need_grad else pred.new_empty(0)
    return pred.new_empty((), dtype=acc_dtype(pred.dtype)), grad


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


@once_differentiable
def _backward(ctx, grad_loss, _grad_grad):
    # The saved gradient is d loss / d pred; the chain rule only scales it.
    # Differentiable once: the inputs are not saved, so the gradient carries
    # no graph of its own (torch.autograd.grad(..., create_graph=True) gives
    # a constant), and a double backward that reaches this op raises.
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0 and ctx.needs_input_grad[0]:
        raise RuntimeError("weighted_mse: pred's gradient was not computed in the forward "
                           "(pred did not require grad, or grad mode was off)")
    # grad_loss is 0-d, so the product keeps the gradient's (pred's) dtype.
    return grad * grad_loss, None, None, None, None


_weighted_mse_op = _library.define(
    "weighted_mse(Tensor pred, Tensor target, Tensor weight, bool need_grad, str backend) -> (Tensor, Tensor)",
    _weighted_mse_kernel, _weighted_mse_fake, backward=_backward, setup_context=_setup_context)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight, *, backend: str = "auto") -> torch.Tensor:
    """Weighted mean-squared error, fused with its gradient: mean(weight * (pred - target)^2).

    Args:
        pred: the network's prediction, any shape, float32, float16, bfloat16
            or float64.
        target: the training target, pred's shape, on pred's device, any
            floating dtype (pred's dtype or float32 are read directly).
        weight: a per-sample weight of shape (B,) for pred of shape (B, ...),
            or any shape broadcastable to pred's (a 0-d tensor or a float for
            one weight); a 1-d weight of length B is always per sample (give
            it shape (1, D) to weight pred's last dimension instead).
        backend: "auto" (fastest available for pred's device), "torch",
            "cpu", "triton" or "cuda". A named backend that cannot run raises
            RuntimeError with the reason.

    Returns:
        The loss, a 0-d float32 tensor: sum_j weight_j (pred_j - target_j)^2
        / pred.numel(), accumulated in float32 (for float64 pred, the loss
        is float64 and accumulated in float64).

    Gradients flow to pred only. target and weight are treated as constants
    (they are detached, whatever their requires_grad): a diffusion target
    carries no gradient, and a learned weighting (EDM2's log-variance u)
    gets its gradient through its own term of the objective, e.g.
    ``weighted_mse(pred, target, w) / exp(u) + u`` with per-sample u computed
    outside this op. The op is differentiable once.

    The forward computes the loss and, when pred requires grad (and grad
    mode is on), d loss / d pred in pred's dtype in the same pass; only that
    gradient is saved. For float16 pred the saved gradient is rounded to
    float16 before grad_output scales it, so with a loss scaler (GradScaler)
    gradient entries below float16's subnormal range (~6e-8) flush to zero
    where eager autograd would scale first; bfloat16 has no such issue.

    NaN or Inf in the inputs propagate to the loss (no value check: this op
    is on the training hot path and reads nothing back to the host).
    """
    _dispatch.check_backend(backend)
    p2, t2, w = _prepare(pred, target, weight)
    if not torch.compiler.is_compiling():
        _dispatch.resolve("weighted_mse", backend, p2.device.type)  # unavailable backends raise here (cached)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    loss, _ = _weighted_mse_op(p2, t2, w, need_grad, backend)
    return loss


# ----------------------------------------------------------------------------
# backend: torch
# ----------------------------------------------------------------------------

def weighted_mse_torch(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                       loss_out: torch.Tensor, grad_out: torch.Tensor, need_grad: bool) -> None:
    """Plain-PyTorch backend, in pieces of at most CHUNK_ELEMENTS elements.

    Each piece's sum is accumulated in the accumulation dtype and added to a
    float64 total, in a fixed order.
    """
    R, D = pred.shape
    acc = acc_dtype(pred.dtype)
    scale = 2.0 / (R * D)
    rows = max(1, CHUNK_ELEMENTS // D)
    cols = min(D, CHUNK_ELEMENTS)
    total = torch.zeros((), dtype=torch.float64, device=pred.device)
    for r0 in range(0, R, rows):
        w = weight[r0:r0 + rows, None]
        for c0 in range(0, D, cols):
            diff = pred[r0:r0 + rows, c0:c0 + cols].to(acc) - target[r0:r0 + rows, c0:c0 + cols].to(acc)
            wdiff = w * diff
            total += (wdiff * diff).sum(dtype=acc)
            if need_grad:
                grad_out[r0:r0 + rows, c0:c0 + cols] = wdiff * scale
    loss_out.copy_(total / (R * D))


def weighted_mse_ext(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                     loss_out: torch.Tensor, grad_out: torch.Tensor, need_grad: bool) -> None:
    """C++ backends (`cpu` in csrc/cpu, `cuda` in csrc/cuda), one op for both devices."""
    torch.ops.fastdiff_ext.weighted_mse(pred, target, weight, loss_out, grad_out, need_grad)
