"""Images in [-1, 1] to PNG files: one file per sample, or one grid."""
from __future__ import annotations

import math
import os

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_pngs(images: torch.Tensor, out_dir: str, start: int = 0) -> None:
    from PIL import Image
    os.makedirs(out_dir, exist_ok=True)
    for i, a in enumerate(to_uint8(images)):
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(os.path.join(out_dir, f"{start + i:06d}.png"))


def save_grid(samples: torch.Tensor, path: str, min_size: int = 384) -> None:
    """A square grid of images (nearest-upscaled so small images stay visible), or a
    2-D histogram of the first two coordinates for vector data."""
    from PIL import Image
    if samples.dim() == 2:
        xy = samples[:, :2].float().cpu().numpy() if samples.shape[1] >= 2 else \
            np.stack([samples[:, 0].cpu().numpy(), np.zeros(len(samples))], 1)
        hist, _, _ = np.histogram2d(xy[:, 1], xy[:, 0], bins=128, range=[[-2, 2], [-2, 2]])
        img = (255 * (1 - np.clip(hist / max(hist.max(), 1) * 4, 0, 1))).astype(np.uint8)[::-1]
        Image.fromarray(img).resize((min_size, min_size), Image.NEAREST).save(path)
        return
    u8 = to_uint8(samples)
    n, h, w, c = u8.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 64, np.uint8)
    for i, a in enumerate(u8):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = a
    scale = max(1, math.ceil(min_size / grid.shape[1]))
    img = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
