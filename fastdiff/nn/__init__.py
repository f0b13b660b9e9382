"""Networks: `net(x, c_noise[, class_labels]) -> F`, F with x's shape; `net.img_shape` without the batch dim.

`build_net(model, preset, img_shape, num_classes=0)` builds one from a named size preset; with
num_classes > 0 it takes class labels (NULL_CLASS: the unconditional model). `Guided` wraps one
for classifier-free guidance.
"""
from __future__ import annotations

import torch
from torch import nn

from fastdiff.nn.mlp import MLP
from fastdiff.nn.unet import NULL_CLASS, SongUNet

# Size presets. "ddpmpp-cifar" is EDM's DDPM++ CIFAR-10 network (55.7M params at 32x32).
UNET_PRESETS = {
    "tiny": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0),
    "small": dict(model_channels=32, channel_mult=(1, 2), num_blocks=2, attn_resolutions=(4,), dropout=0.0),
    "medium": dict(model_channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,), dropout=0.10),
    "ddpmpp-cifar": dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                         dropout=0.10),
}
MLP_PRESETS = {
    "tiny": dict(hidden=32, depth=1),
    "small": dict(hidden=128, depth=2),
    "medium": dict(hidden=256, depth=3),
    "ddpmpp-cifar": dict(hidden=1024, depth=6),
}
MODELS = ("unet", "mlp")


def build_net(model: str, preset: str, img_shape: tuple, num_classes: int = 0):
    if model == "unet":
        if preset not in UNET_PRESETS:
            raise ValueError(f"--preset must be one of {sorted(UNET_PRESETS)}, got {preset!r}")
        if len(img_shape) != 3 or img_shape[1] != img_shape[2]:
            raise ValueError(f"--model unet needs square images (C, H, H); the data has shape {tuple(img_shape)}"
                             f" (use --model mlp for vector data)")
        return SongUNet(img_shape[1], img_shape[0], **UNET_PRESETS[preset], num_classes=num_classes)
    if model == "mlp":
        if preset not in MLP_PRESETS:
            raise ValueError(f"--preset must be one of {sorted(MLP_PRESETS)}, got {preset!r}")
        if len(img_shape) != 1:
            raise ValueError(f"--model mlp needs vector data (D,); the data has shape {tuple(img_shape)}")
        return MLP(img_shape[0], **MLP_PRESETS[preset], num_classes=num_classes)
    raise ValueError(f"--model must be one of {list(MODELS)}, got {model!r}")


class Guided(nn.Module):
    """Classifier-free guidance (Ho & Salimans, 2022) around a class-conditional net:

        F = F(x; null) + guidance * (F(x; c) - F(x; null))

    guidance = 1 is the conditional model, 0 the unconditional one, > 1 guided (EDM2's
    convention). Every parameterization's denoiser is c_skip x + c_out F, affine in F,
    so guiding F guides the denoiser D(x; sigma) exactly alike. Both models run as one
    batch of 2B rows. class_labels (B,): the class of each row (NULL_CLASS: unconditional).
    """

    def __init__(self, net: nn.Module, class_labels: torch.Tensor, guidance: float = 1.0):
        super().__init__()
        if not getattr(net, "num_classes", 0):
            raise ValueError("classifier-free guidance needs a class-conditional network (trained with --cond)")
        if not isinstance(class_labels, torch.Tensor) or class_labels.dim() != 1:
            raise ValueError(f"class_labels must be a 1-D integer tensor, got {getattr(class_labels, 'shape', class_labels)}")
        bad = class_labels[(class_labels != NULL_CLASS) & ((class_labels < 0) | (class_labels >= net.num_classes))]
        if len(bad):
            raise ValueError(f"class labels must lie in [0, {net.num_classes}) (or be NULL_CLASS = {NULL_CLASS}); "
                             f"got {bad[0].item()}")
        if not (isinstance(guidance, (int, float)) and guidance == guidance and abs(guidance) != float("inf")):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        self.net, self.guidance = net, float(guidance)
        self.register_buffer("class_labels", class_labels.long(), persistent=False)
        self.img_shape, self.num_classes = net.img_shape, 0

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c = self.class_labels.to(x.device)
        if len(c) != len(x):
            raise ValueError(f"Guided holds {len(c)} class labels but got {len(x)} rows")
        if self.guidance == 1.0:
            return self.net(x, c_noise, c)
        null = torch.full_like(c, NULL_CLASS)
        both = self.net(torch.cat([x, x]), torch.cat([c_noise, c_noise]), torch.cat([c, null]))
        cond, uncond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)


__all__ = ["MLP", "SongUNet", "Guided", "NULL_CLASS", "build_net", "UNET_PRESETS", "MLP_PRESETS", "MODELS"]
