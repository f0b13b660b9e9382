"""The samplers: one short function each, in VE form (x = y + sigma n).

Every sampler has the signature

    sampler(denoise, x, sigmas, *, noise_sampler, progress, backend, **options) -> x

where `denoise(x, sigma: float)` returns D(x; sigma) ~ E[y | x] in x's dtype,
`x` is the initial noise (already scaled by sigmas[0]), `sigmas` is a list of
Python floats (float64), strictly decreasing and ending with 0
(fastdiff.sampling.schedules), and `noise_sampler(sigma, sigma_next)` returns a
standard normal tensor of x's shape (k-diffusion's convention; sample() passes
sigma and sigma_next to the user's noise_sampler as 0-d float64 tensors). Each
per-step update is a linear combination of x, denoiser outputs and noise,
computed by the fused step ops (fastdiff.ops.sampler_steps, through `lincomb`);
the scalars that drive it are computed here in float64.
The samplers that k-diffusion also has carry its names and options and, given the
same sigmas, x and noise_sampler, agree with it to float64 round-off
(tests/test_sampling_kdiffusion.py).

The probability-flow ODE in VE form is dx/dsigma = (x - D(x; sigma)) / sigma
(Karras et al. 2022, eq. 3 with s = 1); the reverse SDE is
dx = -d(sigma^2) score + sqrt(d(sigma^2)) dw with score = (D - x) / sigma^2.
DPM-Solver++'s first-order step in lambda = -log sigma is, in VE form, exactly
the Euler step (sigma'/sigma) x + (1 - sigma'/sigma) D (`euler_step`).

Draws. Every random draw of step i (from sigmas[i] to sigmas[i + 1]) is one call
noise_sampler(sigmas[i], sigmas[i + 1]), in this order:
    euler, heun, dpm_2      one draw before the denoiser call, only on the steps where churn
                            applies (S_churn > 0 and S_tmin <= sigmas[i] <= S_tmax). EDM's and
                            k-diffusion's code draw a tensor on every step and discard it where
                            churn does not apply: with a churn window, reproduce their draws with
                            a noise_sampler that returns their draw of step i.
    euler_ancestral, ddim, ddpm, dpm_2_ancestral, dpmpp_2s_ancestral
                            one draw after the step's denoiser calls, on every step with
                            sigmas[i + 1] > 0 (none when eta = 0).
    dpmpp_2m_sde, dpmpp_3m_sde
                            one draw after the denoiser call, on every step with
                            sigmas[i + 1] > 0 (none when eta = 0).
    dpmpp_sde               two draws on every step with sigmas[i + 1] > 0 (none when eta = 0):
                            noise_sampler(sigmas[i], sigma_s) for the intermediate point
                            sigma_s = sigmas[i]^(1 - r) sigmas[i + 1]^r, then
                            noise_sampler(sigmas[i], sigmas[i + 1]) for the full step; the second
                            must extend the first as a Brownian increment (BrownianIncrements).
    euler_maruyama          one draw on every step with sigmas[i + 1] > 0.
    pc                      n_corrector draws (the Langevin corrector), then one draw for the
                            predictor if sigmas[i + 1] > 0; all called with (sigmas[i], sigmas[i + 1]),
                            so the noise_sampler must return independent draws for repeated calls
                            (a Brownian tree returns the same increment).
    dpmpp_2m, lms, rk45     none.
"""
from __future__ import annotations

import math

import numpy as np
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


def _nonneg(name: str, value, inf_ok: bool = False) -> None:
    ok = isinstance(value, (int, float)) and value >= 0 and (inf_ok or math.isfinite(value))
    _check_option(name, value, ok, "a number >= 0" if inf_ok else "a finite number >= 0")


