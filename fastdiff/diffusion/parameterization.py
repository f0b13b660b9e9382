"""What the network predicts, and EDM's preconditioning, in VE form.

Every parameterization is a preconditioning (Karras et al. 2022, Table 1):

    D(x_ve; sigma) = c_skip(sigma) x_ve + c_out(sigma) F(c_in(sigma) x_ve, c_noise(sigma))

with sigma the VE noise level (x_ve = y + sigma n). Its training target for F is
F* = (y - c_skip x_ve) / c_out, and ||D - y||^2 = c_out^2 ||F - F*||^2.

  "eps"    F predicts n:      c_skip = 1, c_out = -sigma
  "x0"     F predicts y:      c_skip = 0, c_out = 1
  "v"      F predicts v = a n - b y with a = 1/sqrt(1+sigma^2), b = sigma a
           (Salimans & Ho 2022 in the VP frame): c_skip = a^2, c_out = -b
  "score"  F predicts the VE score (y - x_ve) / sigma^2: c_skip = 1, c_out = sigma^2
    (for these four, c_in = alpha of the process at sigma, so the network sees the
     process's x_t, and c_noise = log(sigma) / 4)
  "edm"    c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
           c_in = 1/sqrt(sigma^2+sd^2), c_noise = log(sigma)/4
  "vp"     c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = (M-1) t(sigma)
  "ve"     c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma/2)
  "iddpm"  c_skip = 1, c_out = -sigma, c_in = 1/sqrt(sigma^2+1), c_noise = M-1-argmin_j |u_j - sigma|

Exact conversions between predictions ("x0", "eps", "v", "score") go through x0;
error_scale gives how each prediction's squared error relates to the eps error
(used to convert weightings, see weighting.convert_weighting).
"""
from __future__ import annotations

import math

import torch

from fastdiff.diffusion.processes import Process, _bcast, get_process

__all__ = ["Parameterization", "get_parameterization", "PARAMETERIZATIONS", "convert", "error_scale",
           "PREDICTIONS"]

PREDICTIONS = ("x0", "eps", "v", "score")


def _ab(sigma: torch.Tensor):
    a = torch.rsqrt(1 + sigma * sigma)
    return a, sigma * a


def to_x0(pred: torch.Tensor, kind: str, x_ve: torch.Tensor, sigma) -> torch.Tensor:
    s = _bcast(torch.as_tensor(sigma), x_ve)
    if kind == "x0":
        return pred
    if kind == "eps":
        return x_ve - s * pred
    if kind == "v":
        a, b = _ab(s)
        return a * a * x_ve - b * pred
    if kind == "score":
        return x_ve + s * s * pred
    raise ValueError(f"prediction kind must be one of {PREDICTIONS}, got {kind!r}")


def from_x0(x0: torch.Tensor, kind: str, x_ve: torch.Tensor, sigma) -> torch.Tensor:
    s = _bcast(torch.as_tensor(sigma), x_ve)
    if kind == "x0":
        return x0
    if kind == "eps":
        return (x_ve - x0) / s
    if kind == "v":
        a, b = _ab(s)
        return a * (x_ve - x0) / s - b * x0
    if kind == "score":
        return (x0 - x_ve) / (s * s)
    raise ValueError(f"prediction kind must be one of {PREDICTIONS}, got {kind!r}")


def convert(pred: torch.Tensor, from_: str, to: str, x_ve: torch.Tensor, sigma) -> torch.Tensor:
    """Converts a prediction of kind `from_` to kind `to` at (x_ve, sigma) exactly."""
    if pred.shape != x_ve.shape:
        raise ValueError(f"pred must have x_ve's shape {tuple(x_ve.shape)}, got {tuple(pred.shape)}")
    for n, k in (("from_", from_), ("to", to)):
        if k not in PREDICTIONS:
            raise ValueError(f"{n} must be one of {PREDICTIONS}, got {k!r}")
    return from_x0(to_x0(pred, from_, x_ve, sigma), to, x_ve, sigma)


def error_scale(kind: str, lam: torch.Tensor) -> torch.Tensor:
    """m(lam) with ||pred_hat - pred||^2 = m(lam) ||eps_hat - eps||^2 for the same denoiser.

    x0: e^-lam (= sigma^2), eps: 1, v: 1 + e^-lam, score (VE): e^lam.
    """
    lam = torch.as_tensor(lam)
    if kind == "eps":
        return torch.ones_like(lam)
    if kind == "x0":
        return torch.exp(-lam)
    if kind == "v":
        return 1 + torch.exp(-lam)
    if kind == "score":
        return torch.exp(lam)
    raise ValueError(f"kind must be one of {PREDICTIONS}, got {kind!r}")


