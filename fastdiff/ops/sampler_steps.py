"""Fused sampler steps: each sampler's per-step elementwise update in one kernel.

Every sampler in fastdiff.sampling moves a state x (VE form) from noise level
sigma to sigma_next with an update that is elementwise in x, the denoised
estimate D and at most one more tensor. Two ops cover them all:

    sampler_affine:  out = a x + b u + c v
        Euler / DDIM / ancestral:  u = D, v = noise z       (a = sigma_down / sigma)
        Euler-Maruyama, Langevin:  u = D, v = z
        DPM-Solver++(2M):          u = D, v = D_prev
        EDM churn:                 u = z, no v
    heun_correct:    out = x + h/2 (d + d'),  d = (x - D)/sigma,  d' = (x' - D')/sigma_next,
                     h = sigma_next - sigma   (EDM Algorithm 1/2, line 7-8)

The per-step scalars are Python floats computed by the sampler in float64;
the kernels compute in the tensors' dtype (float32, or float64), loading every
input once and writing the output once (Triton passes Python floats as fp32,
so its float64 calls take the torch code). The unfused reference is the same
formula written as separate PyTorch ops (tests/test_sampling.py runs it in
float64).

The ops are registered with torch.library (fastdiff::sampler_affine,
fastdiff::heun_correct, through fastdiff.ops._library) with fake impls, which
torch.compile traces; eager calls skip the dispatcher and call the backend
directly, because the round trip into Python costs more than a step at
typical image sizes.

Backend contract (the dispatch table in fastdiff.ops._dispatch):

    affine_impl(x, u, v | None, a, b, c, out) -> None
    heun_impl(x, denoised, x_next, denoised_next, sigma, sigma_next, out) -> None

with every tensor contiguous, of one dtype (float32 or float64) and shape, on
one device; the impl writes every element of out.
"""
from __future__ import annotations

import math

import torch

from fastdiff.ops import _dispatch, _library

STEP_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------

def _check_state(name: str, t, ref: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in STEP_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (the sampler state's dtype), got {t.dtype}")
    if ref is not None:
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have shape {tuple(ref.shape)} like x, got {tuple(t.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} must have x's dtype {ref.dtype}, got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")


def _check_scalar(name: str, v, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {v}")
    return v


# ----------------------------------------------------------------------------
# the ops (torch.library registrations)
# ----------------------------------------------------------------------------

def _sampler_affine_kernel(x, u, v, a, b, c, backend):
    _, impl = _dispatch.resolve("sampler_affine", backend, x.device.type)
    out = torch.empty_like(x)
    impl(x, u, v, a, b, c, out)
    return out


def _heun_correct_kernel(x, denoised, x_next, denoised_next, sigma, sigma_next, backend):
    _, impl = _dispatch.resolve("heun_correct", backend, x.device.type)
    out = torch.empty_like(x)
    impl(x, denoised, x_next, denoised_next, sigma, sigma_next, out)
    return out


def _like_x(x, *args):
    return torch.empty_like(x)


_sampler_affine_op = _library.define(
    "sampler_affine(Tensor x, Tensor u, Tensor? v, float a, float b, float c, str backend) -> Tensor",
    _sampler_affine_kernel, _like_x)
_heun_correct_op = _library.define(
    "heun_correct(Tensor x, Tensor denoised, Tensor x_next, Tensor denoised_next, float sigma, "
    "float sigma_next, str backend) -> Tensor",
    _heun_correct_kernel, _like_x)


def affine_step(x: torch.Tensor, u: torch.Tensor, a: float, b: float, v: torch.Tensor | None = None,
                c: float = 0.0, *, backend: str = "auto") -> torch.Tensor:
    """a x + b u (+ c v) in one kernel; x, u, v of one shape, dtype (float32/64) and device."""
    _dispatch.check_backend(backend)
    _check_state("x", x)
    _check_state("u", u, x)
    if v is not None:
        _check_state("v", v, x)
    a, b, c = _check_scalar("a", a), _check_scalar("b", b), _check_scalar("c", c)
    x, u, v = x.contiguous(), u.contiguous(), None if v is None else v.contiguous()
    if torch.compiler.is_compiling():
        return _sampler_affine_op(x, u, v, a, b, c, backend)
    # Eager: call the backend directly. A step is a few microseconds of work; the op's round
    # trip through the dispatcher (there for torch.compile and opcheck) would cost more.
    out = torch.empty_like(x)
    if x.numel():
        _dispatch.resolve("sampler_affine", backend, x.device.type)[1](x, u, v, a, b, c, out)
    return out


def heun_correct(x: torch.Tensor, denoised: torch.Tensor, x_next: torch.Tensor,
                 denoised_next: torch.Tensor, sigma: float, sigma_next: float, *,
                 backend: str = "auto") -> torch.Tensor:
    """Heun's second-order correction x + h/2 (d + d') in one kernel (EDM Alg. 1, line 8)."""
    _dispatch.check_backend(backend)
    _check_state("x", x)
    for name, t in (("denoised", denoised), ("x_next", x_next), ("denoised_next", denoised_next)):
        _check_state(name, t, x)
    sigma = _check_scalar("sigma", sigma, positive=True)
    sigma_next = _check_scalar("sigma_next", sigma_next, positive=True)
    args = (x.contiguous(), denoised.contiguous(), x_next.contiguous(), denoised_next.contiguous())
    if torch.compiler.is_compiling():
        return _heun_correct_op(*args, sigma, sigma_next, backend)
    out = torch.empty_like(x)
    if x.numel():
        _dispatch.resolve("heun_correct", backend, x.device.type)[1](*args, sigma, sigma_next, out)
    return out


# ----------------------------------------------------------------------------
# backend: torch (in-place on out: no temporaries beyond one)
# ----------------------------------------------------------------------------

def sampler_affine_torch(x, u, v, a, b, c, out) -> None:
    torch.mul(x, a, out=out)
    out.add_(u, alpha=b)
    if v is not None:
        out.add_(v, alpha=c)


def heun_correct_torch(x, denoised, x_next, denoised_next, sigma, sigma_next, out) -> None:
    # x + h/2 (x - D)/s + h/2 (x' - D')/s' with the quotients folded into two coefficients.
    half_h = 0.5 * (sigma_next - sigma)
    p, q = half_h / sigma, half_h / sigma_next
    torch.sub(x, denoised, out=out)
    out.mul_(p).add_(x)
    out.add_(x_next, alpha=q).sub_(denoised_next, alpha=q)


# ----------------------------------------------------------------------------
# backends: C++ (csrc/cpu/sampler_steps.cpp, csrc/cuda/sampler_steps.cu)
# ----------------------------------------------------------------------------

def sampler_affine_ext(x, u, v, a, b, c, out) -> None:
    torch.ops.fastdiff_ext.sampler_affine(x, u, v, a, b, c, out)


def heun_correct_ext(x, denoised, x_next, denoised_next, sigma, sigma_next, out) -> None:
    torch.ops.fastdiff_ext.heun_correct(x, denoised, x_next, denoised_next, sigma, sigma_next, out)
