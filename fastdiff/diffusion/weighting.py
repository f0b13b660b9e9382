"""Weightings w(lam) of the eps-loss (Kingma & Gao 2023).

A diffusion objective is

    L_w = E_y E_{lam ~ p} [ w(lam) / p(lam) * mean_d (eps_hat - eps)^2 ]

(fastdiff drops K&G's factor 1/2 and averages over dimensions). w is a function
of the log-SNR lam = -2 log sigma_ve alone. With w non-increasing in lam
(`is_monotone`), L_w is the ELBO of Gaussian-noise-augmented data.

diffusers, k-diffusion and EDM write their losses the other way: per sample
w(lam) * loss, with lam drawn from their own density p, so their K&G weighting is
w * p. make_objective(..., importance_weighted=False) uses that convention; the
README's table "The same loss as ..." lists each published loss as a fastdiff
(process, param, weighting, density), tested in tests/test_loss_equivalents.py.

Every w is a weight on the eps-loss; names ending in _mse say which prediction's
unweighted MSE the weighting makes (||pred_hat - pred||^2 = m(lam) ||eps_hat - eps||^2,
m = parameterization.error_scale):

  "elbo"/"uniform"/"eps_mse"  w = 1: the unweighted eps-loss (DDPM's L_simple;
                    k-diffusion's "snr", which is SNR times the x0-loss)       monotone
  "x0_mse"          w = e^-lam = 1/SNR: the unweighted x0-loss                    monotone
  "v_mse"           w = 1 + e^-lam: the unweighted v-loss                         monotone
  "score_mse"       w = e^lam = SNR: the unweighted loss of the VE score -eps/sigma
                    (= SNR^2 times the x0-loss). Its old name "snr" still works;
                    it is not k-diffusion's "snr" (use "eps_mse" for that)
  "karras"          w = (e^-lam + sd^2) / sd^2: the unweighted loss of EDM's
                    preconditioned output F, ||F - F*||^2 (k-diffusion's "karras";
                    "v_mse" for sd = 1)                                          monotone
  "edm"             w = N(lam; -2 P_mean, (2 P_std)^2) (e^-lam + sd^2) / sd^2
                    (EDM's lambda(sigma) and log-normal p(sigma) as one weighting:
                    "karras" times EDM's density)
  "min_snr"         w = min(1, gamma e^-lam) = min(SNR, gamma) / SNR (Hang et al. 2023,
                    on the eps-loss; diffusers' snr_gamma weight for eps and, through
                    the v-loss's 1 + e^-lam, for v-prediction too)              monotone
  "soft_min_snr"    w = gamma / (gamma + e^lam) (Crowson et al. 2024; gamma = 1/sd^2
                    reproduces k-diffusion's soft-min-snr on EDM's preconditioned loss)   monotone
  "sigmoid"         w = sigmoid(b - lam) (K&G)                                      monotone
  "edm_monotone"    w = EDM weighting for lam >= lam*, its maximum below (K&G's
                    monotone EDM; lam* the argmax)                                  monotone
  "learned"         EDM2's learned log-variance u(sigma) on top of a base weighting:
                    the per-sample loss becomes base_loss / e^u + u (Karras et al. 2024)

Weightings of other predictions' losses convert exactly with convert_weighting:
||x0_hat - x0||^2 = e^-lam ||eps_hat - eps||^2, so w_x0 = w_eps e^lam, and so on
(parameterization.error_scale).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from fastdiff.diffusion.parameterization import PREDICTIONS, error_scale

__all__ = ["Weighting", "get_weighting", "convert_weighting", "WEIGHTINGS", "WEIGHTING_ALIASES", "LearnedWeighting"]


class Weighting(nn.Module):
    """w(lam) for the eps-loss; `is_monotone` is True when w is non-increasing in lam."""

    name = "base"
    is_monotone = False
    learned = False

    def forward(self, lam: torch.Tensor) -> torch.Tensor:
        return self.w(lam)

    def w(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self):
        return f"name={self.name!r}, is_monotone={self.is_monotone}"


class ELBOWeighting(Weighting):
    name, is_monotone = "elbo", True

    def w(self, lam):
        return torch.ones_like(lam)


class EDMWeighting(Weighting):
    name = "edm"

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        super().__init__()
        if not (P_std > 0 and sigma_data > 0):
            raise ValueError(f"P_std and sigma_data must be > 0, got {P_std}, {sigma_data}")
        self.mu, self.std, self.sd2 = -2.0 * P_mean, 2.0 * P_std, sigma_data ** 2

    def w(self, lam):
        z = (lam - self.mu) / self.std
        pdf = torch.exp(-0.5 * z * z) / (self.std * math.sqrt(2 * math.pi))
        return pdf * (torch.exp(-lam) + self.sd2) / self.sd2

    def argmax(self) -> float:
        """lam* maximizing w: the root of -(lam - mu)/std^2 (e^-lam + sd2) - e^-lam (bisection)."""
        def dlog(l):
            return -(l - self.mu) / self.std ** 2 - math.exp(-l) / (math.exp(-l) + self.sd2)
        lo, hi = self.mu - 40 * self.std, self.mu + 40 * self.std   # dlog(lo) > 0 > dlog(hi)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if dlog(mid) > 0 else (lo, mid)
        return 0.5 * (lo + hi)


class EDMMonotoneWeighting(EDMWeighting):
    name, is_monotone = "edm_monotone", True

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        super().__init__(P_mean, P_std, sigma_data)
        self.lam_star = self.argmax()

    def w(self, lam):
        return super().w(torch.clamp(lam, min=self.lam_star))


class PredictionMSEWeighting(Weighting):
    """w = error_scale(prediction): the unweighted MSE of that prediction (eps, x0, v or VE score)."""

    def __init__(self, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.name = f"{prediction}_mse"
        self.is_monotone = prediction != "score"

    def w(self, lam):
        return error_scale(self.prediction, lam)


class KarrasWeighting(Weighting):
    """k-diffusion's "karras": the unweighted loss of EDM's preconditioned output F.

    ||F - F*||^2 = (sigma / c_out)^2 ||eps_hat - eps||^2 with c_out = sigma sd / sqrt(sigma^2 + sd^2),
    so w = (sigma^2 + sd^2) / sd^2 = (e^-lam + sd^2) / sd^2.
    """
    name, is_monotone = "karras", True

    def __init__(self, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sd2 = float(sigma_data) ** 2

    def w(self, lam):
        return torch.exp(-lam) / self.sd2 + 1


class MinSNRWeighting(Weighting):
    name, is_monotone = "min_snr", True

    def __init__(self, gamma: float = 5.0):
        super().__init__()
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.log_gamma = math.log(gamma)

    def w(self, lam):
        return torch.exp(torch.clamp(self.log_gamma - lam, max=0.0))


class SoftMinSNRWeighting(Weighting):
    name, is_monotone = "soft_min_snr", True

    def __init__(self, gamma: float | None = None, sigma_data: float = 0.5):
        super().__init__()
        gamma = 1.0 / sigma_data ** 2 if gamma is None else gamma
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        self.log_gamma = math.log(gamma)

    def w(self, lam):
        return torch.sigmoid(self.log_gamma - lam)


class SigmoidWeighting(Weighting):
    """Kingma & Gao's monotone sigmoid weighting w = sigmoid(b - lambda). The default shift
    b = 2 is the one BayesFlow's diffusion models use for the same weighting, citing the paper;
    larger b moves weight toward higher log-SNR (less noise)."""
    name, is_monotone = "sigmoid", True

    def __init__(self, b: float = 2.0):
        super().__init__()
        self.b = float(b)

    def w(self, lam):
        return torch.sigmoid(self.b - lam)


class LearnedWeighting(Weighting):
    """EDM2's learned uncertainty: u(sigma) from Fourier features of c_noise = log(sigma)/4.

    The objective uses base(lam) / p(lam) * L / e^u + u per sample (u gets its
    gradient there); `w` is the base weighting, `logvar(lam)` is u. u starts at 0.
    Train its parameters with the network (they are in obj.parameters()).
    """

    name, learned = "learned", True

    def __init__(self, base: Weighting | str = "edm", channels: int = 128, seed: int = 0, **base_kwargs):
        super().__init__()
        self.base = get_weighting(base, **base_kwargs)
        if self.base.learned:
            raise ValueError("base of a learned weighting cannot itself be learned")
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def w(self, lam):
        return self.base.w(lam)

    def logvar(self, lam: torch.Tensor) -> torch.Tensor:
        c_noise = (-0.125 * lam).to(self.freqs.dtype)           # log(sigma) / 4
        feat = math.sqrt(2) * torch.cos(c_noise[:, None] * self.freqs[None] + self.phases[None])
        return self.linear(feat.to(self.linear.weight.dtype))[:, 0].to(lam.dtype)


WEIGHTINGS = {
    "elbo": ELBOWeighting, "uniform": ELBOWeighting, "eps_mse": ELBOWeighting, "edm": EDMWeighting,
    "x0_mse": partial(PredictionMSEWeighting, "x0"), "v_mse": partial(PredictionMSEWeighting, "v"),
    "score_mse": partial(PredictionMSEWeighting, "score"), "karras": KarrasWeighting,
    "min_snr": MinSNRWeighting, "soft_min_snr": SoftMinSNRWeighting, "sigmoid": SigmoidWeighting,
    "edm_monotone": EDMMonotoneWeighting, "learned": LearnedWeighting,
}
# Old names kept working: "snr" was fastdiff's name for score_mse (w = SNR on the eps-loss),
# which k-diffusion's "snr" is not (that one is eps_mse).
WEIGHTING_ALIASES = {"snr": "score_mse"}
_SIGMA_DATA = ("edm", "edm_monotone", "soft_min_snr", "karras")


def get_weighting(name="edm", *, sigma_data: float | None = None, **kwargs) -> Weighting:
    """A weighting by name (see the module docstring) or an instance as is.

    sigma_data is passed to the weightings that use it (edm, edm_monotone, soft_min_snr, karras).
    """
    if isinstance(name, Weighting):
        if kwargs:
            raise ValueError(f"weighting is already a Weighting instance; unexpected kwargs {sorted(kwargs)}")
        return name
    name = WEIGHTING_ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(name, str) or name not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)} or a Weighting, got {name!r}")
    if sigma_data is not None and (name in _SIGMA_DATA or name == "learned"):
        kwargs.setdefault("sigma_data", sigma_data)
    try:
        return WEIGHTINGS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad parameters for weighting {name!r}: {e}") from None


def convert_weighting(w: torch.Tensor, lam: torch.Tensor, from_: str, to: str) -> torch.Tensor:
    """The weighting of the `to`-loss equal to weighting w of the `from_`-loss, at lam.

    w_from ||from_hat - from||^2 = w_to ||to_hat - to||^2 for the same denoiser,
    so w_to = w_from m_from / m_to with m = error_scale (e.g. w_x0 = w_eps e^lam).
    """
    for n, k in (("from_", from_), ("to", to)):
        if k not in PREDICTIONS:
            raise ValueError(f"{n} must be one of {PREDICTIONS}, got {k!r}")
    lam = torch.as_tensor(lam)
    w = torch.as_tensor(w)
    if w.shape != lam.shape and w.dim() != 0:
        raise ValueError(f"w must be a scalar or have lam's shape {tuple(lam.shape)}, got {tuple(w.shape)}")
    return w * error_scale(from_, lam) / error_scale(to, lam)