class Parameterization:
    """A preconditioning (c_skip, c_out, c_in, c_noise) as functions of the VE sigma."""

    name = "base"
    prediction: str | None = None    # "x0" | "eps" | "v" | "score" for the raw ones

    def precond(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise), each with sigma's shape."""
        raise NotImplementedError

    def denoise(self, net, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """D(x_ve; sigma) = c_skip x_ve + c_out net(c_in x_ve, c_noise)."""
        s = _sigma_rows(sigma, x_ve)
        c_skip, c_out, c_in, c_noise = self.precond(s)
        F = net(_bcast(c_in, x_ve) * x_ve, c_noise.to(x_ve.dtype))
        if F.shape != x_ve.shape:
            raise ValueError(f"net output must have the input's shape {tuple(x_ve.shape)}, got {tuple(F.shape)}")
        return _bcast(c_skip, x_ve) * x_ve + _bcast(c_out, x_ve) * F.to(x_ve.dtype)

    def target(self, y: torch.Tensor, x_ve: torch.Tensor, sigma) -> torch.Tensor:
        """F* = (y - c_skip x_ve) / c_out: the network's training target for clean target y."""
        s = _sigma_rows(sigma, x_ve)
        c_skip, c_out, _, _ = self.precond(s)
        return (y - _bcast(c_skip, x_ve) * x_ve) / _bcast(c_out, x_ve)

    def eps_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """(c_out / sigma)^2: ||eps_hat - eps||^2 = (c_out/sigma)^2 ||F - F*||^2."""
        _, c_out, _, _ = self.precond(sigma)
        return (c_out / sigma) ** 2

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


def _sigma_rows(sigma, x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    if not isinstance(sigma, torch.Tensor):
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        return torch.full((B,), float(sigma), dtype=x.dtype, device=x.device)
    if sigma.numel() == 1:
        return sigma.reshape(()).to(device=x.device, dtype=x.dtype).expand(B)
    if sigma.shape[0] != B or sigma[0].numel() != 1:
        raise ValueError(f"sigma must be a float, 0-d, or have shape ({B},); got {tuple(sigma.shape)}")
    return sigma.reshape(B).to(device=x.device, dtype=x.dtype)


class RawParameterization(Parameterization):
    """The network predicts eps, x0, v or the VE score from the process's x_t."""

    def __init__(self, prediction: str, process: Process | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.name = self.prediction = prediction
        self.process = process

    def precond(self, sigma):
        one = torch.ones_like(sigma)
        if self.prediction == "eps":
            c_skip, c_out = one, -sigma
        elif self.prediction == "x0":
            c_skip, c_out = torch.zeros_like(sigma), one
        elif self.prediction == "v":
            a, b = _ab(sigma)
            c_skip, c_out = a * a, -b
        else:
            c_skip, c_out = one, sigma * sigma
        c_in = one if self.process is None else self.process.alpha_of_sigma_ve(sigma).to(sigma)
        return c_skip, c_out, c_in, 0.25 * sigma.log()


class EDMPrecond(Parameterization):
    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def precond(self, sigma):
        sd = self.sigma_data
        r = torch.rsqrt(sigma * sigma + sd * sd)
        return sd * sd * r * r, sigma * sd * r, r, 0.25 * sigma.log()


class VPPrecond(Parameterization):
    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_d: float = 19.9, M: int = 1000):
        self.beta_min, self.beta_d, self.M = float(beta_min), float(beta_d), int(M)

    def precond(self, sigma):
        one = torch.ones_like(sigma)
        t = ((self.beta_min ** 2 + 2 * self.beta_d * torch.log1p(sigma * sigma)).sqrt() - self.beta_min) / self.beta_d
        return one, -sigma, torch.rsqrt(sigma * sigma + 1), (self.M - 1) * t


class VEPrecond(Parameterization):
    name = "ve"

    def precond(self, sigma):
        one = torch.ones_like(sigma)
        return one, sigma, one, torch.log(0.5 * sigma)


class IDDPMPrecond(Parameterization):
    name = "iddpm"

    def __init__(self, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000):
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)

        def alpha_bar(j):
            return math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2

        u = [0.0] * (M + 1)
        for j in range(M, 0, -1):
            u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C_1) - 1)
        self.u = torch.tensor(u, dtype=torch.float64)    # u_0 > u_1 > ... > u_M = 0

    def precond(self, sigma):
        one = torch.ones_like(sigma)
        u = self.u.to(device=sigma.device, dtype=sigma.dtype)
        idx = (sigma.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)
        return one, -sigma, torch.rsqrt(sigma * sigma + 1), (self.M - 1 - idx).to(sigma.dtype)


PARAMETERIZATIONS = ("eps", "x0", "v", "score", "edm", "vp", "ve", "iddpm")


def get_parameterization(name="edm", *, process=None, sigma_data: float = 0.5, **kwargs) -> Parameterization:
    """A parameterization by name (see the module docstring) or an instance as is."""
    if isinstance(name, Parameterization):
        return name
    if not isinstance(name, str) or name not in PARAMETERIZATIONS:
        raise ValueError(f"param must be one of {PARAMETERIZATIONS} or a Parameterization, got {name!r}")
    try:
        if name in PREDICTIONS:
            return RawParameterization(name, None if process is None else get_process(process), **kwargs)
        if name == "edm":
            return EDMPrecond(sigma_data=sigma_data, **kwargs)
        return {"vp": VPPrecond, "ve": VEPrecond, "iddpm": IDDPMPrecond}[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad parameters for param {name!r}: {e}") from None
