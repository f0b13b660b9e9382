"""The samplers: one short function each, in VE form (x = y + sigma n).

Every sampler has the signature

    sampler(denoise, x, sigmas, *, generator, progress, backend, **options) -> x

where `denoise(x, sigma: float)` returns D(x; sigma) ~ E[y | x] in x's dtype,
`x` is the initial noise (already scaled by sigmas[0]) and `sigmas` is a list
of Python floats (float64) ending with 0 (fastdiff.sampling.schedules). Each
per-step update is one fused kernel (fastdiff.ops.sampler_steps); the scalars
that drive it are computed here in float64.

The probability-flow ODE in VE form is dx/dsigma = (x - D(x; sigma)) / sigma
(Karras et al. 2022, eq. 3 with s = 1); the reverse SDE is
dx = -d(sigma^2) score + sqrt(d(sigma^2)) dw with score = (D - x) / sigma^2.
"""
from __future__ import annotations

import math

import torch

from fastdiff.ops.sampler_steps import affine_step, heun_correct


def _trange(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import trange
    return trange(n)


def _check_option(name: str, value, ok: bool, expected: str) -> None:
    if isinstance(value, bool) or not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _nonneg(name: str, value) -> None:
    _check_option(name, value, isinstance(value, (int, float)) and value >= 0, "a number >= 0")


def _noise(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def euler_step(x, denoised, sigma: float, sigma_next: float, backend: str):
    """x + (sigma_next - sigma) (x - D) / sigma, i.e. r x + (1 - r) D with r = sigma_next / sigma.

    This is also DDIM (eta = 0) and first-order DPM-Solver++ in VE form; at
    sigma_next = 0 it returns D.
    """
    r = sigma_next / sigma
    return affine_step(x, denoised, r, 1.0 - r, backend=backend)


def reverse_sde_step(x, denoised, sigma: float, sigma_next: float, generator, backend: str):
    """Euler-Maruyama for the reverse VE SDE from sigma to sigma_next (Song et al. 2021, eq. 6):
    x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z. The step to 0 denoises."""
    if sigma_next == 0:
        return euler_step(x, denoised, sigma, 0.0, backend)
    k = 1.0 - (sigma_next / sigma) ** 2
    return affine_step(x, denoised, 1.0 - k, k, _noise(x, generator), math.sqrt(sigma ** 2 - sigma_next ** 2),
                       backend=backend)


def sample_heun(denoise, x, sigmas, *, generator=None, progress=False, backend="auto",
                S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    """EDM's second-order Heun sampler (Karras et al. 2022, Algorithm 2; deterministic when S_churn = 0)."""
    for name, v in (("S_churn", S_churn), ("S_min", S_min), ("S_max", S_max), ("S_noise", S_noise)):
        _nonneg(name, v)
    n = len(sigmas) - 1
    for i in _trange(n, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / n, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = affine_step(x, _noise(x, generator), 1.0, S_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2),
                            backend=backend)
        denoised = denoise(x, sigma_hat)
        x_next = euler_step(x, denoised, sigma_hat, sigma_next, backend)
        if sigma_next > 0:
            x_next = heun_correct(x, denoised, x_next, denoise(x_next, sigma_next), sigma_hat, sigma_next,
                                  backend=backend)
        x = x_next
    return x


def sample_euler(denoise, x, sigmas, *, generator=None, progress=False, backend="auto"):
    """Euler's method on the probability-flow ODE (first order)."""
    for i in _trange(len(sigmas) - 1, progress):
        x = euler_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1], backend)
    return x


def sample_ddim(denoise, x, sigmas, *, generator=None, progress=False, backend="auto", eta=0.0):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in VE form.

    DDIM's noise sigma_t(eta) becomes sigma_up = eta sigma' sqrt(1 - sigma'^2/sigma^2) in VE form;
    the rest of sigma' is carried deterministically along the predicted noise (x - D)/sigma:
    x' = D + sigma_down (x - D)/sigma + sigma_up z, sigma_down = sqrt(sigma'^2 - sigma_up^2).
    eta = 0 is Euler on the probability-flow ODE; eta = 1 is DDPM ancestral sampling.
    """
    _nonneg("eta", eta)
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - (sigma_next / sigma) ** 2)))
        r = math.sqrt(sigma_next ** 2 - sigma_up ** 2) / sigma
        if sigma_up > 0:
            x = affine_step(x, denoised, r, 1.0 - r, _noise(x, generator), sigma_up, backend=backend)
        else:
            x = affine_step(x, denoised, r, 1.0 - r, backend=backend)
    return x


def sample_ddpm(denoise, x, sigmas, *, generator=None, progress=False, backend="auto"):
    """DDPM ancestral sampling (Ho et al. 2020): draws x' from the posterior q(x' | x, y = D(x)).

    In VE form that posterior is N(D + (sigma'^2/sigma^2)(x - D), sigma'^2 (1 - sigma'^2/sigma^2)),
    which is exactly DDIM's step with eta = 1.
    """
    return sample_ddim(denoise, x, sigmas, generator=generator, progress=progress, backend=backend, eta=1.0)


def sample_euler_maruyama(denoise, x, sigmas, *, generator=None, progress=False, backend="auto"):
    """Euler-Maruyama on the reverse VE SDE; the last step (to sigma = 0) returns the denoised mean."""
    for i in _trange(len(sigmas) - 1, progress):
        x = reverse_sde_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1], generator, backend)
    return x


def sample_pc(denoise, x, sigmas, *, generator=None, progress=False, backend="auto", snr=0.16, n_corrector=1):
    """Predictor-corrector sampling for VE (Song et al. 2021, Algorithm 2).

    Corrector: n_corrector Langevin steps x + eps score + sqrt(2 eps) z at the current sigma, with
    eps = 2 (snr ||z|| / ||score||)^2 from batch-mean norms (the paper's rule). Predictor: one
    reverse-SDE step. The step size is a batch statistic, so it costs one host sync per corrector step.
    """
    _check_option("snr", snr, isinstance(snr, (int, float)) and snr > 0, "a positive number")
    _check_option("n_corrector", n_corrector, isinstance(n_corrector, int) and n_corrector >= 0, "an integer >= 0")
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        for _ in range(n_corrector):
            denoised = denoise(x, sigma)
            z = _noise(x, generator)
            # score = (D - x) / sigma^2, so eps / sigma^2 = 2 snr^2 sigma^2 ||z||^2 / ||D - x||^2.
            z_norm = z.flatten(1).norm(dim=1).mean()
            g_norm = (denoised - x).flatten(1).norm(dim=1).mean().clamp_min(1e-30)
            k = float(2 * (snr * sigma * z_norm / g_norm) ** 2)
            x = affine_step(x, denoised, 1.0 - k, k, z, sigma * math.sqrt(2 * k), backend=backend)
        x = reverse_sde_step(x, denoise(x, sigma), sigma, sigma_next, generator, backend)
    return x


def sample_dpmpp_2m(denoise, x, sigmas, *, generator=None, progress=False, backend="auto"):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) with lambda = -log sigma in VE form.

    x' = (sigma'/sigma) x - expm1(-h) ((1 + 1/(2r)) D - 1/(2r) D_prev), h = lambda' - lambda,
    r = h_prev / h; the first and the last step (to sigma = 0) are first order.
    """
    denoised_prev, h_prev = None, None
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if denoised_prev is None or sigma_next == 0:
            x = euler_step(x, denoised, sigma, sigma_next, backend)
        else:
            h = math.log(sigma / sigma_next)
            c = -math.expm1(-h)
            half_inv_r = h / (2 * h_prev)
            x = affine_step(x, denoised, sigma_next / sigma, c * (1 + half_inv_r), denoised_prev,
                            -c * half_inv_r, backend=backend)
        if sigma_next > 0:
            h_prev = math.log(sigma / sigma_next)
        denoised_prev = denoised
    return x


def sample_rk45(denoise, x, sigmas, *, generator=None, progress=False, backend="auto", rtol=1e-5, atol=1e-5,
                method="RK45"):
    """Adaptive Runge-Kutta (Dormand-Prince 5(4), scipy's solve_ivp) on the probability-flow ODE.

    Integrated in log sigma, dx/dlog(sigma) = x - D(x; sigma), from sigmas[0] to the smallest
    nonzero sigma, then denoised (the final step to sigma = 0), as in the STF paper's ODE sampler.
    The step-size control runs on the host in float64; the steps of the grid are unused.
    """
    from scipy.integrate import solve_ivp

    for name, v in (("rtol", rtol), ("atol", atol)):
        _check_option(name, v, isinstance(v, (int, float)) and v > 0, "a positive number")
    shape, device, dtype = x.shape, x.device, x.dtype
    sigma_end = sigmas[-2]
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="rk45 denoiser calls")

    def rhs(log_sigma, y):
        if progress:
            bar.update(1)
        xt = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        return (xt - denoise(xt, math.exp(log_sigma))).double().cpu().numpy().reshape(-1)

    y0 = x.double().cpu().numpy().reshape(-1)
    sol = solve_ivp(rhs, (math.log(sigmas[0]), math.log(sigma_end)), y0, method=method, rtol=rtol, atol=atol)
    if progress:
        bar.close()
    if not sol.success:
        raise RuntimeError(f"sample_rk45: solve_ivp failed: {sol.message}")
    x = torch.from_numpy(sol.y[:, -1].copy()).to(device=device, dtype=dtype).reshape(shape)
    return denoise(x, sigma_end)


SAMPLERS = {
    "heun": sample_heun,
    "euler": sample_euler,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "dpmpp_2m": sample_dpmpp_2m,
    "rk45": sample_rk45,
}
