"""A residual MLP for vector data (e.g. the GMM toy problems)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn.unet import PositionalEmbedding, class_embedding, with_class


class MLP(nn.Module):
    """net(x, c_noise, class_labels=None) -> F with x (B, D), c_noise (B,); class_labels as for SongUNet."""

    def __init__(self, dim: int, *, hidden: int = 256, depth: int = 3, emb_channels: int = 64, num_classes: int = 0):
        super().__init__()
        self.img_shape = (dim,)
        self.num_classes = num_classes
        self.map_noise = PositionalEmbedding(emb_channels)
        self.map_label = class_embedding(num_classes, emb_channels)
        self.map_emb = nn.Linear(emb_channels, hidden)
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.SiLU(),
                                                  nn.Linear(2 * hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = with_class(self.map_noise(c_noise), self.map_label, class_labels)
        h = self.inp(x) + self.map_emb(F.silu(emb)).to(x.dtype)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
