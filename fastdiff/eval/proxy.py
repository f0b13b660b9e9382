"""A fast FID proxy: Frechet distance in the features of a small classifier
trained on the same data (the digits' labels, or, without labels, a
self-supervised stand-in: the classifier learns to tell real images from
noised ones). Cheap enough to run every few thousand steps on a CPU; its
values are comparable within one data set, not with published FIDs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProxyFeatures(nn.Module):
    """images in [-1, 1] (N, C, H, W) -> (N, features) penultimate-layer activations."""

    def __init__(self, channels: int, classes: int = 10, width: int = 32, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, features), nn.SiLU())
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.float())


def train_proxy(images: torch.Tensor, labels: torch.Tensor | None = None, *, steps: int = 300, batch: int = 128,
                seed: int = 0) -> ProxyFeatures:
    """Train the proxy classifier on CPU-sized data; deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classes = int(labels.max()) + 1 if labels is not None else 2
        net = ProxyFeatures(images.shape[1], classes)
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(steps):
            idx = torch.randint(len(images), (batch,), generator=gen)
            x = images[idx].float()
            if labels is not None:
                y = labels[idx]
            else:
                y = torch.randint(2, (batch,), generator=gen)
                noise = torch.randn(x.shape, generator=gen) * torch.rand(batch, 1, 1, 1, generator=gen)
                x = torch.where(y[:, None, None, None] == 1, x + noise, x)
            loss = F.cross_entropy(net.head(net(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


def digits_labels() -> torch.Tensor:
    from sklearn.datasets import load_digits
    return torch.from_numpy(load_digits().target).long()
