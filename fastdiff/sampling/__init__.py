"""fastdiff.sampling: samplers built on the fused step ops (fastdiff.ops.sampler_steps)."""
from __future__ import annotations

import inspect
import math

import numpy as np
import torch

from fastdiff.sampling.samplers import SAMPLERS, BrownianIncrements
from fastdiff.sampling.schedules import SCHEDULES, iddpm_sigmas, sigma_steps

__all__ = ["sample", "sigma_steps", "check_sigmas", "iddpm_sigmas", "SAMPLERS", "SCHEDULES"]

_COMMON = ("noise_sampler", "progress", "backend")
# EDM's generate.py spells the churn window S_min/S_max; the paper and k-diffusion say S_tmin/S_tmax.
_ALIASES = {"S_min": "S_tmin", "S_max": "S_tmax"}
_DEFAULTS = {"steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "schedule": "edm"}


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


def _checked_noise_sampler(noise_sampler, x: torch.Tensor, generator):
    """noise(sigma, sigma_next) -> a tensor of x's shape, dtype and device: the user's noise_sampler,
    checked, or draws from `generator` (Brownian increments where intervals nest: BrownianIncrements)."""
    if noise_sampler is None:
        return BrownianIncrements(
            lambda sigma, sigma_next: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))

    def noise(sigma: float, sigma_next: float) -> torch.Tensor:
        # k-diffusion passes entries of its sigmas tensor; a Brownian tree given Python floats would
        # query float32 times (torch.as_tensor) and return other increments than under k-diffusion.
        z = noise_sampler(torch.tensor(sigma, dtype=torch.float64), torch.tensor(sigma_next, dtype=torch.float64))
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"noise_sampler must return a floating-point tensor, got "
                            f"{z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}")
        if z.shape != x.shape:
            raise ValueError(f"noise_sampler returned shape {tuple(z.shape)}, expected x's shape {tuple(x.shape)}")
        if z.device != x.device:
            raise ValueError(f"noise_sampler returned a tensor on {z.device}, expected x's device {x.device}")
        return z.to(x.dtype)
    return noise


