"""A DDPM++-style U-Net (Song et al., 2021), laid out as EDM's `SongUNet`.

The "ddpmpp-cifar" preset reproduces EDM's DDPM++ CIFAR-10 network
(model_channels=128, channel_mult=(2, 2, 2), 4 blocks per level, attention at
16x16, dropout 0.10): 55.7M parameters at 32x32. The small presets keep the
same structure at widths a CPU trains in minutes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
    nn.init.xavier_uniform_(conv.weight, gain=math.sqrt(init_scale) if init_scale > 0 else 1.0)
    if init_scale == 0:
        nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def _linear(cin: int, cout: int) -> nn.Linear:
    lin = nn.Linear(cin, cout)
    nn.init.xavier_uniform_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


NULL_CLASS = -1     # class label meaning "no class": the unconditional model of a class-conditional net


class ClassEmbedding(nn.Module):
    """Class labels (B,) -> (B, channels): a learned vector per class and one for NULL_CLASS
    (classifier-free guidance's unconditional model, trained by label dropout)."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, channels)     # the last row: NULL_CLASS

    def forward(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if class_labels is None:
            class_labels = torch.full((batch,), NULL_CLASS, dtype=torch.long, device=device)
        elif class_labels.shape != (batch,) or class_labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"class_labels must be an integer tensor of shape ({batch},), got "
                             f"{class_labels.dtype} {tuple(class_labels.shape)}")
        idx = torch.where(class_labels == NULL_CLASS, self.num_classes, class_labels)
        return self.table(idx)


def class_embedding(num_classes: int, channels: int) -> ClassEmbedding | None:
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    return ClassEmbedding(num_classes, channels) if num_classes else None


def with_class(emb: torch.Tensor, map_label: ClassEmbedding | None, class_labels) -> torch.Tensor:
    """emb (B, C) plus the class embedding (the null class's without labels); a net built without
    classes refuses labels."""
    if map_label is None:
        if class_labels is not None:
            raise ValueError("class_labels given to a network built without classes (num_classes=0)")
        return emb
    return emb + map_label(class_labels, emb.shape[0], emb.device)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of c_noise (EDM's PositionalEmbedding, endpoint=True)."""

    def __init__(self, channels: int, max_positions: int = 10000):
        super().__init__()
        half = channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        x = c_noise.float()[:, None] * self.freqs[None, :]
        return torch.cat([x.cos(), x.sin()], dim=1)


class UNetBlock(nn.Module):
    """Residual block with adaptive GroupNorm scale/shift from the embedding,
    optional 2x down/up sampling and optional self-attention."""

    def __init__(self, cin: int, cout: int, emb_channels: int, *, up: bool = False, down: bool = False,
                 attention: bool = False, dropout: float = 0.0, num_heads: int = 1, adaptive_scale: bool = False):
        super().__init__()
        self.up, self.down, self.adaptive_scale = up, down, adaptive_scale
        self.norm0 = _norm(cin)
        self.conv0 = _conv(cin, cout, 3)
        self.affine = _linear(emb_channels, 2 * cout if adaptive_scale else cout)
        self.norm1 = _norm(cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _conv(cout, cout, 3, init_scale=1e-5)
        self.skip = _conv(cin, cout, 1) if (cin != cout or up or down) else None
        self.num_heads = num_heads if attention else 0
        if attention:
            self.norm2 = _norm(cout)
            self.qkv = _conv(cout, 3 * cout, 1)
            self.proj = _conv(cout, cout, 1, init_scale=1e-5)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(self._resample(F.silu(self.norm0(x))))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(self.dropout(x))
        skip = self._resample(orig)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (x + skip) * math.sqrt(0.5)
        if self.num_heads:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            # With one head the reshape is a channels-last view; contiguous() keeps proj's weight
            # gradient in the weight's own layout (else DDP warns that grad strides mismatch).
            x = (x + self.proj(a.transpose(-1, -2).reshape(B, C, H, W).contiguous())) * math.sqrt(0.5)
        return x


class SongUNet(nn.Module):
    """net(x, c_noise, class_labels=None) -> F with x (B, C, H, W), c_noise (B,); class_labels (B,)
    int64 (NULL_CLASS for the unconditional model) when built with num_classes > 0."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None, *,
                 model_channels: int = 128, channel_mult=(2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.10,
                 num_heads: int = 1, adaptive_scale: bool = False, num_classes: int = 0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.num_classes = num_classes
        self.img_shape = (in_channels, img_resolution, img_resolution)
        if img_resolution % (2 ** (len(channel_mult) - 1)):
            raise ValueError(f"resolution {img_resolution} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult={tuple(channel_mult)})")
        emb_ch = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_ch, dropout=dropout, num_heads=num_heads, adaptive_scale=adaptive_scale)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_label = class_embedding(num_classes, model_channels)     # added to the noise embedding, as EDM
        self.map_layer0 = _linear(model_channels, emb_ch)
        self.map_layer1 = _linear(emb_ch, emb_ch)

        self.enc = nn.ModuleDict()
        cout, skips = in_channels, []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = _conv(cin, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(
                    idx == num_blocks and res in attn_resolutions), **block)
        self.out_norm = _norm(cout)
        self.out_conv = _conv(cout, out_channels, 3, init_scale=1e-5)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = with_class(self.map_noise(c_noise), self.map_label, class_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        h = x
        for name, layer in self.enc.items():
            h = layer(h) if name.endswith("_conv") else layer(h, emb)
            skips.append(h)
        for name, layer in self.dec.items():
            if "block" in name:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
