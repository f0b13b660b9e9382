"""Forward processes x_t = alpha(t) y + sigma(t) n and their VE form.

Every process is described by sigma(t) and alpha(t) on [t_min, t_max]; the rest
follows:

    lam(t)      = log(alpha^2 / sigma^2)          (log-SNR, decreasing in t)
    sigma_ve(t) = sigma / alpha = exp(-lam / 2)   (x_ve = x_t / alpha = y + sigma_ve n)

The STF op and the objectives work in VE form; `to_ve`/`from_ve` scale between
the two. sigma_min/sigma_max are the VE noise levels at t_min/t_max, and
lam_min/lam_max the log-SNR range (lam_max at t_min).

Built-ins (get_process):
  "ve"        sigma_ve geometric in [0.02, 100] over t in [0, 1], alpha = 1 (Song et al. 2021)
  "vp"        alpha = exp(-beta_d t^2 / 4 - beta_min t / 2), sigma = sqrt(1 - alpha^2),
              beta_min = 0.1, beta_d = 19.9, t in [1e-5, 1] (Song et al. 2021; EDM Table 1)
  "vp_cosine" lam(t) = -2 log tan(pi t / 2) + 2 log(shift), alpha^2 = sigmoid(lam)
              (Nichol & Dhariwal 2021; Kingma & Gao 2023), t limited to sigma_ve in
              [sigma_min, sigma_max] = [0.002, 80] by default
  "edm"       sigma = t in [0.002, 80], alpha = 1, sigma_data = 0.5 (Karras et al. 2022)
A user process: `Process(sigma_fn, alpha_fn, t_min, t_max)` with callables on
float64 tensors (torch ops, so dlam_dt works by autograd); its inverse is found by
bisection.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from fastdiff.ops.stf import _checking_values

__all__ = ["Process", "VEProcess", "VPProcess", "CosineProcess", "EDMProcess", "get_process", "PROCESSES"]

# Relative slack when checking that a sigma or lambda lies in a process's range
# (float32 round trips land just outside it).
RANGE_RTOL = 1e-5


def _t(t) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.double()
    return torch.tensor(float(t), dtype=torch.float64)


def _bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-row (B,) or scalar coefficient shaped to broadcast against x (B, ...)."""
    c = c.to(x)
    if c.dim() == 0:
        return c
    return c.reshape(c.shape[0], *([1] * (x.dim() - 1)))


