"""Training-time noise densities p(lam) over the log-SNR lam = -2 log sigma_ve.

Objectives sample lam ~ p and weight each sample by w(lam) / p(lam), so the
density changes only the variance of the loss estimate, never its expectation
(Kingma & Gao 2023, Sec. 4); with make_objective(..., importance_weighted=False) the
weight is w(lam) alone, as in diffusers and k-diffusion, and the density becomes part
of the objective (K&G weighting w p). Every density is restricted to the process's range
[lam_min, lam_max] and normalized there; sampling and log_prob run in float64
on the device (B scalars per step, no host sync).

  "uniform"             t ~ U(t_min, t_max) of the process; p(lam) = 1 / (T |dlam/dt|)
  "uniform_lambda"      lam ~ U(lam_min, lam_max)
  "lognormal"           log sigma ~ N(P_mean, P_std^2) (EDM: -1.2, 1.2), i.e.
                        lam ~ N(-2 P_mean, (2 P_std)^2), truncated to the range
  "logit_normal"        (t - t_min) / T = sigmoid(z), z ~ N(mean, std^2) (Esser et al. 2024)
  "cosine"              tau ~ U, lam = -2 log tan(pi tau / 2) + 2 log(shift)
  "cosine_interpolated" lam = -2 log tan(pi tau / 2) + 2 ((1 - tau) log shift_start +
                        tau log shift_end): Hoogeboom et al. 2023's interpolated schedule,
                        tau lam_shifted(d_low) + (1 - tau) lam_shifted(d_high) for images of
                        side d, with shift_start = d_high / d and shift_end = d_low / d
                        (defaults 1 and 1/8: d = d_high = 256, d_low = 32)
  "adaptive"            K&G's adaptive density: piecewise constant on `bins` equal
                        lam-bins, mass ∝ an EMA of E[w(lam) L(lam)] per bin (L the
                        unweighted eps-loss), mixed with `mix` of uniform so no bin
                        starves; update(lam, values) with values = w * L per sample.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastdiff.diffusion.processes import Process, get_process

__all__ = ["Density", "get_density", "DENSITIES", "AdaptiveDensity", "histogram"]

_F64 = torch.float64


def _bisect_decreasing(f, target: float, lo: float, hi: float) -> float:
    """x in [lo, hi] with f(x) = target for a decreasing f (float64, Python scalars)."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class Density(nn.Module):
    """p(lam) on [lam_min, lam_max] of a process."""

    name = "base"
    adaptive = False

    def __init__(self, process: Process):
        super().__init__()
        self.process = get_process(process)
        self.lam_min, self.lam_max = self.process.lam_min, self.process.lam_max

    def _uniform(self, n: int, generator, device) -> torch.Tensor:
        if device is None:
            device = generator.device if generator is not None else self._device()
        return torch.rand(n, generator=generator, device=device, dtype=_F64)

    def _device(self):
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def sample(self, n: int, *, generator: torch.Generator | None = None, device=None,
               return_log_prob: bool = False):
        """n samples of lam in float64 (and their log p(lam) with return_log_prob)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        lam, logp = self._sample(self._uniform(n, generator, device))
        lam = lam.clamp(self.lam_min, self.lam_max)
        if return_log_prob:
            return lam, (self.log_prob(lam) if logp is None else logp)
        return lam

    def _sample(self, u: torch.Tensor):
        """lam from u ~ U(0, 1) (and log p, or None to compute it from lam)."""
        raise NotImplementedError

    def log_prob(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, lam: torch.Tensor, values: torch.Tensor) -> None:
        """Feeds back per-sample w(lam) L(lam); a no-op for fixed densities."""

    def extra_repr(self):
        return f"name={self.name!r}, lam in [{self.lam_min:.4g}, {self.lam_max:.4g}]"


class UniformT(Density):
    name = "uniform"

    def _sample(self, u):
        p = self.process
        t = p.t_min + (p.t_max - p.t_min) * u
        lam = p.lam(t)
        return lam, -math.log(p.t_max - p.t_min) - p.dlam_dt(t).abs().log()

    def log_prob(self, lam):
        p = self.process
        t = p._t_of_lambda(lam.to(_F64))
        return -math.log(p.t_max - p.t_min) - p.dlam_dt(t).abs().log()


class UniformLambda(Density):
    name = "uniform_lambda"

    def _sample(self, u):
        lam = self.lam_min + (self.lam_max - self.lam_min) * u
        return lam, torch.full_like(u, -math.log(self.lam_max - self.lam_min))

    def log_prob(self, lam):
        return torch.full_like(lam.to(_F64), -math.log(self.lam_max - self.lam_min))


class LogNormal(Density):
    name = "lognormal"

    def __init__(self, process, P_mean: float = -1.2, P_std: float = 1.2):
        super().__init__(process)
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        self.mu, self.std = -2.0 * P_mean, 2.0 * P_std
        cdf = lambda v: 0.5 * math.erfc(-v / math.sqrt(2))   # noqa: E731
        self.cdf_lo = cdf((self.lam_min - self.mu) / self.std)
        self.cdf_hi = cdf((self.lam_max - self.mu) / self.std)
        if not self.cdf_hi - self.cdf_lo > 1e-300:
            raise ValueError("lognormal density has no mass in the process's sigma range")
        self.log_mass = math.log(self.cdf_hi - self.cdf_lo)

    def _sample(self, u):
        q = self.cdf_lo + (self.cdf_hi - self.cdf_lo) * u
        return self.mu + self.std * torch.special.ndtri(q), None

    def log_prob(self, lam):
        z = (lam.to(_F64) - self.mu) / self.std
        return -0.5 * z * z - math.log(self.std * math.sqrt(2 * math.pi)) - self.log_mass


class LogitNormal(Density):
    name = "logit_normal"

    def __init__(self, process, mean: float = 0.0, std: float = 1.0):
        super().__init__(process)
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def _sample(self, u):
        p = self.process
        tau = torch.sigmoid(self.mean + self.std * torch.special.ndtri(u.clamp(1e-300, 1 - 1e-16)))
        t = (p.t_min + (p.t_max - p.t_min) * tau).clamp(p.t_min, p.t_max)
        return p.lam(t), None

    def log_prob(self, lam):
        p = self.process
        T = p.t_max - p.t_min
        t = p._t_of_lambda(lam.to(_F64))
        tau = ((t - p.t_min) / T).clamp(1e-300, 1 - 1e-16)
        z = (torch.log(tau) - torch.log1p(-tau) - self.mean) / self.std
        log_pt = (-0.5 * z * z - math.log(self.std * math.sqrt(2 * math.pi))
                  - torch.log(tau) - torch.log1p(-tau) - math.log(T))
        return log_pt - p.dlam_dt(t).abs().log()


class CosineInterpolated(Density):
    name = "cosine_interpolated"

    def __init__(self, process, shift_start: float = 1.0, shift_end: float = 0.125):
        super().__init__(process)
        if not (shift_start > 0 and shift_end > 0):
            raise ValueError(f"shifts must be > 0, got {shift_start}, {shift_end}")
        self.a, self.k = 2 * math.log(shift_start), 2 * math.log(shift_end / shift_start)
        if self.k >= 2 * math.pi:
            raise ValueError("shift_end / shift_start too large: lam(tau) would not decrease")
        f = lambda x: -2 * math.log(math.tan(0.5 * math.pi * x)) + self.a + self.k * x   # noqa: E731
        self.tau_a = _bisect_decreasing(f, self.lam_max, 1e-300, 1 - 1e-16)
        self.tau_b = _bisect_decreasing(f, self.lam_min, 1e-300, 1 - 1e-16)

    def _lam(self, tau):
        return -2 * torch.log(torch.tan(0.5 * math.pi * tau)) + self.a + self.k * tau

    def _logp_tau(self, tau):
        dlam = -2 * math.pi / torch.sin(math.pi * tau) + self.k
        return -math.log(self.tau_b - self.tau_a) - dlam.abs().log()

    def _sample(self, u):
        tau = self.tau_a + (self.tau_b - self.tau_a) * u
        return self._lam(tau), self._logp_tau(tau)

    def log_prob(self, lam):
        lam = lam.to(_F64)
        if self.k == 0:   # plain (shifted) cosine: closed-form inverse
            return self._logp_tau((2 / math.pi) * torch.atan(torch.exp(-0.5 * (lam - self.a))))
        lo, hi = torch.full_like(lam, self.tau_a), torch.full_like(lam, self.tau_b)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self._lam(mid) > lam
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return self._logp_tau(0.5 * (lo + hi))


class Cosine(CosineInterpolated):
    name = "cosine"

    def __init__(self, process, shift: float = 1.0):
        super().__init__(process, shift_start=shift, shift_end=shift)


def histogram(lam: torch.Tensor, values: torch.Tensor, lam_min: float, lam_max: float, bins: int):
    """(sums, counts) of values over `bins` equal lam-bins of [lam_min, lam_max], on device.

    For logging loss per lambda bin without a host sync: sums / counts.clamp(min=1).
    """
    if lam.shape != values.shape or lam.dim() != 1:
        raise ValueError(f"lam and values must be (B,) tensors of one shape, got {tuple(lam.shape)} "
                         f"and {tuple(values.shape)}")
    idx = ((lam.to(_F64) - lam_min) * (bins / (lam_max - lam_min))).floor().clamp(0, bins - 1).long()
    sums = torch.zeros(bins, dtype=_F64, device=lam.device).index_add_(0, idx, values.to(_F64))
    counts = torch.zeros(bins, dtype=_F64, device=lam.device).index_add_(0, idx, torch.ones_like(sums[idx]))
    return sums, counts


class AdaptiveDensity(Density):
    """Kingma & Gao's adaptive p(lam): piecewise constant, mass ∝ EMA of E[w L] per bin.

    State (buffers, in state_dict): ema (bins,), ema_weight (bins,) (the EMA's
    bias correction, 0 for bins never seen). A bin never seen gets the largest
    estimate of the seen bins (it is explored, not starved); before any update
    the density is uniform in lam.
    """

    name, adaptive = "adaptive", True

    def __init__(self, process, bins: int = 64, decay: float = 0.99, mix: float = 0.05):
        super().__init__(process)
        if not (isinstance(bins, int) and bins >= 1):
            raise ValueError(f"bins must be a positive int, got {bins!r}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not 0 < mix <= 1:
            raise ValueError(f"mix must be in (0, 1] (a positive uniform floor keeps the estimate unbiased), "
                             f"got {mix}")
        self.bins, self.decay, self.mix = bins, float(decay), float(mix)
        self.width = (self.lam_max - self.lam_min) / bins
        self.register_buffer("ema", torch.zeros(bins, dtype=_F64))
        self.register_buffer("ema_weight", torch.zeros(bins, dtype=_F64))

    def mass(self) -> torch.Tensor:
        """(bins,) probability of each bin."""
        seen = self.ema_weight > 0
        est = torch.where(seen, self.ema / self.ema_weight.clamp(min=1e-300), torch.zeros_like(self.ema))
        est = est.clamp(min=0)
        fill = torch.where(seen.any(), est.max(), torch.ones((), dtype=_F64, device=est.device))
        est = torch.where(seen, est, fill)
        total = est.sum()
        shape = torch.where(total > 0, est / total.clamp(min=1e-300), torch.full_like(est, 1.0 / self.bins))
        return (1 - self.mix) * shape + self.mix / self.bins

    def _sample(self, u):
        m = self.mass().to(u.device)
        cdf = torch.cumsum(m, 0)
        q = u * cdf[-1]
        k = torch.searchsorted(cdf, q, right=True).clamp(max=self.bins - 1)
        prev = cdf[k] - m[k]
        frac = ((q - prev) / m[k]).clamp(0, 1)
        lam = self.lam_min + (k.to(_F64) + frac) * self.width
        return lam, torch.log(m[k] / cdf[-1]) - math.log(self.width)

    def log_prob(self, lam):
        m = self.mass().to(lam.device)
        k = ((lam.to(_F64) - self.lam_min) / self.width).floor().clamp(0, self.bins - 1).long()
        return torch.log(m[k] / m.sum()) - math.log(self.width)

    @torch.no_grad()
    def update(self, lam: torch.Tensor, values: torch.Tensor) -> None:
        lam, values = lam.detach().to(self.ema.device), values.detach().to(self.ema.device, _F64)
        ok = torch.isfinite(values) & torch.isfinite(lam)
        values = torch.where(ok, values, torch.zeros_like(values))
        lam = torch.where(ok, lam.to(_F64), torch.full_like(values, self.lam_min))
        sums, _ = histogram(lam, values, self.lam_min, self.lam_max, self.bins)
        counts, _ = histogram(lam, ok.to(_F64), self.lam_min, self.lam_max, self.bins)
        has = counts > 0
        mean = sums / counts.clamp(min=1)
        d = self.decay
        self.ema.copy_(torch.where(has, d * self.ema + (1 - d) * mean, self.ema))
        self.ema_weight.copy_(torch.where(has, d * self.ema_weight + (1 - d), self.ema_weight))

    def extra_repr(self):
        return super().extra_repr() + f", bins={self.bins}, decay={self.decay}, mix={self.mix}"


DENSITIES = {
    "uniform": UniformT, "uniform_lambda": UniformLambda, "lognormal": LogNormal,
    "logit_normal": LogitNormal, "cosine": Cosine, "cosine_interpolated": CosineInterpolated,
    "adaptive": AdaptiveDensity,
}


def get_density(name="lognormal", process="edm", **kwargs) -> Density:
    """A density by name (see the module docstring) on `process`'s lam range, or an instance as is."""
    if isinstance(name, Density):
        if kwargs:
            raise ValueError(f"density is already a Density instance; unexpected kwargs {sorted(kwargs)}")
        return name
    if not isinstance(name, str) or name not in DENSITIES:
        raise ValueError(f"density must be one of {sorted(DENSITIES)} or a Density, got {name!r}")
    try:
        return DENSITIES[name](get_process(process), **kwargs)
    except TypeError as e:
        raise ValueError(f"bad parameters for density {name!r}: {e}") from None