class BrownianIncrements:
    """Makes independent standard normal draws `noise(sigma, sigma_next)` into Brownian increments of one
    path W(sigma) where intervals nest: a call (s, t) right after a call (s, u) whose interval it strictly
    contains returns (W(t) - W(s)) / sqrt|t - s| extending the previous increment, as a Brownian tree
    (k-diffusion's BrownianTreeNoiseSampler) does; every other call is a fresh draw. dpmpp_sde needs
    this: its two draws per step, over (sigma, sigma_s) and (sigma, sigma'), are parts of one increment
    (with independent draws its samples are biased). sample() wraps its default noise in it."""

    def __init__(self, noise):
        self.noise, self.last = noise, None

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        z = self.noise(sigma, sigma_next)
        last, dt = self.last, abs(sigma_next - sigma)
        if last is not None and last[0] == sigma and dt > last[1] and (sigma_next - sigma) * last[3] > 0:
            z = lincomb(last[2], math.sqrt(last[1] / dt), (math.sqrt(1 - last[1] / dt), z), backend="auto")
        self.last = (sigma, dt, z, sigma_next - sigma)
        return z


def default_noise_sampler(x: torch.Tensor):
    """Draws from torch's global generator (k-diffusion's default), as BrownianIncrements."""
    return BrownianIncrements(lambda sigma, sigma_next: torch.randn_like(x))


# ----------------------------------------------------------------------------
# steps shared by the samplers
# ----------------------------------------------------------------------------

def lincomb(x, a: float, *terms, backend: str):
    """a x + sum_k c_k t_k for terms (c_k, t_k), two terms per fused kernel (affine_step).

    Terms with c_k = 0 are left out (their tensor may be None)."""
    terms = [(c, t) for c, t in terms if c != 0.0]
    if not terms:
        return affine_step(x, x, a, 0.0, backend=backend)
    for k in range(0, len(terms), 2):
        (b, u), (c, v) = terms[k], terms[k + 1] if k + 1 < len(terms) else (0.0, None)
        x = affine_step(x, u, a if k == 0 else 1.0, b, v, c, backend=backend)
    return x


