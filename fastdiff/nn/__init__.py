"""Networks: `net(x, c_noise) -> F`, F with x's shape; `net.img_shape` without the batch dim.

`build_net(model, preset, img_shape)` builds one from a named size preset.
"""
from __future__ import annotations

from fastdiff.nn.mlp import MLP
from fastdiff.nn.unet import SongUNet

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


def build_net(model: str, preset: str, img_shape: tuple):
    if model == "unet":
        if preset not in UNET_PRESETS:
            raise ValueError(f"--preset must be one of {sorted(UNET_PRESETS)}, got {preset!r}")
        if len(img_shape) != 3 or img_shape[1] != img_shape[2]:
            raise ValueError(f"--model unet needs square images (C, H, H); the data has shape {tuple(img_shape)}"
                             f" (use --model mlp for vector data)")
        return SongUNet(img_shape[1], img_shape[0], **UNET_PRESETS[preset])
    if model == "mlp":
        if preset not in MLP_PRESETS:
            raise ValueError(f"--preset must be one of {sorted(MLP_PRESETS)}, got {preset!r}")
        if len(img_shape) != 1:
            raise ValueError(f"--model mlp needs vector data (D,); the data has shape {tuple(img_shape)}")
        return MLP(img_shape[0], **MLP_PRESETS[preset])
    raise ValueError(f"--model must be one of {list(MODELS)}, got {model!r}")


__all__ = ["MLP", "SongUNet", "build_net", "UNET_PRESETS", "MLP_PRESETS", "MODELS"]
