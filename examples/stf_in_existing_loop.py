"""Use fastdiff's exact STF target inside an existing training loop.

The Stable Target Field replaces the DSM regression target y (the clean
sample) with the self-normalized posterior mean over a reference batch that
contains y. Everything else in your loop stays. fastdiff.stf_target works in
VE form (x = y + sigma * n); other parameterizations convert by scaling.

Three drop-in versions, one per code base's conventions:

    EDM          training/loss.py, EDMLoss.__call__          -> edm_stf_loss
    k-diffusion  k_diffusion/layers.py, Denoiser.loss        -> kdiffusion_stf_loss
    diffusers    DDPMScheduler + epsilon-prediction UNet     -> diffusers_stf_eps_target

`ref` holds further clean samples (the paper uses a 4096-row reference batch:
the mini-batch plus 4096 - B rows drawn uniformly from the data set, with the
same augmentation). Run this file for a few EDM-style steps on the digits.
"""
import torch

import fastdiff


def edm_stf_loss(net, images, ref, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
    """EDMLoss with the STF target; net(x, sigma) is EDM's preconditioned denoiser D(x; sigma)."""
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1], device=images.device)
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    x = images + torch.randn_like(images) * sigma
    target = fastdiff.stf_target(x, sigma.flatten(), torch.cat([images, ref]))      # EDM: target = images
    D = net(x, sigma.flatten())
    return weight * (D - target) ** 2


def kdiffusion_stf_loss(inner_model, input, noise, sigma, ref, sigma_data=0.5):
    """k-diffusion's Denoiser.loss with the STF target (c_skip/c_out/c_in as in k-diffusion)."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5
    c_in = 1 / (sigma ** 2 + sigma_data ** 2) ** 0.5
    c_skip, c_out, c_in = (c.view(-1, *[1] * (input.dim() - 1)) for c in (c_skip, c_out, c_in))
    noised_input = input + noise * sigma.view(-1, *[1] * (input.dim() - 1))
    model_output = inner_model(noised_input * c_in, sigma)
    clean = fastdiff.stf_target(noised_input, sigma, torch.cat([input, ref]))       # k-diffusion: input
    target = (clean - c_skip * noised_input) / c_out
    return (model_output - target).pow(2).flatten(1).mean(1)


def diffusers_stf_eps_target(noisy_images, timesteps, clean_images, ref, alphas_cumprod):
    """The epsilon target for a diffusers-style loop (noisy = sqrt(a) y + sqrt(1 - a) eps):
    use it in place of `noise` in F.mse_loss(model(noisy, t).sample, noise)."""
    a = alphas_cumprod.to(noisy_images.device)[timesteps].to(torch.float32)
    alpha, sigma_ve = a.sqrt(), ((1 - a) / a).sqrt()
    view = (-1, *[1] * (noisy_images.dim() - 1))
    x_ve = noisy_images / alpha.view(view)                                         # VE form: y + sigma_ve eps
    clean = fastdiff.stf_target(x_ve, sigma_ve, torch.cat([clean_images, ref]))
    return ((x_ve - clean) / sigma_ve.view(view)).to(noisy_images.dtype)


def demo(steps=5, batch=32, ref_size=256, seed=0):
    """A few steps of an EDM-style loop on the digits with the STF loss; returns the losses."""
    from fastdiff.data import Sampler, load_dataset
    from fastdiff.nn import build_net
    torch.manual_seed(seed)
    data = load_dataset("digits")
    net = build_net("unet", "tiny", data.shape)

    def D(x, sigma):                   # EDM's preconditioning (sigma_data = 0.5)
        s = sigma.view(-1, 1, 1, 1)
        return 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * net(x / (s ** 2 + 0.25).sqrt(),
                                                                                   sigma.log() / 4)

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sampler, losses = Sampler(len(data), batch, seed), []
    for _ in range(steps):
        images = data.get(sampler.next_batch()[0])
        ref = data.get(sampler.ref_rows(ref_size - batch)[0])
        loss = edm_stf_loss(D, images, ref).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    print(demo())
