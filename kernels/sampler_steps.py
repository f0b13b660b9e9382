"""Triton kernels for the fused sampler steps (see fastdiff/ops/sampler_steps.py).

Triton passes Python floats as fp32 kernel arguments, so the kernels compute in
fp32; float64 states (used by the convergence tests) take the torch backend.
"""
import triton
import triton.language as tl

from fastdiff.ops import sampler_steps as _ops

BLOCK = 1024


@triton.jit
def _affine_kernel(x_ptr, u_ptr, v_ptr, out_ptr, n, a, b, c, HAS_V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask).to(tl.float32)
    r = a * x + b * u
    if HAS_V:
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        r += c * v
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _heun_kernel(x_ptr, d_ptr, x1_ptr, d1_ptr, out_ptr, n, p, q, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    den = tl.load(d_ptr + offs, mask=mask).to(tl.float32)
    x1 = tl.load(x1_ptr + offs, mask=mask).to(tl.float32)
    den1 = tl.load(d1_ptr + offs, mask=mask).to(tl.float32)
    r = x + p * (x - den) + q * (x1 - den1)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def sampler_affine_triton(x, u, v, a, b, c, out) -> None:
    if x.dtype != out.dtype or x.dtype.itemsize > 4:
        return _ops.sampler_affine_torch(x, u, v, a, b, c, out)
    n = x.numel()
    _affine_kernel[(triton.cdiv(n, BLOCK),)](x, u, x if v is None else v, out, n, a, b, c,
                                             HAS_V=v is not None, BLOCK=BLOCK)


def heun_correct_triton(x, denoised, x_next, denoised_next, sigma, sigma_next, out) -> None:
    if x.dtype.itemsize > 4:
        return _ops.heun_correct_torch(x, denoised, x_next, denoised_next, sigma, sigma_next, out)
    half_h = 0.5 * (sigma_next - sigma)
    n = x.numel()
    _heun_kernel[(triton.cdiv(n, BLOCK),)](x, denoised, x_next, denoised_next, out, n,
                                           half_h / sigma, half_h / sigma_next, BLOCK=BLOCK)
