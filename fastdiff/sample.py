"""Write samples of a trained model for FID tools: `python -m fastdiff.sample --ckpt RUN --n 50000 --out DIR`.

PNGs DIR/000000.png ... (e.g. clean-fid's compute_fid(DIR, ...)), or with `--format npz`
(or an --out ending in .npz) one array file, uint8 (N, H, W, C) under "arr_0" as the
guided-diffusion / ADM evaluator reads it (vector data: float32 (N, D)).

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


class UsageError(Exception):
    """A bad option value: one line, exit 2."""


def _class_labels(args, classes: int):
    """The class of every sample from --class (None: the default for the model), checked against the model."""
    from fastdiff.nn import NULL_CLASS
    if not classes:
        if args.class_label is not None or args.guidance != 1.0:
            raise UsageError("--class and --guidance need a class-conditional model (trained with --cond)")
        return None
    if not (args.guidance == args.guidance and abs(args.guidance) != float("inf")):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    if args.class_label is None:
        return None
    if args.class_label == "null":
        return torch.full((args.n,), NULL_CLASS, dtype=torch.long)
    try:
        c = int(args.class_label)
    except ValueError:
        c = -2
    if not 0 <= c < classes:
        raise UsageError(f"--class must be an index in [0, {classes}) or 'null' for this model, got "
                         f"{args.class_label!r}")
    return torch.full((args.n,), c, dtype=torch.long)


def parse_device(text: str | None) -> torch.device:
    """cpu or cuda[:N], checked to exist here."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device must be cpu or cuda[:N], got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UsageError(f"--device must be cpu or cuda[:N], got {text!r}")
    return device


def check_output(args) -> str:
    """The output format; raises UsageError for an --out or --grid that cannot be written (before sampling)."""
    fmt = args.format or ("npz" if args.out.endswith(".npz") else "png")
    if fmt == "npz":
        if not args.out.endswith(".npz"):
            raise UsageError(f"--out must name a .npz file with --format npz, got {args.out!r}")
        if os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a directory; --format npz writes one .npz file")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise UsageError(f"--out {args.out}: directory {parent} does not exist")
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; --format png writes a directory of PNGs "
                         f"(for one array file use --format npz with an --out ending in .npz)")
    else:
        ancestor = os.path.dirname(os.path.abspath(args.out))
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise UsageError(f"--out {args.out}: {ancestor} is a file, not a directory")
    if args.grid is not None:
        parent = os.path.dirname(os.path.abspath(args.grid))
        if os.path.isdir(args.grid):
            raise UsageError(f"--grid {args.grid} is a directory; give a file name such as grid.png")
        if not os.path.isdir(parent):
            raise UsageError(f"--grid {args.grid}: directory {parent} does not exist")
    return fmt


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    # A redirected log gets an update every 30 s instead of a stream of carriage returns.
    return tqdm(total=total, unit="img", desc="sampling", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 30.0)


def main(argv=None) -> int:
    from fastdiff import checkpoint as ckpt_io
    from fastdiff.train import ConfigError, load_for_sampling

    p = argparse.ArgumentParser(prog="python -m fastdiff.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file or run directory (its newest checkpoint)")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", required=True, help="output: a directory for 000000.png, ... or a file.npz")
    p.add_argument("--format", choices=["png", "npz"], default=None,
                   help="png: one file per sample; npz: one uint8 NHWC array under 'arr_0' "
                        "(default: npz if --out ends in .npz, else png)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples per sampler call (default: 500 on CUDA, 64 on the CPU)")
    p.add_argument("--sampler", default="heun", choices=list(SAMPLERS), metavar="SAMPLER",
                   help=f"one of {', '.join(SAMPLERS)} (default: heun)")
    p.add_argument("--steps", type=int, default=18,
                   help="noise levels of the schedule (EDM's num_steps; heun makes 2 * steps - 1 "
                        "network calls per sample; default: 18)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: torch's default)")
    p.add_argument("--class", dest="class_label", default=None,
                   help="a class-conditional model (--cond): sample this class (an index), or 'null' for the "
                        "unconditional model; default: classes 0, 1, ... in turn")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance weight: 1 the conditional model, 0 the unconditional, > 1 guided")
    p.add_argument("--grid", default=None, help="also write the first 64 samples as one grid PNG here")
    args = p.parse_args(argv)
    try:
        for name in ("n", "steps"):
            if getattr(args, name) <= 0:
                raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
        if args.batch is not None and args.batch <= 0:
            raise UsageError(f"--batch must be a positive integer, got {args.batch}")
        if args.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
        device = parse_device(args.device)
        fmt = check_output(args)
        cfg, net, obj = load_for_sampling(args.ckpt, device)
        class_labels = _class_labels(args, getattr(net, "num_classes", 0))
    except (UsageError, ckpt_io.CheckpointError, ConfigError) as e:
        print(f"fastdiff.sample: error: {e}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    batch = args.batch or (500 if device.type == "cuda" else 64)
    if fmt == "png":
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            print(f"fastdiff.sample: error: --out {args.out}: {e.strerror}", file=sys.stderr)
            return 2
    try:
        done = _write_samples(args, fmt, obj, net, device, batch, class_labels)
    except OSError as e:       # a full disk, a vanished directory: one line, not a traceback
        where = e.filename or args.out
        print(f"fastdiff.sample: error: cannot write {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {done} samples to {args.out}")
    return 0


def _write_samples(args, fmt: str, obj, net, device, batch: int, class_labels) -> int:
    """Draw args.n samples and write them as fmt; the number written."""
    from fastdiff.eval import save_grid, write_pngs
    from fastdiff.eval.images import to_uint8
    from fastdiff.train import generate

    arrays, done = [], 0
    with _progress_bar(args.n) as bar:
        for samples in generate(obj, net, net.img_shape, args.n, seed=args.seed, steps=args.steps, device=device,
                                batch=batch, sampler=args.sampler, progress=False, class_labels=class_labels,
                                guidance=args.guidance):
            if fmt == "npz":
                arrays.append(samples.float().numpy() if samples.dim() == 2 else to_uint8(samples))
            elif samples.dim() == 2:
                torch.save(samples, os.path.join(args.out, f"samples-{done:06d}.pt"))
            else:
                write_pngs(samples, args.out, start=done)
            if args.grid and done == 0:
                save_grid(samples[:64], args.grid)
            done += len(samples)
            bar.update(len(samples))
    if fmt == "npz":
        _save_npz(args.out, arrays)
    return done


def _save_npz(path: str, arrays) -> None:
    """One array under "arr_0", written atomically (a reader never sees a partial file)."""
    import numpy as np

    tmp = f"{path}.tmp-{os.getpid()}.npz"
    try:
        np.savez(tmp, arr_0=np.concatenate(arrays))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return _sample(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
