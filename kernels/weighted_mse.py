"""Triton backend of fastdiff.weighted_mse (contract in fastdiff/ops/weighted_mse.py).

Two launches. The first reads pred and target once, writes the gradient
2 w (pred - target) / n in pred's dtype and one partial sum per program
(float32 within the program, stored as float64); the second adds the partials
in a fixed order and writes the loss. No atomics: the result depends only on
the shape, never on scheduling.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096          # elements per program of the first pass (one partial each)
SUM_BLOCK = 1024      # partials per step of the second pass


@triton.jit
def _weighted_mse_fwd(pred_ptr, target_ptr, weight_ptr, grad_ptr, partial_ptr, n, d,
                      NEED_GRAD: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INT64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # The weight's dtype is the accumulation dtype (float64 for float64 pred).
    w = tl.load(weight_ptr + offs // d, mask=mask, other=0.0)
    acc_ty = w.dtype
    p = tl.load(pred_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    t = tl.load(target_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    diff = p - t
    wdiff = w * diff
    tl.store(partial_ptr + pid, tl.sum(wdiff * diff, axis=0).to(tl.float64))
    if NEED_GRAD:
        scale = tl.full([], 2.0, acc_ty) / n
        # Round to nearest even, as torch does (the interpreter truncates bf16 regardless).
        g = (wdiff * scale).to(grad_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(grad_ptr + offs, g, mask=mask)


@triton.jit
def _weighted_mse_sum(partial_ptr, loss_ptr, m, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, m, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + offs, mask=offs < m, other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(loss_ptr, (total / n).to(loss_ptr.dtype.element_ty))


def weighted_mse_triton(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        loss_out: torch.Tensor, grad_out: torch.Tensor, need_grad: bool) -> None:
    n = pred.numel()
    d = pred.shape[1]
    programs = triton.cdiv(n, BLOCK)
    partial = torch.empty(programs, dtype=torch.float64, device=pred.device)
    _weighted_mse_fwd[(programs,)](
        pred, target, weight, grad_out if need_grad else pred, partial, n, d,
        NEED_GRAD=need_grad, INT64=programs * BLOCK >= 2**31, BLOCK=BLOCK, num_warps=8)
    _weighted_mse_sum[(1,)](partial, loss_out, programs, n, BLOCK=SUM_BLOCK, num_warps=4)
