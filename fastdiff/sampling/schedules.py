"""Noise-level discretizations for the samplers, in float64 (Python floats), as in EDM.

Every schedule returns `steps` decreasing noise levels from sigma_max to
sigma_min (VE form, sigma = sigma_vp / alpha) followed by a final 0, so a sampler
takes `steps` steps and its last one lands on the data (EDM's t_N = 0).

- "edm":    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
            (Karras et al. 2022, eq. 5).
- "ve":     uniform in t for the VE SDE sigma(t) = sigma_min (sigma_max/sigma_min)^t
            (Song et al. 2021): geometric in sigma.
- "logsnr": uniform in log-SNR lambda = -2 log sigma. In VE form this is the same
            grid as "ve" (both are uniform in log sigma); kept as its own name
            because that is how DPM-Solver and VDM describe it.
- "vp":     uniform in t in [1, eps_s] for the VP SDE with linear beta(t), beta_d
            and beta_min fitted so that sigma(1) = sigma_max and
            sigma(eps_s) = sigma_min (EDM generate.py, eps_s = 1e-3).
- "iddpm":  EDM's iDDPM discretization: `steps` of the M = 1000 noise levels of improved DDPM's
            cosine schedule (iddpm_sigmas) that lie in [sigma_min, sigma_max], evenly spaced in
            index (rounded). EDM samples iDDPM models with sigma_max = 81; rho is unused.
"""
from __future__ import annotations

import functools
import math

SCHEDULES = ("edm", "ve", "logsnr", "vp", "iddpm")
VP_EPS_S = 1e-3


@functools.lru_cache(maxsize=None)
def _iddpm_sigmas(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> list[float]:
    """The M + 1 noise levels u_0 > ... > u_M = 0 of improved DDPM's cosine schedule in VE form
    (Nichol & Dhariwal 2021; EDM's iDDPMPrecond.u, Karras et al. 2022, Table 1):
    u_{j-1} = sqrt((u_j^2 + 1) / max(alpha_bar(j-1) / alpha_bar(j), C_1) - 1),
    alpha_bar(j) = sin(pi/2 j / (M (C_2 + 1)))^2.

    The ratios are evaluated in float32 and the recurrence in float64, as EDM's code does
    (its int64 j times a Python float is float32), so the levels equal EDM's bit for bit and a
    sigma_max taken from an EDM network (its u[0]) selects the same levels.
    """
    import torch

    # EDM's own arithmetic, one 0-d tensor at a time: torch's vectorized sin rounds some float32
    # values differently from its scalar one, and it divides by a 0-d tensor as a * (1 / b).
    def alpha_bar(j: int) -> torch.Tensor:
        return (0.5 * math.pi * torch.tensor(j, dtype=torch.float32) / M / (C_2 + 1)).sin() ** 2

    u = torch.zeros(M + 1, dtype=torch.float64)
    for k in range(M, 0, -1):
        u[k - 1] = ((u[k] ** 2 + 1) / (alpha_bar(k - 1) / alpha_bar(k)).clip(min=C_1) - 1).sqrt()
    u = u.tolist()
    return tuple(u)


def iddpm_sigmas(M: int = 1000, C_1: float = 0.001, C_2: float = 0.008) -> list[float]:
    """The M + 1 noise levels of improved DDPM's cosine schedule (see _iddpm_sigmas), largest first."""
    return list(_iddpm_sigmas(M, C_1, C_2))


def sigma_steps(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                schedule: str = "edm") -> list[float]:
    """`steps` noise levels from sigma_max down to sigma_min, then 0 (steps + 1 floats)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n = steps
    if schedule == "iddpm":
        u = [v for v in iddpm_sigmas() if sigma_min <= v <= sigma_max]
        if len(u) < n:
            raise ValueError(f"schedule 'iddpm' has {len(u)} noise levels in [sigma_min, sigma_max] = "
                             f"[{sigma_min}, {sigma_max}]; steps must be <= {len(u)}, got {steps}")
        # EDM rounds (len(u) - 1) / (steps - 1) * i half to even, as Python's round() does.
        return [u[round((len(u) - 1) / (n - 1) * i)] if n > 1 else u[0] for i in range(n)] + [0.0]
    frac = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    if schedule == "edm":
        hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sig = [(hi + f * (lo - hi)) ** rho for f in frac]
    elif schedule in ("ve", "logsnr"):
        sig = [sigma_max * (sigma_min / sigma_max) ** f for f in frac]
    else:
        eps = VP_EPS_S
        beta_d = 2 * (math.log(sigma_min ** 2 + 1) / eps - math.log(sigma_max ** 2 + 1)) / (eps - 1)
        beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
        ts = [1 + f * (eps - 1) for f in frac]
        sig = [math.sqrt(math.expm1(0.5 * beta_d * t * t + beta_min * t)) for t in ts]
    sig[0] = float(sigma_max)  # exact endpoints (the formulas round at the last ulp)
    if n > 1:
        sig[-1] = float(sigma_min)
    return sig + [0.0]