def euler_step(x, denoised, sigma: float, sigma_next: float, backend: str, noise=None, noise_scale: float = 0.0):
    """x + (sigma_next - sigma) (x - D) / sigma (+ noise_scale * noise), i.e. r x + (1 - r) D (+ ...) with
    r = sigma_next / sigma.

    This is also DDIM (eta = 0) and first-order DPM-Solver++ in VE form; at
    sigma_next = 0 it returns D.
    """
    r = sigma_next / sigma
    return lincomb(x, r, (1.0 - r, denoised), (noise_scale, noise), backend=backend)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): an ancestral step goes deterministically to sigma_down and adds noise of std
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step).

    sigma_up = eta sigma' sqrt(1 - sigma'^2/sigma^2) is DDIM's sigma_t(eta) (Song et al. 2021, eq. 16) in VE
    form: eta = 1 is the DDPM posterior, eta = 0 the probability-flow ODE."""
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - (sigma_next / sigma) ** 2)))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


class Churn:
    """EDM's stochastic churn (Karras et al. 2022, Algorithm 2, lines 4-6): before step i, raise x's noise
    level from sigma to sigma_hat = (1 + gamma) sigma with fresh noise of std S_noise sqrt(sigma_hat^2 - sigma^2),
    gamma = min(S_churn / steps, sqrt(2) - 1) where S_tmin <= sigma <= S_tmax, else 0 (and no draw)."""

    def __init__(self, steps: int, S_churn, S_tmin, S_tmax, S_noise):
        for name, v in (("S_churn", S_churn), ("S_tmin", S_tmin), ("S_noise", S_noise)):
            _nonneg(name, v)
        _nonneg("S_tmax", S_tmax, inf_ok=True)
        self.gamma = min(S_churn / steps, math.sqrt(2) - 1)
        self.S_tmin, self.S_tmax, self.S_noise = S_tmin, S_tmax, S_noise

    def __call__(self, x, sigma: float, sigma_next: float, noise_sampler, backend: str):
        """(x_hat, sigma_hat)."""
        if self.gamma == 0 or not self.S_tmin <= sigma <= self.S_tmax:
            return x, sigma
        sigma_hat = sigma * (1 + self.gamma)
        scale = self.S_noise * math.sqrt(sigma_hat ** 2 - sigma ** 2)
        return lincomb(x, 1.0, (scale, noise_sampler(sigma, sigma_next)), backend=backend), sigma_hat


def dpm_2_step(denoise, x, denoised, sigma: float, sigma_next: float, backend: str):
    """DPM-Solver-2 as k-diffusion writes it: an Euler step to sigma_mid = sqrt(sigma sigma_next) (the
    midpoint in log sigma), then the full step with the derivative there,
    x + (sigma_next - sigma) (x_mid - D_mid) / sigma_mid. The step to 0 is an Euler step."""
    if sigma_next == 0:
        return euler_step(x, denoised, sigma, 0.0, backend)
    sigma_mid = math.sqrt(sigma * sigma_next)
    x_mid = euler_step(x, denoised, sigma, sigma_mid, backend)
    k = (sigma_next - sigma) / sigma_mid
    return lincomb(x, 1.0, (k, x_mid), (-k, denoise(x_mid, sigma_mid)), backend=backend)


def reverse_sde_step(x, denoised, sigma: float, sigma_next: float, noise_sampler, backend: str):
    """Euler-Maruyama for the reverse VE SDE from sigma to sigma_next (Song et al. 2021, eq. 6):
    x + (sigma^2 - sigma_next^2) score + sqrt(sigma^2 - sigma_next^2) z. The step to 0 denoises."""
    if sigma_next == 0:
        return euler_step(x, denoised, sigma, 0.0, backend)
    k = 1.0 - (sigma_next / sigma) ** 2
    return lincomb(x, 1.0 - k, (k, denoised), (math.sqrt(sigma ** 2 - sigma_next ** 2),
                                                noise_sampler(sigma, sigma_next)), backend=backend)


def sde_noise_std(sigma_next: float, eta_h: float) -> float:
    """The noise SDE-DPM-Solver++ adds on a step of length h in lambda: sigma' sqrt(1 - e^(-2 eta h))."""
    return sigma_next * math.sqrt(-math.expm1(-2 * eta_h))


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """Adams-Bashforth weights on a variable grid: the integrals over [sigmas[i], sigmas[i + 1]] of the
    Lagrange basis polynomials through sigmas[i], sigmas[i - 1], ..., sigmas[i - order + 1] (k-diffusion's
    linear_multistep_coeff). Gauss-Legendre with `order` nodes integrates them exactly (degree order - 1)."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    h = sigmas[i + 1] - sigmas[i]
    taus = sigmas[i] + 0.5 * h * (nodes + 1.0)
    ts = [sigmas[i - k] for k in range(order)]
    out = []
    for j in range(order):
        basis = np.ones_like(taus)
        for k in range(order):
            if k != j:
                basis *= (taus - ts[k]) / (ts[j] - ts[k])
        out.append(0.5 * h * float((weights * basis).sum()))
    return out


# ----------------------------------------------------------------------------
# the samplers
# ----------------------------------------------------------------------------

def sample_euler(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                 S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0):
    """Euler's method on the probability-flow ODE (first order); with S_churn > 0, EDM's churn before each
    step (Karras et al. 2022, Algorithm 2 with Euler steps; k-diffusion's sample_euler)."""
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    churn = Churn(len(sigmas) - 1, S_churn, S_tmin, S_tmax, S_noise)
    for i in _trange(len(sigmas) - 1, progress):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1], noise_sampler, backend)
        x = euler_step(x, denoise(x, sigma_hat), sigma_hat, sigmas[i + 1], backend)
    return x


def sample_heun(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0):
    """EDM's second-order Heun sampler (Karras et al. 2022, Algorithm 2; deterministic when S_churn = 0)."""
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    churn = Churn(len(sigmas) - 1, S_churn, S_tmin, S_tmax, S_noise)
    for i in _trange(len(sigmas) - 1, progress):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = churn(x, sigmas[i], sigma_next, noise_sampler, backend)
        denoised = denoise(x, sigma_hat)
        x_next = euler_step(x, denoised, sigma_hat, sigma_next, backend)
        if sigma_next > 0:
            x_next = heun_correct(x, denoised, x_next, denoise(x_next, sigma_next), sigma_hat, sigma_next,
                                  backend=backend)
        x = x_next
    return x