def _number(name: str, v, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def check_sigmas(sigmas) -> list[float]:
    """A user-given schedule as a list of Python floats: 1-D, finite, strictly decreasing, ending with 0."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
        if sigmas.is_complex() or not (sigmas.is_floating_point() or sigmas.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"sigmas must hold real numbers, got dtype {sigmas.dtype}")
        values = sigmas.detach().cpu().double().tolist()
    elif isinstance(sigmas, np.ndarray) or isinstance(sigmas, (list, tuple)):
        arr = np.asarray(sigmas)
        if arr.ndim != 1:
            raise ValueError(f"sigmas must be 1-D, got shape {arr.shape}")
        if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise TypeError(f"sigmas must hold real numbers, got {arr.dtype} values")
        values = arr.astype(np.float64).tolist()
    else:
        raise TypeError(f"sigmas must be a 1-D tensor, array, list or tuple of noise levels, "
                        f"got {type(sigmas).__name__}")
    if len(values) < 2:
        raise ValueError(f"sigmas must hold at least one noise level and the final 0, got {values}")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"sigmas must be finite, got sigmas[{bad[0]}] = {values[bad[0]]}")
    if values[-1] != 0:
        raise ValueError(f"sigmas must end with 0 (the data), got sigmas[-1] = {values[-1]}")
    for i in range(len(values) - 1):
        if not values[i] > values[i + 1]:
            raise ValueError(
                f"sigmas must be strictly decreasing (each step lowers the noise; a repeated level is a "
                f"zero-length step, which multistep samplers divide by), got sigmas[{i}] = {values[i]} and "
                f"sigmas[{i + 1}] = {values[i + 1]}")
    return values


@torch.no_grad()
def sample(denoiser, shape=None, *, sampler: str = "heun", steps: int | None = None, sigma_min: float | None = None,
           sigma_max: float | None = None, rho: float | None = None, schedule: str | None = None, sigmas=None,
           x: torch.Tensor | None = None, noise_sampler=None, generator: torch.Generator | None = None,
           progress: bool = False, device=None, dtype: torch.dtype | None = None, backend: str = "auto",
           **sampler_options) -> torch.Tensor:
    """Draws samples by integrating from the largest noise level down to 0 (VE form, i.e. data space).

    Args:
        denoiser: any callable `denoiser(x, sigma) -> D` with x of shape `shape` and sigma a (B,)
            tensor of x's dtype on x's device; D ~ E[y | x] with x's shape (any float dtype; it is
            cast to `dtype`). A trained net wrapped by its preconditioning, e.g.
            `make_objective(...).denoiser(net)`, or an exact one (fastdiff.diffusion.gmm).
        shape: (B, *S), the batch of samples to draw (may be omitted when x is given).
        sampler: one of SAMPLERS (k-diffusion's names and options where it has them):
            "heun", "euler", "dpm_2" (EDM's churn: S_churn, S_tmin, S_tmax, S_noise; S_min/S_max
            as in EDM's generate.py are accepted for S_tmin/S_tmax), "euler_ancestral",
            "dpm_2_ancestral", "dpmpp_2s_ancestral" (eta, s_noise), "lms" (order), "ddim" (eta),
            "ddpm", "euler_maruyama", "pc" (snr, n_corrector), "dpmpp_2m", "dpmpp_sde" (eta,
            s_noise, r), "dpmpp_2m_sde" (eta, s_noise, solver_type "midpoint" | "heun"),
            "dpmpp_3m_sde" (eta, s_noise), "rk45" (rtol, atol, method).
        steps, sigma_min, sigma_max, rho, schedule: the noise levels, when sigmas is not given:
            `steps` levels (EDM's num_steps; Heun makes 2 steps - 1 denoiser calls) from sigma_max
            to sigma_min by the schedule ("edm", "ve", "logsnr", "vp" or "iddpm";
            fastdiff.sampling.schedules), then 0. Defaults 18, 0.002, 80, 7, "edm".
        sigmas: instead of those, the noise levels themselves: a 1-D tensor, array or list,
            finite, strictly decreasing, ending with 0 (k-diffusion's get_sigmas_*, diffusers'
            scheduler.sigmas, EDM's t_steps). Converted to float64.
        x: the initial latent, already scaled by the first noise level (k-diffusion's
            convention: x = randn * sigmas[0]); by default drawn from `generator`. Not modified.
        noise_sampler: `noise_sampler(sigma, sigma_next) -> standard normal tensor` of x's shape
            and device (k-diffusion's convention; sigma and sigma_next come as 0-d float64 CPU
            tensors, as k-diffusion passes its sigmas' entries), used for every
            random draw of a stochastic sampler (fastdiff.sampling.samplers lists the draws of
            each). By default fresh draws from `generator`.
        generator: the torch.Generator for the initial noise and the default noise_sampler; its
            device is the default `device`. The same generator state gives the same samples.
        progress: show a tqdm progress bar.
        device, dtype: where and in which precision (float32 or float64) the sampler runs; by
            default x's, else the generator's device (CPU without one) and float32.
        backend: backend of the fused step ops ("auto", "torch", "cpu", "triton", "cuda").

    Returns:
        samples of shape `shape` and dtype `dtype`.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(x, sigma), got {type(denoiser).__name__}")
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a string, one of {tuple(SAMPLERS)}, got {type(sampler).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                        f"(for a seed use torch.Generator().manual_seed(seed))")
    if noise_sampler is not None and not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be callable as noise_sampler(sigma, sigma_next), "
                        f"got {type(noise_sampler).__name__}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {type(progress).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if device is not None:
        if not isinstance(device, (str, torch.device, int)) or isinstance(device, bool):
            raise TypeError(f"device must be a torch.device or a string such as 'cpu' or 'cuda', "
                            f"got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from None

    # The initial latent: its shape, device and dtype.
    if x is not None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (the initial latent), got {type(x).__name__}")
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"x must be float32 or float64, got {x.dtype}")
        if dtype is not None and dtype != x.dtype:
            raise TypeError(f"dtype is {dtype} but x is {x.dtype}; leave dtype out or convert x")
        if x.dim() < 1 or x.numel() == 0:
            raise ValueError(f"x must have shape (B, *S) with positive sizes, got {tuple(x.shape)}")
        if shape is not None and tuple(shape) != tuple(x.shape):
            raise ValueError(f"shape {tuple(shape)} does not match x's shape {tuple(x.shape)}; leave shape out")
        if device is not None and device != x.device:
            raise ValueError(f"device is {device} but x is on {x.device}; leave device out or move x")
        if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
            raise ValueError("x must be finite (the initial latent holds NaN or Inf)")
        shape, device, dtype = tuple(x.shape), x.device, x.dtype
    else:
        if shape is None:
            raise TypeError("sample() needs shape (B, *S) or x (the initial latent)")
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
        if not isinstance(shape, (tuple, list, torch.Size)):
            raise TypeError(f"shape must be a tuple of ints (B, *S), got {type(shape).__name__}")
        shape = tuple(shape)
        if len(shape) < 1 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"shape must be (B, *S) with positive integer sizes, got {shape}")
        dtype = torch.float32 if dtype is None else dtype
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}")

    # The sampler's options.
    fn = SAMPLERS[sampler]
    for old, new in _ALIASES.items():
        if old in sampler_options:
            if new in sampler_options:
                raise TypeError(f"pass {new} or {old} (EDM's name for it), not both")
            sampler_options[new] = sampler_options.pop(old)
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("denoise", "x", "sigmas") + _COMMON]
    unknown = sorted(set(sampler_options) - set(allowed))
    if unknown:
        raise TypeError(f"sampler {sampler!r} got unknown option(s) {unknown}; it accepts {allowed}")

    # The noise levels.
    grid = {"steps": steps, "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho, "schedule": schedule}
    if sigmas is not None:
        given = [k for k, v in grid.items() if v is not None]
        if given:
            raise TypeError(f"pass sigmas or {'/'.join(grid)}, not both (got sigmas and {', '.join(given)})")
        sigmas = check_sigmas(sigmas)
    else:
        steps, sigma_min, sigma_max, rho, schedule = (_DEFAULTS[k] if v is None else v for k, v in grid.items())
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"steps must be an integer >= 1, got {type(steps).__name__}")
        if steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        sigma_min, sigma_max, rho = (_number(k, v) for k, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max),
                                                                 ("rho", rho)))
        if sigma_min >= sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if not isinstance(schedule, str):
            raise TypeError(f"schedule must be a string, one of {SCHEDULES}, got {type(schedule).__name__}")
        sigmas = sigma_steps(steps, sigma_min, sigma_max, rho, schedule)

    if x is None:
        x = torch.randn(shape, generator=generator, device=device, dtype=dtype) * sigmas[0]
    return fn(_checked_denoiser(denoiser, shape[0]), x, sigmas,
              noise_sampler=_checked_noise_sampler(noise_sampler, x, generator), progress=progress,
              backend=backend, **sampler_options)
