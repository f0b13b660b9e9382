"""DSM and STF objectives for any process x parameterization x weighting x density.

One training step, all in VE form (x_ve = y + sigma n, sigma = exp(-lam / 2)):

    lam ~ p(lam)                            density (importance weight w(lam) / p(lam))
    target = y                              DSM
           = stf_target(x_ve, sigma, cat([y, extra_ref]))   STF (Xu et al. 2023): the
             posterior mean over the reference batch, the batch's own y among it
    F  = net(c_in x_ve, c_noise)            parameterization (c_skip, c_out, c_in, c_noise)
    F* = (target - c_skip x_ve) / c_out
    per-sample loss = w(lam) / p(lam) * (c_out / sigma)^2 * mean_d (F - F*)^2
                    = w(lam) / p(lam) * mean_d (eps_hat - eps*)^2

so the expectation is K&G's weighted loss (times 2/D) whatever the density and
parameterization, and STF only replaces y by the lower-variance target. With
the learned (EDM2) weighting, per-sample loss -> loss / e^u + u.
With importance_weighted=False the factor 1 / p(lam) is dropped: per-sample loss
w(lam) * mean_d (eps_hat - eps*)^2, the K&G weighting w * p (how diffusers,
k-diffusion and EDM write their losses).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

import fastdiff
from fastdiff.diffusion.density import Density, get_density, histogram
from fastdiff.diffusion.parameterization import get_parameterization
from fastdiff.diffusion.processes import _bcast, get_process
from fastdiff.diffusion.weighting import get_weighting
from fastdiff.nn.unet import NULL_CLASS

__all__ = ["Objective", "make_objective", "OBJECTIVES"]

OBJECTIVES = ("dsm", "stf")


class Objective(nn.Module):
    """A training objective; see make_objective. Holds the weighting and density as
    submodules, so state_dict/load_state_dict carry the learned weighting and the
    adaptive density's state, and obj.parameters() holds what must be trained
    with the network (EDM2's learned weighting)."""

    def __init__(self, objective: str = "stf", process="edm", param="edm", weighting="edm",
                 density="lognormal", sigma_data: float = 0.5, *, stf_precision: str = "highest",
                 stf_backend: str = "auto", loss_backend: str = "auto", process_kwargs: dict | None = None,
                 param_kwargs: dict | None = None, weighting_kwargs: dict | None = None,
                 density_kwargs: dict | None = None, stf_target_fn=None, importance_weighted: bool = True):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        # bool is an int to Python (True would pass as 1.0); inf and nan make every loss NaN, and so
        # does a value whose square (or 1 / square, EDM's weight) leaves float32's range.
        if isinstance(sigma_data, bool) or not isinstance(sigma_data, numbers.Real) or \
                not (1e-18 <= sigma_data <= 1e18):
            raise ValueError(f"sigma_data must be a positive finite number within [1e-18, 1e18], got {sigma_data!r}")
        self.objective = objective
        self.sigma_data = float(sigma_data)
        pk = dict(process_kwargs or {})
        if process == "edm":
            pk.setdefault("sigma_data", self.sigma_data)
        self.process = get_process(process, **pk)
        self.param = get_parameterization(param, process=self.process, sigma_data=self.sigma_data,
                                          **(param_kwargs or {}))
        self.weighting = get_weighting(weighting, sigma_data=self.sigma_data, **(weighting_kwargs or {}))
        self.density = get_density(density, self.process, **(density_kwargs or {}))
        if isinstance(density, Density) and (density.lam_min, density.lam_max) != \
                (self.process.lam_min, self.process.lam_max):
            raise ValueError("density was built for a different process (its lam range differs)")
        self.stf_precision, self.stf_backend, self.loss_backend = stf_precision, stf_backend, loss_backend
        if not isinstance(importance_weighted, bool):
            raise ValueError(f"importance_weighted must be True or False, got {importance_weighted!r}")
        if not importance_weighted and getattr(self.density, "adaptive", False):
            raise ValueError("importance_weighted=False makes the density part of the objective, so an adaptive "
                             "density would change what is trained; use importance_weighted=True with it")
        # True: per-sample weight w / p (K&G; p changes only the variance). False: w alone, the
        # convention of diffusers, k-diffusion and EDM (their K&G weighting is w * p).
        self.importance_weighted = importance_weighted
        # Computes the STF target in place of fastdiff.stf_target (same signature), e.g.
        # partial(fastdiff.distributed.stf_target_sharded, group=...) when ref is this rank's shard.
        self.stf_target_fn = stf_target_fn

    def extra_repr(self):
        return f"objective={self.objective!r}, process={self.process!r}, param={self.param!r}"

    # ------------------------------------------------------------------ training step
    def forward(self, net, y: torch.Tensor, extra_ref: torch.Tensor | None = None,
                generator: torch.Generator | None = None, *, lam: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, ref: torch.Tensor | None = None,
                ref_logw: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None, n_uncond: int = 0):
        """Returns (loss, stats) for the clean batch y (B, *S).

        STF's reference batch is cat([y, extra_ref]), or ref as given (fastdiff.refsets: the
        whole set, or neighbours plus weighted draws), with ref_logw its rows' log-weights.
        Class-conditional training: labels (B,) go to the network (net(x, c_noise, labels)) and,
        with ref_labels, to the STF target; the first n_uncond rows are label dropout's: the
        network sees NULL_CLASS and their target averages over every class (a second op call
        on those rows: both calls together cost one).

        lam (B,) and noise (y's shape), when given, replace the draws from the density and
        the standard normal: to evaluate the loss at chosen noise levels, or on another
        library's draws (tests/test_loss_equivalents.py).

        stats (detached, on y's device, no host sync):
          per_sample (B,)  each sample's term of the loss (loss = its mean)
          lam, sigma (B,)  log-SNR and VE noise level
          weight (B,)      the weight on mean_d (F - F*)^2: w/p (c_out/sigma)^2 [e^-u]
                           (w (c_out/sigma)^2 [e^-u] with importance_weighted=False)
          w, log_p (B,)    the weighting and the density's log p(lam)
          eps_loss (B,)    unweighted mean_d (eps_hat - eps*)^2
          integrand (B,)   w(lam) [e^-u] eps_loss: what the adaptive density tracks
        """
        if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() < 2:
            raise ValueError(f"y must be a floating tensor of shape (B, *S), got "
                             f"{getattr(y, 'shape', type(y).__name__)}")
        B, dev, dt = y.shape[0], y.device, y.dtype
        if not 0 <= n_uncond <= B or (n_uncond and labels is None):
            raise ValueError(f"n_uncond must be in [0, {B}] and needs labels, got {n_uncond}")
        if labels is not None and self.objective == "stf" and ref_labels is None:
            raise ValueError("labels given without ref_labels: a class-conditional STF target needs both")
        if self.objective == "stf" and ref is not None:
            if extra_ref is not None:
                raise ValueError("give STF's reference rows as ref or as extra_ref (beside y), not both")
            if not isinstance(ref, torch.Tensor) or tuple(ref.shape[1:]) != tuple(y.shape[1:]):
                raise ValueError(f"ref must have shape (N, {', '.join(map(str, y.shape[1:]))}) to match y "
                                 f"{tuple(y.shape)}; got {tuple(getattr(ref, 'shape', ()))}")
            ref = ref.to(dt)
        elif self.objective == "stf":
            ref = y
            if extra_ref is not None:
                if not isinstance(extra_ref, torch.Tensor) or tuple(extra_ref.shape[1:]) != tuple(y.shape[1:]):
                    raise ValueError(f"extra_ref must have shape (M, {', '.join(map(str, y.shape[1:]))}) to "
                                     f"match y {tuple(y.shape)}; got {tuple(getattr(extra_ref, 'shape', ()))}")
                if extra_ref.device != dev:
                    raise ValueError(f"extra_ref is on {extra_ref.device} but y is on {dev}")
                ref = torch.cat([y, extra_ref.to(dt)])
        elif extra_ref is not None or ref is not None or ref_logw is not None:
            raise ValueError("extra_ref, ref and ref_logw are only used by the 'stf' objective")

        if lam is None:
            lam64, logp64 = self.density.sample(B, generator=generator, device=dev, return_log_prob=True)
        else:
            if not isinstance(lam, torch.Tensor) or not lam.is_floating_point() or tuple(lam.shape) != (B,):
                raise ValueError(f"lam must be a floating tensor of shape ({B},), got "
                                 f"{getattr(lam, 'shape', type(lam).__name__)}")
            lam64 = lam.to(dev, torch.float64)
            self.process.t_of_lambda(lam64)           # raises if lam leaves the process's range
            logp64 = self.density.log_prob(lam64)
        sigma64 = torch.exp(-0.5 * lam64)
        w64 = self.weighting(lam64)
        c_skip, c_out, c_in, c_noise = self.param.precond(sigma64)
        weight64 = (w64 * torch.exp(-logp64) if self.importance_weighted else w64) * (c_out / sigma64) ** 2

        sigma = sigma64.to(dt)
        if noise is None:
            noise = torch.randn(y.shape, generator=generator, device=dev, dtype=dt)
        elif isinstance(noise, torch.Tensor) and noise.shape == y.shape and noise.device == dev:
            noise = noise.to(dt)
        else:
            raise ValueError(f"noise must be a tensor of y's shape {tuple(y.shape)} on {dev}, got "
                             f"{getattr(noise, 'shape', type(noise).__name__)}")
        x = y + _bcast(sigma, y) * noise
        if self.objective == "stf":
            target_fn = self.stf_target_fn or fastdiff.stf_target
            kw = dict(precision=self.stf_precision, backend=self.stf_backend)
            if ref_logw is not None:
                kw["ref_logw"] = ref_logw
            if labels is None:
                target = target_fn(x, sigma, ref, **kw)
            else:
                k = n_uncond
                parts = [target_fn(x[:k], sigma[:k], ref, **kw)] if k else []
                if k < B:
                    parts.append(target_fn(x[k:], sigma[k:], ref, labels=labels[k:], ref_labels=ref_labels, **kw))
                target = torch.cat(parts) if len(parts) > 1 else parts[0]
        else:
            target = y
        if labels is None:
            F = net(_bcast(c_in, x) * x, c_noise.to(dt))
        else:
            if n_uncond:
                labels = torch.cat([torch.full_like(labels[:n_uncond], NULL_CLASS), labels[n_uncond:]])
            F = net(_bcast(c_in, x) * x, c_noise.to(dt), labels)
        if not isinstance(F, torch.Tensor) or F.shape != y.shape:
            raise ValueError(f"net output must have y's shape {tuple(y.shape)}, got {tuple(getattr(F, 'shape', ()))}")
        F_target = ((target - _bcast(c_skip, x) * x) / _bcast(c_out, x)).detach()

        sdt = torch.float64 if dt == torch.float64 else torch.float32     # stats and weight dtype
        u = None
        if getattr(self.weighting, "learned", False):
            u = self.weighting.logvar(lam64.to(torch.float32))
            weight64 = weight64 * torch.exp(-u.detach().to(torch.float64))
        weight = weight64.to(sdt)
        loss = fastdiff.weighted_mse(F, F_target, weight, backend=self.loss_backend)
        with torch.no_grad():
            mse = (F.detach().to(sdt) - F_target.to(sdt)).pow(2).flatten(1).mean(1)
            per_sample = weight * mse
            eps_loss = ((c_out / sigma64) ** 2).to(sdt) * mse
            integrand = w64.to(sdt) * eps_loss
        if u is not None:
            eu = torch.exp(-u)
            base = (per_sample * torch.exp(u.detach().to(sdt))).to(eu.dtype)    # w/p (c_out/sigma)^2 mse
            # value: + mean(u); gradient w.r.t. u: d/du (base e^-u + u). F's part is in loss.
            loss = loss + u.mean() + ((eu - eu.detach()) * base).mean()
            with torch.no_grad():
                per_sample = per_sample + u.detach().to(sdt)
                integrand = integrand * eu.detach().to(sdt)
        stats = {"per_sample": per_sample, "lam": lam64.to(sdt), "sigma": sigma64.to(sdt),
                 "weight": weight.detach(), "w": w64.to(sdt).detach(), "log_p": logp64.to(sdt),
                 "eps_loss": eps_loss, "integrand": integrand}
        return loss, stats

    # ------------------------------------------------------------------ helpers
    def update_density(self, stats: dict) -> None:
        """Feeds a step's stats to the adaptive density (no-op for fixed densities)."""
        if getattr(self.density, "adaptive", False):
            self.density.update(stats["lam"], stats["integrand"])

    def denoiser(self, net):
        """D(x_ve, sigma) -> x0 estimate (VE form; sigma a float or (B,) tensor), for samplers."""
        param = self.param

        def D(x_ve: torch.Tensor, sigma) -> torch.Tensor:
            return param.denoise(net, x_ve, sigma)

        D.sigma_min, D.sigma_max = self.process.sigma_min, self.process.sigma_max
        return D

    def loss_per_bin(self, stats: dict, bins: int = 16, key: str = "per_sample"):
        """(sums, counts) of stats[key] over equal lam-bins of the process's range, on device."""
        return histogram(stats["lam"], stats[key], self.process.lam_min, self.process.lam_max, bins)

    def bin_edges(self, bins: int = 16) -> torch.Tensor:
        return torch.linspace(self.process.lam_min, self.process.lam_max, bins + 1, dtype=torch.float64)


def make_objective(objective: str = "stf", process="edm", param="edm", weighting="edm",
                   density="lognormal", sigma_data: float = 0.5, **options) -> Objective:
    """Builds a training objective (a torch.nn.Module).

    Args:
        objective: "stf" or "dsm".
        process: "ve" | "vp" | "vp_cosine" | "edm" or a Process.
        param: "eps" | "x0" | "v" | "score" | "edm" | "vp" | "ve" | "iddpm" or a Parameterization.
        weighting: "elbo" (= "uniform" = "eps_mse") | "x0_mse" | "v_mse" | "score_mse" (old name
            "snr") | "karras" | "edm" | "min_snr" | "soft_min_snr" | "sigmoid" | "edm_monotone" |
            "learned" or a Weighting (see fastdiff.diffusion.weighting).
        density: "uniform" | "uniform_lambda" | "lognormal" | "logit_normal" | "cosine" |
            "cosine_interpolated" | "adaptive" or a Density.
        sigma_data: data std used by the EDM process, preconditioning and weightings.
        options: stf_precision, stf_backend (for fastdiff.stf_target), loss_backend
            (for fastdiff.weighted_mse), process_kwargs, param_kwargs, weighting_kwargs,
            density_kwargs (dicts of the components' parameters, e.g.
            density_kwargs={"P_mean": -1.2, "P_std": 1.2}, weighting_kwargs={"b": 2.0}),
            stf_target_fn (called as fastdiff.stf_target is, in its place: e.g.
            fastdiff.distributed.stf_target_sharded when extra_ref is this rank's shard of a
            reference batch spread over processes), importance_weighted (default True: the
            per-sample weight is w(lam) / p(lam), so the density changes only the variance;
            False: w(lam) alone, as diffusers, k-diffusion and EDM weight their losses, so the
            density is part of the objective; the README's "The same loss as ..." table).
    """
    allowed = {"stf_precision", "stf_backend", "loss_backend", "process_kwargs", "param_kwargs",
               "weighting_kwargs", "density_kwargs", "stf_target_fn", "importance_weighted"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; expected some of {sorted(allowed)}")
    return Objective(objective, process, param, weighting, density, sigma_data, **options)
