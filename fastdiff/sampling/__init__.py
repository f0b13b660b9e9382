"""fastdiff.sampling: samplers built on the fused step ops (fastdiff.ops.sampler_steps)."""
from __future__ import annotations

import inspect
import math

import torch

from fastdiff.sampling.samplers import SAMPLERS
from fastdiff.sampling.schedules import SCHEDULES, sigma_steps

__all__ = ["sample", "sigma_steps", "SAMPLERS", "SCHEDULES"]

_COMMON = ("generator", "progress", "backend")


def _checked_denoiser(denoiser, batch: int):
    """denoise(x, sigma: float): calls denoiser(x, sigma as a (B,) tensor of x's dtype), checks the shape."""
    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = denoiser(x, torch.full((batch,), sigma, dtype=x.dtype, device=x.device))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"denoiser must return a tensor, got {type(out).__name__}")
        if out.shape != x.shape:
            raise ValueError(f"denoiser returned shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
        return out.to(x.dtype)
    return denoise


@torch.no_grad()
def sample(denoiser, shape, *, sampler: str = "heun", steps: int = 18, sigma_min: float = 0.002,
           sigma_max: float = 80.0, rho: float = 7.0, generator: torch.Generator | None = None,
           progress: bool = False, device=None, dtype: torch.dtype = torch.float32, schedule: str = "edm",
           backend: str = "auto", **sampler_options) -> torch.Tensor:
    """Draws samples by integrating from sigma_max down to 0 (VE form, i.e. data space).

    Args:
        denoiser: any callable `denoiser(x, sigma) -> D` with x of shape `shape` and sigma a (B,)
            tensor of x's dtype on x's device; D ~ E[y | x] with x's shape (any float dtype; it is
            cast to `dtype`). A trained net wrapped by its preconditioning, e.g.
            `make_objective(...).denoiser(net)`, or an exact one (fastdiff.diffusion.gmm).
        shape: (B, *S), the batch of samples to draw.
        sampler: one of SAMPLERS: "heun" (EDM, S_churn/S_min/S_max/S_noise for the stochastic
            variant), "euler", "ddim" (eta), "ddpm", "euler_maruyama", "pc" (snr, n_corrector),
            "dpmpp_2m", "rk45" (rtol, atol, method).
        steps: number of noise levels before the final 0 (EDM's num_steps; Heun makes
            2 steps - 1 denoiser calls).
        sigma_min, sigma_max, rho: the noise range and EDM's schedule exponent.
        schedule: "edm", "ve", "vp" or "logsnr" (fastdiff.sampling.schedules).
        generator: the torch.Generator for the initial noise and every stochastic step; its
            device is the default `device`. The same generator state gives the same samples.
        progress: show a tqdm progress bar.
        device, dtype: where and in which precision (float32 or float64) the sampler runs.
        backend: backend of the fused step ops ("auto", "torch", "cpu", "triton", "cuda").

    Returns:
        samples of shape `shape` and dtype `dtype`.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) < 1 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"shape must be (B, *S) with positive integer sizes, got {shape}")
    fn = SAMPLERS[sampler]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("denoise", "x", "sigmas") + _COMMON]
    unknown = sorted(set(sampler_options) - set(allowed))
    if unknown:
        raise TypeError(f"sampler {sampler!r} got unknown option(s) {unknown}; it accepts {allowed}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}")

    sigmas = sigma_steps(steps, float(sigma_min), float(sigma_max), float(rho), schedule)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype) * sigmas[0]
    return fn(_checked_denoiser(denoiser, shape[0]), x, sigmas, generator=generator, progress=progress,
              backend=backend, **sampler_options)
