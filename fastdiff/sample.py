"""Write samples of a trained model as PNGs: `python -m fastdiff.sample --ckpt RUN --n 50000 --out DIR`.

DIR/000000.png ... for external FID tools (e.g. clean-fid's compute_fid(DIR, ...)).

`fastdiff.sample` is also the sampling function (fastdiff.sampling.sample); this
module stays callable as that function, so `import fastdiff.sample` does not
shadow it.
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import torch

from fastdiff.sampling import SAMPLERS
from fastdiff.sampling import sample as _sample


def main(argv=None) -> int:
    from fastdiff import checkpoint as ckpt_io
    from fastdiff.eval import save_grid, write_pngs
    from fastdiff.train import ConfigError, generate, load_for_sampling

    p = argparse.ArgumentParser(prog="python -m fastdiff.sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory (its newest checkpoint)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", required=True, help="output directory for 000000.png, ...")
    p.add_argument("--batch", type=int, default=500, help="samples per sampler call")
    p.add_argument("--sampler", default="heun", choices=list(SAMPLERS), help="sampler")
    p.add_argument("--steps", type=int, default=18, help="sampler steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    p.add_argument("--grid", default=None, help="also write the first 64 samples as one grid PNG here")
    args = p.parse_args(argv)
    if args.n <= 0 or args.batch <= 0:
        p.error("--n and --batch must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        cfg, net, obj = load_for_sampling(args.ckpt, device)
    except (ckpt_io.CheckpointError, ConfigError) as e:
        print(f"fastdiff.sample: error: {e}", file=sys.stderr)
        return 2
    done = 0
    for batch in generate(obj, net, net.img_shape, args.n, seed=args.seed, steps=args.steps, device=device,
                          batch=args.batch, sampler=args.sampler, progress=False):
        if batch.dim() == 2:
            os.makedirs(args.out, exist_ok=True)
            torch.save(batch, os.path.join(args.out, f"samples-{done:06d}.pt"))
        else:
            write_pngs(batch, args.out, start=done)
        if args.grid and done == 0:
            save_grid(batch[:64], args.grid)
        done += len(batch)
        print(f"{done}/{args.n} samples", file=sys.stderr)
    print(f"wrote {done} samples to {args.out}")
    return 0


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