def sample_dpm_2(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                 S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"), S_noise=1.0):
    """k-diffusion's DPM-Solver-2 sampler (second order, two denoiser calls per step but the last), with
    EDM's churn as in sample_heun."""
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    churn = Churn(len(sigmas) - 1, S_churn, S_tmin, S_tmax, S_noise)
    for i in _trange(len(sigmas) - 1, progress):
        x, sigma_hat = churn(x, sigmas[i], sigmas[i + 1], noise_sampler, backend)
        x = dpm_2_step(denoise, x, denoise(x, sigma_hat), sigma_hat, sigmas[i + 1], backend)
    return x


def sample_euler_ancestral(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps: an Euler step to sigma_down, then noise of std s_noise sigma_up
    (ancestral_step). In VE form this is DDIM with the same eta (Song, Meng & Ermon 2021, eq. 12)."""
    _nonneg("eta", eta)
    _nonneg("s_noise", s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        noise = noise_sampler(sigma, sigma_next) if sigma_up > 0 else None
        x = euler_step(x, denoised, sigma, sigma_down, backend, noise, s_noise * sigma_up)
    return x


def sample_ddim(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto", eta=0.0):
    """DDIM (Song, Meng & Ermon 2021, eq. 12) in VE form: k-diffusion's euler_ancestral step.

    DDIM's noise sigma_t(eta) becomes sigma_up = eta sigma' sqrt(1 - sigma'^2/sigma^2) in VE form;
    the rest of sigma' is carried deterministically along the predicted noise (x - D)/sigma:
    x' = D + sigma_down (x - D)/sigma + sigma_up z, sigma_down = sqrt(sigma'^2 - sigma_up^2).
    eta = 0 is Euler on the probability-flow ODE; eta = 1 is DDPM ancestral sampling.
    """
    return sample_euler_ancestral(denoise, x, sigmas, noise_sampler=noise_sampler, progress=progress,
                                  backend=backend, eta=eta)


def sample_ddpm(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto"):
    """DDPM ancestral sampling (Ho et al. 2020): draws x' from the posterior q(x' | x, y = D(x)).

    In VE form that posterior is N(D + (sigma'^2/sigma^2)(x - D), sigma'^2 (1 - sigma'^2/sigma^2)),
    which is exactly DDIM's step with eta = 1.
    """
    return sample_euler_ancestral(denoise, x, sigmas, noise_sampler=noise_sampler, progress=progress,
                                  backend=backend, eta=1.0)


def sample_dpm_2_ancestral(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps to sigma_down (k-diffusion's sample_dpm_2_ancestral).

    Differs from k-diffusion only for eta > 1 where sigma_down reaches 0 before sigma_next does: k-diffusion
    then adds no noise; here the step still adds its sigma_up noise, as euler_ancestral does."""
    _nonneg("eta", eta)
    _nonneg("s_noise", s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = dpm_2_step(denoise, x, denoise(x, sigma), sigma, sigma_down, backend)
        if sigma_up > 0:
            x = lincomb(x, 1.0, (s_noise * sigma_up, noise_sampler(sigma, sigma_next)), backend=backend)
    return x


def sample_lms(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto", order=4):
    """Linear multistep (Adams-Bashforth of `order` on the variable sigma grid, lower orders on the first
    steps) on the probability-flow ODE, as k-diffusion's sample_lms: x' = x + sum_j c_j d_{i-j},
    d = (x - D)/sigma, with the weights of lms_coefficients."""
    _check_option("order", order, isinstance(order, int) and order >= 1, "an integer >= 1")
    ds = []  # derivatives, newest first
    for i in _trange(len(sigmas) - 1, progress):
        sigma = sigmas[i]
        ds.insert(0, lincomb(x, 1.0 / sigma, (-1.0 / sigma, denoise(x, sigma)), backend=backend))
        del ds[order:]
        x = lincomb(x, 1.0, *zip(lms_coefficients(sigmas, i, len(ds)), ds), backend=backend)
    return x


def sample_dpmpp_2s_ancestral(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                              eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, Algorithm 1 with r = 1/2) to sigma_down:
    a first-order step to the log-sigma midpoint, then a first-order step from x with the midpoint's D."""
    _nonneg("eta", eta)
    _nonneg("s_noise", s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down > 0:
            sigma_mid = math.sqrt(sigma * sigma_down)
            denoised = denoise(euler_step(x, denoised, sigma, sigma_mid, backend), sigma_mid)
        noise = noise_sampler(sigma, sigma_next) if sigma_up > 0 else None
        x = euler_step(x, denoised, sigma, sigma_down, backend, noise, s_noise * sigma_up)
    return x


def sample_dpmpp_sde(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), k-diffusion's sample_dpmpp_sde: per step, an ancestral first-order step to
    sigma_s = sigma^(1 - r) sigma'^r, then an ancestral step to sigma' with the data estimate
    (1 - 1/(2r)) D + 1/(2r) D(x_s; sigma_s). Its two draws per step must be increments of one Brownian
    path (BrownianIncrements; sample()'s default noise and k-diffusion's BrownianTreeNoiseSampler are)."""
    _nonneg("eta", eta)
    _nonneg("s_noise", s_noise)
    _check_option("r", r, isinstance(r, (int, float)) and 0 < r <= 1, "a number in (0, 1]")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    fac = 1 / (2 * r)
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = euler_step(x, denoised, sigma, 0.0, backend)
            continue
        sigma_s = sigma * (sigma_next / sigma) ** r
        sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
        noise = noise_sampler(sigma, sigma_s) if sigma_up > 0 else None
        x_s = euler_step(x, denoised, sigma, sigma_down, backend, noise, s_noise * sigma_up)
        denoised_d = lincomb(denoised, 1 - fac, (fac, denoise(x_s, sigma_s)), backend=backend)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        noise = noise_sampler(sigma, sigma_next) if sigma_up > 0 else None
        x = euler_step(x, denoised_d, sigma, sigma_down, backend, noise, s_noise * sigma_up)
    return x


def sample_dpmpp_2m(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto"):
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
            x = lincomb(x, sigma_next / sigma, (c * (1 + half_inv_r), denoised), (-c * half_inv_r, denoised_prev),
                        backend=backend)
        if sigma_next > 0:
            h_prev = math.log(sigma / sigma_next)
        denoised_prev = denoised
    return x


def sample_dpmpp_2m_sde(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                        eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, SDE-DPM-Solver++(2M); k-diffusion's sample_dpmpp_2m_sde).

    With h = log(sigma/sigma'), x' = (sigma'/sigma) e^(-eta h) x + (1 - e^(-(1 + eta) h)) D + k (D - D_prev)
    + s_noise sigma' sqrt(1 - e^(-2 eta h)) z, where the second-order term k uses r = h_prev / h and
    solver_type "midpoint" (k = (1 - e^(-(1 + eta) h)) / (2r)) or "heun"; eta = 0 is deterministic.
    The last step (to sigma = 0) returns D."""
    _nonneg("eta", eta)
    _nonneg("s_noise", s_noise)
    _check_option("solver_type", solver_type, solver_type in ("midpoint", "heun"), "'midpoint' or 'heun'")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    denoised_prev, h_prev = None, None
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        b = -math.expm1(-h - eta_h)
        terms = [(b, denoised)]
        if denoised_prev is not None:
            k = (0.5 * b if solver_type == "midpoint" else b / (-h - eta_h) + 1) * (h / h_prev)
            terms = [(b + k, denoised), (-k, denoised_prev)]
        if eta > 0:
            terms.append((s_noise * sde_noise_std(sigma_next, eta_h), noise_sampler(sigma, sigma_next)))
        x = lincomb(x, sigma_next / sigma * math.exp(-eta_h), *terms, backend=backend)
        denoised_prev, h_prev = denoised, h
    return x


def sample_dpmpp_3m_sde(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto",
                        eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE (k-diffusion's sample_dpmpp_3m_sde): the exponential-integrator step with
    h_eta = (1 + eta) h, x' = e^(-h_eta) x + (1 - e^(-h_eta)) D + phi_2 d1 - phi_3 d2 + noise, where d1, d2 are
    the first and second divided differences of the last three denoiser outputs (fewer on the first steps),
    phi_2 = 1 - (1 - e^(-h_eta)) / h_eta and phi_3 = phi_2 / h_eta - 1/2. The last step returns D.

    As in k-diffusion, d2 ~ h^2 D''/2 while the
    Taylor expansion of the exact step needs 2 phi_3 d2, so the method converges at order 2, not 3
    (measured in tests/test_sampling.py; doubling that term gives order 3). Kept as k-diffusion has it,
    so results match k-diffusion's."""
    _nonneg("eta", eta)
    _nonneg("s_noise", s_noise)
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    denoised_1 = denoised_2 = h_1 = h_2 = None
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        h_eta = h * (eta + 1)
        phi_1 = -math.expm1(-h_eta)
        phi_2 = 1 - phi_1 / h_eta
        w = [phi_1, 0.0, 0.0]  # weights of denoised, denoised_1, denoised_2
        if h_2 is not None:
            # phi_2 d1 - phi_3 d2 with d1_0 = (D - D_1)/r0, d1_1 = (D_1 - D_2)/r1,
            # d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1), d2 = (d1_0 - d1_1)/(r0 + r1), as weights of D, D_1, D_2.
            r0, r1 = h_1 / h, h_2 / h
            phi_3 = phi_2 / h_eta - 0.5
            a0 = (phi_2 * (1 + r0 / (r0 + r1)) - phi_3 / (r0 + r1)) / r0   # weight of D - D_1
            a1 = (phi_3 - phi_2 * r0) / (r0 + r1) / r1                     # weight of D_1 - D_2
            w = [phi_1 + a0, a1 - a0, -a1]
        elif h_1 is not None:
            a0 = phi_2 * h / h_1                                           # phi_2 (D - D_1) / r
            w = [phi_1 + a0, -a0, 0.0]
        terms = [(c, t) for c, t in zip(w, (denoised, denoised_1, denoised_2)) if t is not None]
        if eta > 0:
            terms.append((s_noise * sde_noise_std(sigma_next, h * eta), noise_sampler(sigma, sigma_next)))
        x = lincomb(x, math.exp(-h_eta), *terms, backend=backend)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


def sample_euler_maruyama(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto"):
    """Euler-Maruyama on the reverse VE SDE; the last step (to sigma = 0) returns the denoised mean."""
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in _trange(len(sigmas) - 1, progress):
        x = reverse_sde_step(x, denoise(x, sigmas[i]), sigmas[i], sigmas[i + 1], noise_sampler, backend)
    return x


def sample_pc(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto", snr=0.16, n_corrector=1):
    """Predictor-corrector sampling for VE (Song et al. 2021, Algorithm 2).

    Corrector: n_corrector Langevin steps x + eps score + sqrt(2 eps) z at the current sigma, with
    eps = 2 (snr ||z|| / ||score||)^2 from batch-mean norms (the paper's rule). Predictor: one
    reverse-SDE step. The step size is a batch statistic, so it costs one host sync per corrector step.
    """
    _check_option("snr", snr, isinstance(snr, (int, float)) and snr > 0, "a positive number")
    _check_option("n_corrector", n_corrector, isinstance(n_corrector, int) and n_corrector >= 0, "an integer >= 0")
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    for i in _trange(len(sigmas) - 1, progress):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        for _ in range(n_corrector):
            denoised = denoise(x, sigma)
            z = noise_sampler(sigma, sigma_next)
            # score = (D - x) / sigma^2, so eps / sigma^2 = 2 snr^2 sigma^2 ||z||^2 / ||D - x||^2.
            z_norm = z.flatten(1).norm(dim=1).mean()
            g_norm = (denoised - x).flatten(1).norm(dim=1).mean().clamp_min(1e-30)
            k = float(2 * (snr * sigma * z_norm / g_norm) ** 2)
            x = lincomb(x, 1.0 - k, (k, denoised), (sigma * math.sqrt(2 * k), z), backend=backend)
        x = reverse_sde_step(x, denoise(x, sigma), sigma, sigma_next, noise_sampler, backend)
    return x


def sample_rk45(denoise, x, sigmas, *, noise_sampler=None, progress=False, backend="auto", rtol=1e-5, atol=1e-5,
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
    "euler_ancestral": sample_euler_ancestral,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "euler_maruyama": sample_euler_maruyama,
    "pc": sample_pc,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "rk45": sample_rk45,
}