class Process:
    """A forward process given by sigma(t) and alpha(t) on [t_min, t_max].

    Subclasses override the closed forms (lam, t_of_lambda, dlam_dt,
    alpha_of_sigma_ve); a user process only passes sigma_fn and alpha_fn.
    """

    name = "custom"

    def __init__(self, sigma_fn: Callable | None = None, alpha_fn: Callable | None = None,
                 t_min: float = 0.0, t_max: float = 1.0, *, name: str | None = None):
        if not (math.isfinite(t_min) and math.isfinite(t_max) and t_min < t_max):
            raise ValueError(f"t_min, t_max must be finite with t_min < t_max, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        if name is not None:
            self.name = name
        if type(self) is Process:
            if not callable(sigma_fn) or not callable(alpha_fn):
                raise TypeError("a user-defined process needs callables sigma_fn(t) and alpha_fn(t)")
            self._sigma_fn, self._alpha_fn = sigma_fn, alpha_fn
            grid = torch.linspace(self.t_min, self.t_max, 1001, dtype=torch.float64)
            lam = self.lam(grid)
            if not bool(torch.isfinite(lam).all()):
                raise ValueError("sigma_fn and alpha_fn must be positive and finite on [t_min, t_max]")
            if not bool((lam[1:] < lam[:-1]).all()):
                raise ValueError("sigma_fn / alpha_fn must give a log-SNR lam(t) that strictly decreases in t")
        self._set_range()

    def _set_range(self):
        self.lam_max = float(self.lam(_t(self.t_min)))
        self.lam_min = float(self.lam(_t(self.t_max)))
        # the user's sigma_min/sigma_max exactly where a subclass was given them
        self.sigma_min, self.sigma_max = getattr(self, "_sigma_range", (math.exp(-0.5 * self.lam_max),
                                                                         math.exp(-0.5 * self.lam_min)))

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, sigma_ve in [{self.sigma_min:.4g}, {self.sigma_max:.4g}])"

    # ------------------------------------------------------------------ schedule
    def sigma(self, t):
        return self._sigma_fn(_t(t))

    def alpha(self, t):
        return self._alpha_fn(_t(t))

    def lam(self, t):
        t = _t(t)
        return 2.0 * (self.alpha(t).log() - self.sigma(t).log())

    def sigma_ve(self, t):
        return torch.exp(-0.5 * self.lam(t))

    def dlam_dt(self, t):
        """d lam / d t (negative), by autograd for a user process."""
        t = _t(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.lam(t).sum(), t)
        return g

    # ------------------------------------------------------------------ inverses
    def _check_lam(self, lam: torch.Tensor, name: str = "lam"):
        if _checking_values() and lam.numel():
            tol = RANGE_RTOL * max(1.0, abs(self.lam_min), abs(self.lam_max))
            ok = (lam >= self.lam_min - tol) & (lam <= self.lam_max + tol)
            if not bool(ok.all()):
                lo, hi = float(lam.min()), float(lam.max())
                if name == "sigma":
                    raise ValueError(f"sigma out of range: process {self.name!r} has sigma_ve in "
                                     f"[{self.sigma_min:.6g}, {self.sigma_max:.6g}], got values in "
                                     f"[{math.exp(-hi / 2):.6g}, {math.exp(-lo / 2):.6g}]")
                raise ValueError(f"lam out of range: process {self.name!r} has lam in "
                                 f"[{self.lam_min:.6g}, {self.lam_max:.6g}], got values in [{lo:.6g}, {hi:.6g}]")

    def t_of_lambda(self, lam, *, _checked: bool = True):
        lam = _t(lam)
        if _checked:
            self._check_lam(lam)
        return self._t_of_lambda(lam)

    def _t_of_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        # Bisection in float64 on the strictly decreasing lam(t).
        l64 = lam.double()
        lo = torch.full_like(l64, self.t_min)
        hi = torch.full_like(l64, self.t_max)
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = self.lam(mid) > l64           # lam(mid) > target: the root is later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    def t_of_sigma_ve(self, sigma):
        s = _t(sigma)
        if _checking_values() and s.numel() and not bool((s > 0).all()):
            raise ValueError("sigma must be positive")
        lam = -2.0 * s.log()
        self._check_lam(lam, "sigma")
        return self._t_of_lambda(lam)

    def alpha_of_sigma_ve(self, sigma):
        """alpha at the time where the VE noise level is sigma (no range check: hot path)."""
        s = _t(sigma)
        return self.alpha(self._t_of_lambda(-2.0 * s.log()))

    # ------------------------------------------------------------------ VE maps
    def to_ve(self, x: torch.Tensor, t) -> torch.Tensor:
        """x_t (process form) -> x_ve = x_t / alpha(t)."""
        return x / _bcast(self.alpha(t), x)

    def from_ve(self, x_ve: torch.Tensor, t) -> torch.Tensor:
        """x_ve -> x_t = alpha(t) x_ve."""
        return x_ve * _bcast(self.alpha(t), x_ve)


class VEProcess(Process):
    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self._smin, self._smax = float(sigma_min), float(sigma_max)
        self._sigma_range = (self._smin, self._smax)
        self._logr = math.log(sigma_max / sigma_min)
        super().__init__(t_min=0.0, t_max=1.0)

    def sigma(self, t):
        t = _t(t)
        return self._smin * torch.exp(self._logr * t)

    def alpha(self, t):
        return torch.ones_like(_t(t))

    def lam(self, t):
        return -2.0 * (math.log(self._smin) + self._logr * _t(t))

    def dlam_dt(self, t):
        return torch.full_like(_t(t), -2.0 * self._logr)

    def _t_of_lambda(self, lam):
        return (-0.5 * lam - math.log(self._smin)) / self._logr

    def alpha_of_sigma_ve(self, sigma):
        return torch.ones_like(_t(sigma))


class _VariancePreserving(Process):
    """alpha^2 + sigma^2 = 1, so alpha = 1 / sqrt(1 + sigma_ve^2)."""

    def alpha_of_sigma_ve(self, sigma):
        s = _t(sigma)
        return torch.rsqrt(1 + s * s)


