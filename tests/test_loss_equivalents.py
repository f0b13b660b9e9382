"""Published diffusion losses as fastdiff (process, param, weighting, density) tuples.

Each reference loss is re-implemented here from its published formula (EDM's
training/loss.py and networks.py preconditionings, k-diffusion's Denoiser.loss with its
`weighting` options, diffusers' min-SNR-gamma recipe in train_text_to_image.py, Ho et
al.'s L_simple) and evaluated on the same network, clean batch, noise and noise level
as fastdiff's objective (Objective(..., lam=, noise=)); the per-sample losses must agree
up to the constant the README's table "The same loss as ..." states, in float64.
"""
import math

import pytest
import torch

from fastdiff.diffusion import get_process, make_objective

F64 = torch.float64
SHAPE = (11, 3, 5, 7)              # ragged D = 105
D_ELEMS = 3 * 5 * 7


class Net(torch.nn.Module):
    """A fixed random network F(x, c) conditioned on a per-row scalar c."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W1 = torch.randn(D_ELEMS, 32, generator=g, dtype=F64) / math.sqrt(D_ELEMS)
        self.b1 = torch.randn(32, generator=g, dtype=F64)
        self.W2 = torch.randn(32, D_ELEMS, generator=g, dtype=F64) / math.sqrt(32)

    def forward(self, x, c):
        h = torch.tanh(x.flatten(1) @ self.W1 + c.to(F64)[:, None] * self.b1)
        return (h @ self.W2).reshape(x.shape)


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    y = 0.5 * torch.randn(SHAPE, generator=g, dtype=F64)
    noise = torch.randn(SHAPE, generator=g, dtype=F64)
    u = torch.rand(SHAPE[0] - 2, generator=g, dtype=F64)
    return y, noise, torch.cat([torch.tensor([0.0, 1.0], dtype=F64), u])   # both ends of the range


def _col(v):
    return v.reshape(-1, *([1] * (len(SHAPE) - 1)))


def _fastdiff_per_sample(net, y, noise, sigma, **objective):
    obj = make_objective("dsm", **objective)
    _, stats = obj(net, y, lam=-2 * torch.log(sigma), noise=noise)
    return stats["per_sample"]


def _assert_ratio(ours, ref, const):
    assert bool(torch.isfinite(ref).all()) and bool((ref > 0).all())
    torch.testing.assert_close(ours / ref, torch.full_like(ref, const), rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- EDM (Karras et al. 2022)

def _karras_scalings(sigma, sd):
    # Karras et al. 2022, Table 1 (EDM's EDMPrecond, k-diffusion's Denoiser.get_scalings)
    s = _col(sigma)
    return sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt(), 1 / (s ** 2 + sd ** 2).sqrt()


def _edm_precond(net, x, sigma, sd):
    # EDMPrecond: D = c_skip x + c_out F(c_in x, log(sigma) / 4)
    c_skip, c_out, c_in = _karras_scalings(sigma, sd)
    return c_skip * x + c_out * net(c_in * x, sigma.log() / 4)


def _normal_cdf(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


@pytest.mark.parametrize("sd", [0.5, 1.3])
def test_edm_loss(sd):
    # EDMLoss: log sigma ~ N(P_mean, P_std^2), weight = (sigma^2 + sd^2) / (sigma sd)^2,
    # loss = weight (D - y)^2 summed over the elements by the training loop.
    P_mean, P_std = -1.2, 1.2
    net, (y, noise, u) = Net(), _case(1)
    sigma = 0.002 * (80 / 0.002) ** u
    D = _edm_precond(net, y + _col(sigma) * noise, sigma, sd)
    ref = ((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2 * (D - y).pow(2).flatten(1).sum(1))
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="edm", param="edm", weighting="edm",
                                density="lognormal", sigma_data=sd)
    # fastdiff restricts log sigma to [log 0.002, log 80]: its density is EDM's / mass
    mass = _normal_cdf((math.log(80) - P_mean) / P_std) - _normal_cdf((math.log(0.002) - P_mean) / P_std)
    _assert_ratio(ours, ref, mass / D_ELEMS)
    # the same per-sample loss, density left out of the weighting: k-diffusion's "karras" name
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="edm", param="edm", weighting="karras",
                                density="lognormal", sigma_data=sd, importance_weighted=False)
    _assert_ratio(ours, ref, 1 / D_ELEMS)


def test_edm_vp_loss():
    # VPLoss: t ~ U(eps_t, 1), sigma = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), weight = 1 / sigma^2;
    # VPPrecond: c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t.
    beta_d, beta_min, eps_t, M = 19.9, 0.1, 1e-5, 1000
    net, (y, noise, u) = Net(), _case(2)
    t = 1 + u * (eps_t - 1)
    sigma = (torch.exp(0.5 * beta_d * t ** 2 + beta_min * t) - 1).sqrt()
    x = y + _col(sigma) * noise
    D = x - _col(sigma) * net(x / _col(sigma ** 2 + 1).sqrt(), (M - 1) * t)
    ref = (D - y).pow(2).flatten(1).sum(1) / sigma ** 2
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="vp", param="vp", weighting="uniform",
                                density="uniform", importance_weighted=False)
    _assert_ratio(ours, ref, 1 / D_ELEMS)
    # and fastdiff's uniform-t density on "vp" is VPLoss's t ~ U(eps_t, 1)
    proc = get_process("vp")
    assert (proc.t_min, proc.t_max) == (eps_t, 1.0)


def test_edm_ve_loss():
    # VELoss: sigma = sigma_min (sigma_max / sigma_min)^u, weight = 1 / sigma^2;
    # VEPrecond: c_skip = 1, c_out = sigma, c_in = 1, c_noise = log(sigma / 2).
    sigma_min, sigma_max = 0.02, 100.0
    net, (y, noise, u) = Net(), _case(3)
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    x = y + _col(sigma) * noise
    D = x + _col(sigma) * net(x, torch.log(0.5 * sigma))
    ref = (D - y).pow(2).flatten(1).sum(1) / sigma ** 2
    # VELoss draws lam uniformly: it is the ELBO, and w / p = lam_max - lam_min
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="ve", param="ve", weighting="elbo", density="uniform")
    _assert_ratio(ours, ref, 2 * math.log(sigma_max / sigma_min) / D_ELEMS)
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="ve", param="ve", weighting="elbo",
                                density="uniform_lambda")
    _assert_ratio(ours, ref, 2 * math.log(sigma_max / sigma_min) / D_ELEMS)


# ----------------------------------------------------------------------------- k-diffusion

K_WEIGHTINGS = {
    # k-diffusion name: (its c_weight(sigma, sd) on the preconditioned loss, fastdiff's weighting)
    "karras": (lambda s, sd: torch.ones_like(s), "karras"),
    "soft-min-snr": (lambda s, sd: (s * sd) ** 2 / (s ** 2 + sd ** 2) ** 2, "soft_min_snr"),
    "snr": (lambda s, sd: sd ** 2 / (s ** 2 + sd ** 2), "eps_mse"),
}


def _k_diffusion_loss(net, y, noise, sigma, sd, c_weight):
    # Denoiser.loss: the inner model gets (c_in x, sigma) and embeds log(sigma) / 4;
    # loss = mean((F - (y - c_skip x) / c_out)^2) * c_weight(sigma), Karras et al.'s scalings.
    c_skip, c_out, c_in = _karras_scalings(sigma, sd)
    x = y + _col(sigma) * noise
    F = net(c_in * x, sigma.log() / 4)
    return (F - (y - c_skip * x) / c_out).pow(2).flatten(1).mean(1) * c_weight(sigma, sd)


@pytest.mark.parametrize("sd", [0.5, 1.0])
@pytest.mark.parametrize("k_name", sorted(K_WEIGHTINGS))
def test_k_diffusion_weightings(k_name, sd):
    c_weight, ours_name = K_WEIGHTINGS[k_name]
    net, (y, noise, u) = Net(), _case(4)
    sigma = 0.002 * (80 / 0.002) ** u
    ref = _k_diffusion_loss(net, y, noise, sigma, sd, c_weight)
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="edm", param="edm", weighting=ours_name,
                                density="lognormal", sigma_data=sd, importance_weighted=False)
    _assert_ratio(ours, ref, 1.0)


def test_old_snr_name_is_not_k_diffusion_snr():
    # fastdiff's "snr" (now "score_mse") is k-diffusion's "snr" times e^lam = SNR
    net, (y, noise, u) = Net(), _case(5)
    sigma = 0.002 * (80 / 0.002) ** u
    ref = _k_diffusion_loss(net, y, noise, sigma, 0.5, K_WEIGHTINGS["snr"][0])
    for name in ("snr", "score_mse"):
        ours = _fastdiff_per_sample(net, y, noise, sigma, process="edm", param="edm", weighting=name,
                                    density="lognormal", importance_weighted=False)
        torch.testing.assert_close(ours / ref, sigma ** -2, rtol=1e-10, atol=0)


# ----------------------------------------------------------------------------- diffusers, DDPM

def _alphas_cumprod(beta_schedule, T=1000):
    if beta_schedule == "linear":                    # DDPM (Ho et al. 2020)
        betas = torch.linspace(1e-4, 0.02, T, dtype=F64)
    else:                                            # Stable Diffusion's "scaled_linear"
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


def _discrete_case(seed, beta_schedule, t_hi=1000):
    y, noise, _ = _case(seed)
    g = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.tensor([0, t_hi - 1]), torch.randint(0, t_hi, (SHAPE[0] - 2,), generator=g)])
    abar = _alphas_cumprod(beta_schedule)[t]
    return y, noise, abar, ((1 - abar) / abar).sqrt()    # VE sigma of x_t = sqrt(abar) y + sqrt(1 - abar) eps


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_diffusers_min_snr(prediction, gamma):
    # train_text_to_image.py with --snr_gamma: snr = abar / (1 - abar),
    # weight = min(snr, gamma) / snr (epsilon) or / (snr + 1) (v_prediction), per-sample mean MSE.
    net, (y, noise, abar, sigma) = Net(), _discrete_case(6, "scaled_linear")
    noisy = _col(abar.sqrt()) * y + _col((1 - abar).sqrt()) * noise
    pred = net(noisy, sigma.log() / 4)          # diffusers' UNet gets t; fastdiff's raw params pass log(sigma) / 4
    if prediction == "epsilon":
        target = noise
    else:
        target = _col(abar.sqrt()) * noise - _col((1 - abar).sqrt()) * y
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr if prediction == "epsilon" else snr + 1)
    ref = (pred - target).pow(2).flatten(1).mean(1) * weight
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="vp", param="eps" if prediction == "epsilon" else "v",
                                weighting="min_snr", weighting_kwargs={"gamma": gamma}, density="uniform",
                                importance_weighted=False)
    _assert_ratio(ours, ref, 1.0)


def test_min_snr_importance_weighted_is_not_diffusers():
    # The default (importance-weighted) objective divides by p(lam): 1/p of uniform t on "vp"
    # ranges over orders of magnitude, so it is not diffusers' loss up to a constant.
    net, (y, noise, abar, sigma) = Net(), _discrete_case(7, "scaled_linear")
    kw = dict(process="vp", param="eps", weighting="min_snr", density="uniform")
    per_sample = _fastdiff_per_sample(net, y, noise, sigma, **kw, importance_weighted=False)
    iw = _fastdiff_per_sample(net, y, noise, sigma, **kw)
    log_p = make_objective("dsm", **kw).density.log_prob(-2 * sigma.log())
    torch.testing.assert_close(iw / per_sample, torch.exp(-log_p), rtol=1e-10, atol=0)
    assert float((iw / per_sample).max() / (iw / per_sample).min()) > 5


def test_ddpm_simple_loss():
    # Ho et al.'s L_simple: ||eps - eps_theta(sqrt(abar_t) y + sqrt(1 - abar_t) eps, t)||^2, t ~ U{1..T},
    # averaged over the elements. DDPM's linear betas 1e-4..0.02 are 1/1000 of "vp"'s
    # beta(t) = 0.1 + 19.9 t; its last steps (abar_999 = e^-10.12) lie past t_max = 1.
    net, (y, noise, abar, sigma) = Net(), _discrete_case(8, "linear", t_hi=990)
    noisy = _col(abar.sqrt()) * y + _col((1 - abar).sqrt()) * noise
    ref = (noise - net(noisy, sigma.log() / 4)).pow(2).flatten(1).mean(1)
    ours = _fastdiff_per_sample(net, y, noise, sigma, process="vp", param="eps", weighting="eps_mse",
                                density="uniform", importance_weighted=False)
    _assert_ratio(ours, ref, 1.0)


# ----------------------------------------------------------------------------- the objective's new arguments

def test_given_lam_and_noise_reproduce_the_draws():
    net, (y, _, _) = Net(), _case(9)
    obj = make_objective("dsm", process="vp", param="v", weighting="min_snr", density="logit_normal")
    loss, stats = obj(net, y, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.rand(SHAPE[0], generator=g, dtype=F64)                     # the density's draw
    noise = torch.randn(SHAPE, generator=g, dtype=F64)
    loss2, stats2 = obj(net, y, lam=stats["lam"], noise=noise)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats2["per_sample"], stats["per_sample"], rtol=1e-12, atol=0)
    torch.testing.assert_close(stats2["log_p"], stats["log_p"], rtol=1e-9, atol=0)


def test_bad_lam_noise_and_convention_raise():
    net, (y, noise, _) = Net(), _case(10)
    obj = make_objective("dsm", process="edm")
    lam = torch.zeros(SHAPE[0], dtype=F64)
    with pytest.raises(ValueError, match="lam must be a floating tensor of shape"):
        obj(net, y, lam=lam[:3], noise=noise)
    with pytest.raises(ValueError, match="lam out of range"):
        obj(net, y, lam=lam + 20, noise=noise)
    with pytest.raises(ValueError, match="noise must be a tensor of y's shape"):
        obj(net, y, lam=lam, noise=noise[:3])
    with pytest.raises(ValueError, match="importance_weighted must be True or False"):
        make_objective("dsm", importance_weighted=0)
    with pytest.raises(ValueError, match="adaptive density"):
        make_objective("dsm", density="adaptive", importance_weighted=False)
