"""Export a run's EMA weights: `python -m fastdiff.export --ckpt RUN --out FILE.safetensors`.

Writes the EMA network's state_dict (the weights samples are drawn from) with safetensors, and
as the file's metadata (strings) what rebuilds the network and its denoiser without the
trainer: "config" (the run's options, JSON), "data" (the data's shape, size and class count,
JSON), "step" and "checkpoint" (where the weights came from). Loading them back:

    import json
    from safetensors import safe_open
    from safetensors.torch import load_file
    from fastdiff.nn import build_net

    with safe_open("ema.safetensors", "pt") as f:
        meta = f.metadata()
    cfg, data = json.loads(meta["config"]), json.loads(meta["data"])
    net = build_net(cfg["model"], cfg["preset"], tuple(data["shape"]), num_classes=data.get("classes", 0))
    net.load_state_dict(load_file("ema.safetensors"))
"""
from __future__ import annotations

import argparse
import json
import os
import sys

FORMAT = "fastdiff-ema-1"


class ExportError(ValueError):
    pass


def metadata(state: dict, source: str) -> dict:
    """The safetensors metadata for a checkpoint's state (strings only, as the format requires)."""
    return {"format": FORMAT, "config": json.dumps(state["config"]), "data": json.dumps(state["data"]),
            "step": str(state["step"]), "checkpoint": os.path.basename(source)}


def export(ckpt: str, out: str) -> str:
    """Write the EMA weights of checkpoint file or run directory `ckpt` to `out`; returns the checkpoint used."""
    from fastdiff import checkpoint as ckpt_io
    try:
        from safetensors.torch import save
    except ImportError:
        raise ExportError("writing .safetensors needs safetensors: pip install safetensors") from None
    out_dir = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ExportError(f"--out {out} is a directory; give a file name, e.g. {os.path.join(out, 'ema.safetensors')}")
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out {out}: the directory {out_dir} does not exist")
    source, state = ckpt_io.load_newest(ckpt, "--ckpt")
    try:
        ema = state["ema"]
        meta = metadata(state, source)
    except (KeyError, TypeError) as e:
        raise ExportError(f"{source} lacks {e}: not a training checkpoint of fastdiff") from None
    # Own, contiguous copies: safetensors refuses tensors that share memory or have gaps.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ema.items()}
    ckpt_io.write_atomic(out, save(tensors, metadata=meta))
    return source


def main(argv=None) -> int:
    from fastdiff import checkpoint as ckpt_io
    p = argparse.ArgumentParser(prog="python -m fastdiff.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory (its newest checkpoint)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    args = p.parse_args(argv)
    try:
        source = export(args.ckpt, args.out)
    except (ExportError, ckpt_io.CheckpointError) as e:
        print(f"fastdiff.export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the EMA weights of {source} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