class VPProcess(_VariancePreserving):
    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, t_min: float = 1e-5, t_max: float = 1.0):
        if not (beta_min >= 0 and beta_d >= 0 and beta_min + beta_d > 0):
            raise ValueError(f"beta_min and beta_d must be >= 0 and not both 0, got {beta_min}, {beta_d}")
        if not t_min > 0:
            raise ValueError(f"t_min must be > 0 for the VP process (sigma(0) = 0), got {t_min}")
        self.beta_min, self.beta_d = float(beta_min), float(beta_d)
        super().__init__(t_min=t_min, t_max=t_max)

    def _g(self, t):  # -log alpha^2 = integral of beta
        return 0.5 * self.beta_d * t * t + self.beta_min * t

    def alpha(self, t):
        return torch.exp(-0.5 * self._g(_t(t)))

    def sigma(self, t):
        return (-torch.expm1(-self._g(_t(t)))).sqrt()

    def lam(self, t):
        return -torch.log(torch.expm1(self._g(_t(t))))

    def dlam_dt(self, t):
        t = _t(t)
        g = self._g(t)
        return -(self.beta_d * t + self.beta_min) / (-torch.expm1(-g))

    def _t_of_lambda(self, lam):
        # g(t) = log(1 + e^-lam) = softplus(-lam), solve the quadratic.
        g = F.softplus(-lam)
        if self.beta_d == 0:
            return g / self.beta_min
        return ((self.beta_min ** 2 + 2 * self.beta_d * g).sqrt() - self.beta_min) / self.beta_d


class CosineProcess(_VariancePreserving):
    """Variance-preserving with lam(t) = -2 log tan(pi t / 2) + 2 log(shift)."""

    name = "vp_cosine"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, shift: float = 1.0):
        if not (0 < sigma_min < sigma_max < math.inf) or not shift > 0:
            raise ValueError(f"need 0 < sigma_min < sigma_max and shift > 0, got {sigma_min}, {sigma_max}, {shift}")
        self.shift = float(shift)
        self._sigma_range = (float(sigma_min), float(sigma_max))
        self._logshift = math.log(shift)
        t_min = float(self._t_of_lambda(torch.tensor(-2 * math.log(sigma_min), dtype=torch.float64)))
        t_max = float(self._t_of_lambda(torch.tensor(-2 * math.log(sigma_max), dtype=torch.float64)))
        super().__init__(t_min=t_min, t_max=t_max)

    def lam(self, t):
        return -2.0 * torch.log(torch.tan(0.5 * math.pi * _t(t))) + 2 * self._logshift

    def alpha(self, t):
        return torch.sigmoid(self.lam(t)).sqrt()

    def sigma(self, t):
        return torch.sigmoid(-self.lam(t)).sqrt()

    def dlam_dt(self, t):
        return -2.0 * math.pi / torch.sin(math.pi * _t(t))

    def _t_of_lambda(self, lam):
        return (2 / math.pi) * torch.atan(torch.exp(-0.5 * (lam - 2 * self._logshift)))


class EDMProcess(Process):
    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)
        self._sigma_range = (float(sigma_min), float(sigma_max))
        super().__init__(t_min=sigma_min, t_max=sigma_max)

    def sigma(self, t):
        return _t(t).clone()

    def alpha(self, t):
        return torch.ones_like(_t(t))

    def lam(self, t):
        return -2.0 * torch.log(_t(t))

    def dlam_dt(self, t):
        return -2.0 / _t(t)

    def _t_of_lambda(self, lam):
        return torch.exp(-0.5 * lam)

    def alpha_of_sigma_ve(self, sigma):
        return torch.ones_like(_t(sigma))


PROCESSES = {"ve": VEProcess, "vp": VPProcess, "vp_cosine": CosineProcess, "edm": EDMProcess}


def get_process(name="edm", **kwargs) -> Process:
    """A process by name ("ve", "vp", "vp_cosine", "edm"), with its parameters as kwargs.

    A Process instance is returned as is (kwargs must then be empty).
    """
    if isinstance(name, Process):
        if kwargs:
            raise ValueError(f"process is already a Process instance; unexpected kwargs {sorted(kwargs)}")
        return name
    if not isinstance(name, str) or name not in PROCESSES:
        raise ValueError(f"process must be one of {sorted(PROCESSES)} or a Process instance, got {name!r}")
    try:
        return PROCESSES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad parameters for process {name!r}: {e}") from None
