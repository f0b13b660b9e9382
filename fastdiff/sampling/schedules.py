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
"""
from __future__ import annotations

import math

SCHEDULES = ("edm", "ve", "logsnr", "vp")
VP_EPS_S = 1e-3


def sigma_steps(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                schedule: str = "edm") -> list[float]:
    """`steps` noise levels from sigma_max down to sigma_min, then 0 (steps + 1 floats)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n = steps
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
