"""Train a diffusion model: `python -m fastdiff.train [options]`.

With no options it trains an STF model on the 8x8 digits that ship with
scikit-learn, on the CPU, in a few minutes, and writes to ./runs/<name>/:
config.json, metrics.jsonl, checkpoint-*.pt, samples-*.png. At CIFAR-10 scale:

    torchrun --nproc_per_node=8 -m fastdiff.train --data cifar-10-batches-py \\
        --preset ddpmpp-cifar --batch 64 --ref-size 512 --kimg 200000 --xflip --precision bf16

Distributed STF. A row's reference batch is every rank's mini-batch and
uniform draws together (no gradient flows through it), so N = world * ref_size
grows with the number of GPUs (8 x 512 = 4096 above, the paper's size), every
row's own clean sample is in it, and the target stays exact. --ref-dist says
how the ranks share it:

  shard (default)   each rank keeps its rows; the objective calls
                    fastdiff.distributed.stf_target_sharded, which gathers the
                    W*B queries instead, computes partial targets against the
                    local rows and combines them by their float64 log-sum-exps
                    (~2 (W-1) B D values per rank): three collectives inside
                    the step (four with the value checks, which also read back
                    to the host; they are off under torch.compile).
  gather            each rank all-gathers the clean rows, (W-1) ref_size D
                    values per rank and step, before the step: two all-gathers
                    (batch, draws), independent of the model.

Measured on 2 CPU processes over gloo, B = 16, D = 3072, N/rank = 256..2048
(benchmarks/results/distributed-cpu-gloo.txt; NCCL across GPUs could not be
measured here), shard / gather time: 0.80-0.94 at N/rank = 256, 0.53-0.82 at
512, 0.41-0.57 at 1024 and 0.22-0.30 at 2048, on uniform and on clustered rows
alike, moving 0.39 MB instead of 3-25 MB per rank. So shard is the default.

The step (network, objective, fused ops, under bf16 autocast when asked) is one
torch.compile'd function; losses stay on the device and are read every
--log-every steps, so a step makes no host synchronization.
Under torchrun the step is compiled without fullgraph: DDP's forward breaks the
graph (torch marks it not traceable); --ref-dist shard's collectives and the
STF op trace without a break (TORCH_LOGS=graph_breaks, 2 gloo processes on CPU).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import warnings

import numpy as np
import torch

from fastdiff import checkpoint as ckpt_io
from fastdiff import runlock
from fastdiff.data import DataError, Sampler, load_dataset
from fastdiff.nn import MLP_PRESETS, MODELS, UNET_PRESETS, build_net


class ConfigError(ValueError):
    pass


# Options that define the model and the optimization: a checkpoint resumes only
# under the same values. The rest (length, logging, device, compile) may change.
IDENTITY = ("data", "resolution", "xflip", "objective", "ref_size", "process", "param", "weighting", "density",
            "sigma_data", "model", "preset", "batch", "lr", "warmup", "ema", "ema_rampup", "grad_clip",
            "precision", "seed", "ref_sampling", "ref_neighbours", "cond", "label_dropout", "importance_weighting")


def _ref_size(text: str):
    """--ref-size: a positive integer or 'all'."""
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once: not where the help already says what the default is, nor for None."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from fastdiff.diffusion.density import DENSITIES
    from fastdiff.diffusion.parameterization import PARAMETERIZATIONS
    from fastdiff.diffusion.processes import PROCESSES
    from fastdiff.diffusion.weighting import WEIGHTING_ALIASES, WEIGHTINGS
    p = argparse.ArgumentParser(prog="python -m fastdiff.train", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    a = p.add_argument
    a("--config", default=None, help="YAML or JSON file setting any option below (by its name, e.g. ref_size: 4096); "
                                     "options given on the command line win")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="digits", help="digits | gmm | a folder or .zip of images | an .npz array | "
                                                     "a CIFAR-10 python-format directory")
    g.add_argument("--resolution", type=int, default=None, help="resize images to this size (default: as stored)")
    g.add_argument("--xflip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flips (applied to the batch and the reference rows alike)")
    g = p.add_argument_group("objective")
    g.add_argument("--objective", default="stf", choices=["stf", "dsm"], help="Stable Target Field or plain DSM")
    g.add_argument("--ref-size", type=_ref_size, default=1024,
                   help="STF reference batch per process (see --ref-sampling), or 'all': the whole training set "
                        "every step, held on the device once (under torchrun 1/world of it per rank), the empirical "
                        "posterior mean with zero target variance. With --xflip the set holds every image and its "
                        "mirror image (2N rows): the distribution the network is trained on")
    g.add_argument("--ref-sampling", default="uniform", choices=["uniform", "neighbours"],
                   help="uniform: the mini-batch plus ref_size - batch uniform draws with replacement (the paper); "
                        "neighbours: each batch row's source and its --ref-neighbours nearest training samples "
                        "(weight 1) plus uniform draws without replacement from the rest, Horvitz-Thompson "
                        "weighted: a consistent estimate of --ref-size all's target (fastdiff.refsets)")
    g.add_argument("--ref-neighbours", type=int, default=8,
                   help="K for --ref-sampling neighbours (an exact k-NN table, cached in the run directory)")
    g.add_argument("--cond", action=argparse.BooleanOptionalAction, default=False,
                   help="class-conditional training with the data's labels (a class embedding in the network; "
                        "each row's STF target averages over its own class)")
    g.add_argument("--label-dropout", type=float, default=0.0,
                   help="with --cond: this fraction of every batch (round(p * batch) rows) is trained "
                        "unconditionally (null class, STF over every class), for classifier-free guidance")
    g.add_argument("--ref-dist", default="shard", choices=["shard", "gather"],
                   help="under torchrun: keep every rank's reference rows where they are and combine per-rank "
                        "partial targets by their log-sum-exps (shard), or all-gather the rows (gather); the same "
                        "target. shard measured 0.2-0.9x gather's time (see the module docstring)")
    g.add_argument("--process", default="edm", choices=sorted(PROCESSES), help="noise process sigma(t), alpha(t)")
    g.add_argument("--param", default="edm", choices=sorted(PARAMETERIZATIONS),
                   help="network parameterization (edm/vp/ve/iddpm: EDM's preconditioned forms)")
    g.add_argument("--weighting", default="edm", choices=sorted([*WEIGHTINGS, *WEIGHTING_ALIASES]),
                   help="loss weighting w(lambda) (fastdiff.diffusion.weighting; the README's \"The same loss "
                        "as ...\" table maps other libraries' names)")
    g.add_argument("--density", default="lognormal", choices=sorted(DENSITIES),
                   help="training noise density p(lambda); adaptive: Kingma & Gao's learned density")
    g.add_argument("--importance-weighting", action=argparse.BooleanOptionalAction, default=True,
                   help="weight each sample by w(lambda) / p(lambda), Kingma & Gao's form, where the density only "
                        "changes the variance; --no-importance-weighting weights by w(lambda) alone, as diffusers, "
                        "k-diffusion and EDM do (the density is then part of the loss; not with --density adaptive)")
    g.add_argument("--sigma-data", type=float, default=0.5, help="data standard deviation for preconditioning")
    g = p.add_argument_group("network")
    g.add_argument("--model", default="unet", choices=list(MODELS), help="U-Net for images, MLP for vectors")
    g.add_argument("--preset", default="tiny", help=f"size: {' | '.join(UNET_PRESETS)} (ddpmpp-cifar is EDM's "
                                                      f"55.7M-parameter DDPM++)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch", type=int, default=128, help="mini-batch per process")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate after warmup")
    g.add_argument("--warmup", type=int, default=200, help="linear learning-rate warmup, steps")
    g.add_argument("--steps", type=int, default=800,
                   help="the run's total length in steps, counted from step 0 (a resume continues up to it; give "
                        "a larger value to extend a finished run); ignored if --kimg is given")
    g.add_argument("--kimg", type=float, default=None,
                   help="the run's total length in thousands of images (all ranks), instead of --steps")
    g.add_argument("--ema", type=float, default=500_000, help="EMA half-life in images")
    g.add_argument("--ema-rampup", type=float, default=0.05,
                   help="cap the EMA half-life at this fraction of the images seen so far (0: off)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16 autocast or plain fp32")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the step (default: on for CUDA, off on CPU)")
    g.add_argument("--device", default=None, help="cuda | cpu | cuda:1 (default: cuda if available)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default, or 1 when the "
                                                           "machine is already busy: contending threads are slower)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs", help="parent directory of run directories")
    g.add_argument("--name", default=None, help="run directory name (default: numbered, from data/objective/model)")
    g.add_argument("--resume", default=None, help="checkpoint file or run directory to continue from")
    g.add_argument("--log-every", type=int, default=50, help="read losses and write metrics every N steps")
    g.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: at the end)")
    g.add_argument("--ckpt-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept on disk")
    g.add_argument("--fid-every", type=int, default=0, help="FID every N steps (0: at the end, -1: never)")
    g.add_argument("--fid-ref", default="proxy", help="proxy (a small classifier trained on the data) | a folder "
                                                      "of images or an .npz of clean-fid statistics")
    g.add_argument("--fid-samples", type=int, default=1000, help="samples per FID evaluation")
    g.add_argument("--sample-steps", type=int, default=18, help="Heun steps for samples and FID")
    return p


def parse_config(argv=None) -> tuple[dict, set]:
    """Options as a dict, and the names given explicitly (command line or --config)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = vars(args)
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    explicit = set(vars(probe.parse_args(argv)))
    if args.config:
        try:
            with open(args.config) as f:
                text = f.read()
            if args.config.endswith(".json"):
                file_cfg = json.loads(text)
            else:
                import yaml
                file_cfg = yaml.safe_load(text) or {}
        except Exception as e:
            raise ConfigError(f"--config {args.config}: cannot read it: {e}") from None
        if not isinstance(file_cfg, dict):
            raise ConfigError(f"--config {args.config}: expected a mapping of option names to values")
        for key, value in file_cfg.items():
            k = key.replace("-", "_")
            if k not in cfg or k == "config":
                raise ConfigError(f"--config {args.config}: unknown option {key!r}")
            if k not in explicit:
                argv_value = [f"--{k.replace('_', '-')}", str(value)]
                action = next(a for a in parser._actions if a.dest == k)
                if isinstance(action, argparse.BooleanOptionalAction):
                    cfg[k] = bool(value)
                else:
                    cfg[k] = parser.parse_args(argv_value).__dict__[k] if value is not None else None
                explicit.add(k)
    return cfg, explicit


def check_config(cfg: dict) -> None:
    """Stop on values that cannot work, before any data or model is built."""
    for key in ("batch", "ref_size", "steps", "log_every", "ckpt_every", "fid_samples", "sample_steps", "keep"):
        if cfg[key] is not None and cfg[key] != "all" and cfg[key] <= 0:
            raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {cfg[key]}")
    if not 0 <= cfg["label_dropout"] < 1 or (cfg["label_dropout"] and not cfg["cond"]):
        raise ConfigError(f"--label-dropout must be in [0, 1) and needs --cond, got {cfg['label_dropout']}")
    if cfg["ref_size"] == "all" and cfg["ref_sampling"] != "uniform":
        raise ConfigError("--ref-size all already holds every training sample: drop --ref-sampling neighbours")
    if cfg["ref_sampling"] == "neighbours" and cfg["ref_size"] != "all" and \
            cfg["ref_size"] <= cfg["batch"] * (cfg["ref_neighbours"] + 1):
        raise ConfigError(f"--ref-size {cfg['ref_size']} must exceed --batch x (--ref-neighbours + 1) = "
                          f"{cfg['batch'] * (cfg['ref_neighbours'] + 1)}: the neighbour union of a batch holds up "
                          f"to that many rows and the uniform draws need room beside it")
    if cfg["ref_neighbours"] < 1:
        raise ConfigError(f"--ref-neighbours must be positive, got {cfg['ref_neighbours']}")
    if cfg["objective"] == "stf" and cfg["ref_size"] != "all" and cfg["ref_size"] < cfg["batch"]:
        raise ConfigError(f"--ref-size {cfg['ref_size']} is smaller than --batch {cfg['batch']}: STF's reference "
                          f"batch holds the mini-batch itself plus ref_size - batch further samples")
    presets = UNET_PRESETS if cfg["model"] == "unet" else MLP_PRESETS
    if cfg["preset"] not in presets:
        raise ConfigError(f"--preset must be one of {list(presets)} for --model {cfg['model']}, got {cfg['preset']!r}")
    # Written so that NaN fails every test (NaN <= 0 is False).
    for key, lo, hint in (("lr", 0, "positive"), ("ema", 0, "a positive number of images"),
                          ("sigma_data", 0, "positive"), ("kimg", 0, "positive")):
        if cfg[key] is not None and not lo < cfg[key] < math.inf:
            raise ConfigError(f"--{key.replace('_', '-')} must be finite and {hint}, got {cfg[key]}")
    if cfg["lr"] > torch.finfo(torch.float32).max:          # the optimizer holds it in float32
        raise ConfigError(f"--lr {cfg['lr']} is beyond float32's range")
    max_threads = max(64, 4 * (os.cpu_count() or 1))        # far more: OpenMP crashes (segfault at 100000)
    if cfg["threads"] > max_threads:
        raise ConfigError(f"--threads {cfg['threads']} is more than this machine can use ({os.cpu_count()} CPUs; "
                          f"at most {max_threads}); give --threads N (0: automatic)")
    for key, hint in (("ema_rampup", "0: off"), ("grad_clip", "0: off")):
        if not 0 <= cfg[key] < math.inf:
            raise ConfigError(f"--{key.replace('_', '-')} must be finite and non-negative ({hint}), got {cfg[key]}")
    for key, lo in (("warmup", 0), ("threads", 0), ("sample_every", 0), ("fid_every", -1)):
        if cfg[key] < lo:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least {lo}, got {cfg[key]}")
    if cfg["resolution"] is not None and cfg["resolution"] <= 0:
        raise ConfigError(f"--resolution must be positive, got {cfg['resolution']}")
    _check_paths(cfg)


def _check_paths(cfg: dict) -> None:
    """--out, --name and --fid-ref name something usable, before any step (a bad --fid-ref was
    found only after the last checkpoint)."""
    if os.path.exists(cfg["out"]) and not os.path.isdir(cfg["out"]):
        raise ConfigError(f"--out {cfg['out']} is a file; it must be a directory (the parent of run directories)")
    if not cfg["resume"]:                    # a resume writes to its checkpoint's directory
        try:
            os.makedirs(cfg["out"], exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {cfg['out']!r}: cannot create it: {e.strerror or e}") from None
    name = cfg["name"]
    if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
        raise ConfigError(f"--name must be a plain directory name (no '/', not '.' or '..'), got {name!r}")
    ref = cfg["fid_ref"]
    if ref == "proxy" or cfg["fid_every"] == -1:
        return
    if ref.endswith(".npz"):
        from fastdiff.eval.fid import load_stats
        if not os.path.isfile(ref):
            raise ConfigError(f"--fid-ref {ref}: no such file")
        try:
            load_stats(ref)
        except Exception as e:
            raise ConfigError(f"--fid-ref {ref}: not usable as FID statistics: {e}") from None
    elif not os.path.isdir(ref):
        raise ConfigError(f"--fid-ref {ref}: no such directory (expected proxy, a folder of images or an .npz of "
                          f"clean-fid statistics)")


def _rng_state(device: torch.device, sampler: Sampler) -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate(), "sampler": sampler.state_dict()}


def _set_rng_state(state: dict, device: torch.device, sampler: Sampler) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    sampler.load_state_dict(state["sampler"])


def _fault(kind: str) -> int | None:
    """Test hook: FASTDIFF_FAULT=kill@N (SIGKILL at step N), killwrite@N (SIGKILL halfway through writing
    the checkpoint of step N) or nan@N (NaN loss at step N)."""
    spec = os.environ.get("FASTDIFF_FAULT", "")
    return int(spec.split("@")[1]) if spec.startswith(kind + "@") else None


def _compiler_usable() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))


def _make_objective(cfg: dict):
    from fastdiff.diffusion import make_objective
    try:
        return make_objective(objective=cfg["objective"], process=cfg["process"], param=cfg["param"],
                              weighting=cfg["weighting"], density=cfg["density"], sigma_data=cfg["sigma_data"],
                              importance_weighted=cfg.get("importance_weighting", True))
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"objective settings (--process {cfg['process']} --param {cfg['param']} --weighting "
                          f"{cfg['weighting']} --density {cfg['density']}): {e}") from None


def _lock_run_dir(run_dir: str) -> None:
    try:
        runlock.RunLock(run_dir)
    except runlock.RunLockError as e:
        raise ConfigError(str(e)) from None


def _claim_run_dir(run_dir: str) -> None:
    """Lock a new run directory for this process (the lock lasts until it ends or main() returns) and
    tidy it."""
    _lock_run_dir(run_dir)
    _tidy_run_dir(run_dir)


def _tidy_run_dir(run_dir: str, resumed: str | None = None, step: int = 0) -> None:
    """Under the run's lock, remove what killed runs left: unfinished temporary checkpoints, and damaged
    checkpoints newer than `resumed` (of step `step`; moved aside; an intact newer one stops the run:
    continuing would overwrite it)."""
    for f in ckpt_io.remove_temporaries(run_dir):
        print(f"removed {f}: an unfinished checkpoint write of a killed run")
    if resumed is not None:
        for f, aside in ckpt_io.check_newer(resumed, step):
            print(f"moved {f} aside to {os.path.basename(aside)}: it is damaged (a checksum mismatch or truncation)")
        _trim_metrics(os.path.join(run_dir, "metrics.jsonl"), step)


def _trim_metrics(path: str, step: int) -> None:
    """Drop the records of steps after `step` from metrics.jsonl: a killed run logged steps past its last
    checkpoint, which the resumed run trains again (and logs again). A line torn by the kill goes too."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line)
    if len(kept) != len(lines):
        ckpt_io.write_atomic(path, "".join(x + "\n" for x in kept).encode())


def _new_run_dir(cfg: dict) -> str:
    """Create and claim a new run directory: --name, or the next free number."""
    os.makedirs(cfg["out"], exist_ok=True)
    if cfg["name"]:
        run_dir = os.path.join(cfg["out"], cfg["name"])
        os.makedirs(run_dir, exist_ok=True)
        _claim_run_dir(run_dir)                  # before the check, so no second process slips past it
        if ckpt_io.list_checkpoints(run_dir):
            raise ConfigError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
                              f"or choose another --name")
        return run_dir
    data = os.path.basename(os.path.normpath(cfg["data"])).split(".")[0] or "data"
    while True:       # mkdir is atomic: two runs started together take different numbers
        ids = [int(d[:5]) for d in os.listdir(cfg["out"]) if d[:5].isdigit()]
        # Every choice that tells runs apart at a glance: data, objective, weighting, density, network.
        run_dir = os.path.join(cfg["out"], f"{max(ids, default=-1) + 1:05d}-{data}-{cfg['objective']}-"
                                           f"{cfg['weighting']}-{cfg['density']}-{cfg['model']}-{cfg['preset']}")
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            continue
        _claim_run_dir(run_dir)
        return run_dir


@torch.no_grad()
def generate(obj, net, shape, n: int, *, seed: int, steps: int, device, batch: int = 500, sampler: str = "heun",
             progress: bool = False, class_labels: torch.Tensor | None = None, guidance: float = 1.0):
    """Yields batches of samples (on the CPU, in [-1, 1]) from net with fastdiff.sample; the
    training RNG is left untouched. A class-conditional net samples class_labels (n,) (default:
    classes 0, 1, ... in turn), with classifier-free guidance (fastdiff.nn.Guided)."""
    from fastdiff.nn import Guided
    from fastdiff.sampling import sample
    gen = torch.Generator(device).manual_seed(seed)
    denoiser = obj.denoiser(net)
    classes = getattr(net, "num_classes", 0)
    if classes and class_labels is None:
        class_labels = torch.arange(n) % classes
    lo, hi = max(getattr(denoiser, "sigma_min", 0.002), 0.002), min(getattr(denoiser, "sigma_max", 80.0), 80.0)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(0, n, batch):
            if classes:
                denoiser = obj.denoiser(Guided(net, class_labels[i:i + batch].to(device), guidance))
            yield sample(denoiser, (min(batch, n - i), *shape), sampler=sampler, steps=steps, sigma_min=lo,
                         sigma_max=hi, generator=gen, device=device, progress=progress).float().clamp(-1, 1).cpu()


def load_for_sampling(path: str, device) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """(config, EMA network, objective) from a checkpoint file or run directory."""
    path, state = ckpt_io.load_newest(path, "--ckpt")
    cfg = state["config"]
    net = build_net(cfg["model"], cfg["preset"], tuple(state["data"]["shape"]),
                    num_classes=state["data"].get("classes", 0))
    obj = _make_objective(cfg)
    try:
        net.load_state_dict(state["ema"])
        obj.load_state_dict(state["obj"])
    except (RuntimeError, KeyError) as e:
        raise ckpt_io.CheckpointError(f"{path} does not match its own configuration: {e}") from None
    return cfg, net.to(device).eval().requires_grad_(False), obj.to(device)


def make_step(model, obj, opt, *, device, bf16: bool, compile: bool, grad_clip: float, world: int = 1):
    """step(y, extra_ref, lr) -> (loss, stats): one optimizer step. The forward (network, objective,
    fused ops, under bf16 autocast if asked) is one torch.compile'd graph; its backward is
    compiled with it. Nothing here reads a value back to the host."""
    params = [p for group in opt.param_groups for p in group["params"]]
    obj_params = list(obj.parameters())

    def loss_fn(y, extra_ref, refs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return obj(model, y, extra_ref, **refs)

    fn = {"loss": torch.compile(loss_fn, fullgraph=world == 1) if compile else loss_fn, "first": True}

    def step(y, extra_ref, lr: float, poison: bool = False, refs: dict | None = None):
        refs = refs or {}
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            loss, stats = fn["loss"](y, extra_ref, refs)
        except Exception as e:  # an unusable compiler shows up on the first call
            if fn["loss"] is loss_fn or not fn["first"]:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); running the step eagerly")
            fn["loss"] = loss_fn
            loss, stats = loss_fn(y, extra_ref, refs)
        fn["first"] = False
        if poison:                               # test hook, see _fault
            loss = loss * float("nan")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1 and obj_params:             # DDP averages the network's gradients, not the objective's
            for p in obj_params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        opt.step()
        obj.update_density(stats)
        return loss, stats

    return step


@dataclasses.dataclass
class Run:
    """Everything one training process holds: set up by setup_run, advanced by training_loop."""
    cfg: dict
    device: torch.device
    world: int
    rank: int
    run_dir: str
    dataset: object
    shape: tuple
    data_info: dict
    net: torch.nn.Module
    ema: torch.nn.Module
    obj: torch.nn.Module
    opt: torch.optim.Optimizer
    sampler: Sampler
    total_steps: int
    images_per_step: int
    step: int = 0
    last_good: str | None = None
    proxy: dict = dataclasses.field(default_factory=dict)

    @property
    def stf(self) -> bool:
        return self.cfg["objective"] == "stf"

    @property
    def shard(self) -> bool:
        # This rank's y and draws are its shard of the reference batch; the objective
        # combines the ranks' partial targets (fastdiff.distributed).
        return self.world > 1 and self.stf and self.cfg["ref_dist"] == "shard"

    def log(self, *args, **kwargs) -> None:
        if self.rank == 0:
            print(*args, **kwargs)

    def append_metrics(self, record: dict) -> None:
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def _init_device(cfg: dict) -> tuple[torch.device, int, int]:
    """(device, world size, rank); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    try:
        device = torch.device(cfg["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConfigError(f"--device {cfg['device']!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {cfg['device']}: fastdiff trains on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg['device']}: no CUDA device is visible to torch")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {cfg['device']}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, world, rank


def _load_resume(cfg: dict, explicit: set) -> tuple[dict, dict | None, str | None]:
    """(config, checkpoint state, checkpoint file) for --resume; (cfg, None, None) without it."""
    if not cfg["resume"]:
        return cfg, None, None
    path, resume = ckpt_io.load_newest(cfg["resume"])
    saved = resume["config"]
    clash = [k for k in IDENTITY if k in explicit and cfg[k] != saved.get(k)]
    if clash:
        raise ConfigError(f"checkpoint {path} is from another configuration: " + ", ".join(
            f"--{k.replace('_', '-')} {cfg[k]!r} (checkpoint: {saved.get(k)!r})" for k in clash))
    # Options not given again continue as saved (the run's length included), the CPU thread count
    # too: results differ with it, and a resume must continue bit for bit. Where and how it runs
    # (device, compile, ref_dist) is decided afresh on this machine.
    keep = set(cfg) - explicit - {"resume", "device", "compile", "ref_dist"}
    cfg = {**cfg, **{k: v for k, v in saved.items() if k in keep}}
    if "threads" in explicit and saved.get("threads") and cfg["threads"] != saved["threads"]:
        warnings.warn(f"--threads {cfg['threads']} overrides the run's {saved['threads']} CPU thread(s): results "
                      f"depend on the thread count, so the run will not continue bit for bit")
    return cfg, resume, path


def _configure_host(cfg: dict, device: torch.device) -> None:
    """CPU threads and whether the step is compiled, decided on this machine."""
    if device.type == "cpu":
        threads = cfg["threads"]
        if threads == 0 and hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1) - 0.5:
            threads = 1
        if threads > 0:
            torch.set_num_threads(threads)
        cfg["threads"] = torch.get_num_threads()     # saved with the run, reused by a resume
    if cfg["compile"] is None:
        cfg["compile"] = device.type == "cuda"
    if cfg["compile"] and device.type == "cpu" and not _compiler_usable():
        warnings.warn("no C++ compiler found for torch.compile on CPU; running the step eagerly")
        cfg["compile"] = False


def setup_run(cfg: dict, explicit: set) -> Run:
    """Device, process group, resume, data, network, objective, optimizer and run directory:
    everything before the first step. A failure here stops the run before any step."""
    device, world, rank = _init_device(cfg)
    if cfg["resume"] and rank == 0:
        # Lock before reading: a run still going there prunes the checkpoints this would read.
        where = cfg["resume"] if os.path.isdir(cfg["resume"]) else os.path.dirname(os.path.abspath(cfg["resume"]))
        if os.path.isdir(where):
            _lock_run_dir(where)
    cfg, resume, resumed = _load_resume(cfg, explicit)
    check_config(cfg)
    run_dir = os.path.dirname(os.path.abspath(resumed)) if resumed else None
    if resumed and rank == 0:              # locked above
        _tidy_run_dir(run_dir, resumed, resume["step"])
    _configure_host(cfg, device)

    dataset = load_dataset(cfg["data"], cfg["resolution"], cfg["xflip"])
    shape = dataset.shape
    if cfg["model"] == "unet" and len(shape) == 1:
        raise ConfigError(f"--data {cfg['data']} is vector data of shape {shape}: use --model mlp")
    if dataset.is_image and cfg["fid_ref"] != "proxy" and cfg["fid_every"] != -1:
        try:
            import cleanfid  # noqa: F401
        except ImportError:
            raise ConfigError(f"--fid-ref {cfg['fid_ref']} (Inception FID) needs clean-fid: pip install clean-fid; "
                              f"or use --fid-ref proxy, or --fid-every -1") from None
    torch.manual_seed(cfg["seed"])           # the same initial network on every rank
    classes = len(dataset.classes) if cfg.get("cond") and dataset.require_labels() is not None else 0
    try:
        net = build_net(cfg["model"], cfg["preset"], shape, num_classes=classes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    obj = _make_objective(cfg)
    data_info = {"n": len(dataset), "shape": list(shape), **({"classes": classes} if classes else {})}
    if resume is not None and resume["data"] != data_info:
        raise ConfigError(f"the checkpoint was trained on data {resume['data']}, --data {cfg['data']} gives "
                          f"{data_info}")
    torch.manual_seed(cfg["seed"] + rank)    # then different noise on every rank
    np.random.seed((cfg["seed"] + rank) % 2 ** 32)
    random.seed(cfg["seed"] + rank)
    dataset = dataset.to(device)
    net.to(device).train()
    obj.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    train_params = list(net.parameters()) + list(obj.parameters())    # obj: a learned weighting, if any
    opt = torch.optim.Adam(train_params, lr=cfg["lr"], betas=(0.9, 0.999), eps=1e-8,
                           fused=device.type == "cuda")
    sampler = Sampler(len(dataset), cfg["batch"], cfg["seed"], rank, world, dataset.xflip)
    images_per_step = cfg["batch"] * world
    total_steps = math.ceil(cfg["kimg"] * 1000 / images_per_step) if cfg["kimg"] else cfg["steps"]
    run = Run(cfg=cfg, device=device, world=world, rank=rank, run_dir=run_dir, dataset=dataset, shape=shape,
              data_info=data_info, net=net, ema=ema, obj=obj, opt=opt, sampler=sampler, total_steps=total_steps,
              images_per_step=images_per_step)
    if resume is not None:
        _restore(run, resume)
        run.last_good = resumed
        del resume
    else:
        run.run_dir = _new_run_dir(cfg) if rank == 0 else None
        if world > 1:                            # one name for all ranks: rank 0's
            box = [run.run_dir]
            torch.distributed.broadcast_object_list(box, src=0)
            run.run_dir = box[0]
    if rank == 0:
        ckpt_io.write_atomic(os.path.join(run.run_dir, "config.json"), json.dumps(
            {**cfg, "world_size": world, "total_steps": total_steps, "data_info": data_info}, indent=2).encode())
    return run


def _restore(run: Run, resume: dict) -> None:
    """Load a checkpoint's state into the freshly built objects of run."""
    try:
        run.net.load_state_dict(resume["net"])
        run.ema.load_state_dict(resume["ema"])
        run.opt.load_state_dict(resume["opt"])
        run.obj.load_state_dict(resume["obj"])
        run.step = resume["step"]
        states = resume["rank_states"]
    except (RuntimeError, KeyError, ValueError) as e:
        raise ckpt_io.CheckpointError(f"{run.cfg['resume']} does not fit this configuration: {e}") from None
    if len(states) != run.world:
        warnings.warn(f"checkpoint written by {len(states)} processes, resuming with {run.world}: the data order "
                      f"and noise continue from fresh streams, not bit for bit")
        run.sampler.load_state_dict(states[0]["sampler"])
    else:
        _set_rng_state(states[run.rank], run.device, run.sampler)


def _ref_size_text(run: Run) -> str:
    cfg = run.cfg
    if not run.stf:
        return "1"
    if cfg["ref_size"] == "all":
        return f"all: {len(run.dataset) * (2 if run.dataset.xflip else 1)}"
    return f"{cfg['ref_size'] * run.world}{', neighbours' if cfg['ref_sampling'] == 'neighbours' else ''}"


def _refs_fn(run: Run, to_device):
    """next_refs(idx, flip) -> the objective's reference keywords (ref, ref_logw, labels, ref_labels,
    n_uncond) from fastdiff.refsets, or None for the paper's uniform draws without classes (the
    objective then takes the draws as extra_ref beside the batch)."""
    cfg, world, rank = run.cfg, run.world, run.rank
    cond = bool(cfg.get("cond"))
    ref_size, sampling = cfg["ref_size"], cfg.get("ref_sampling", "uniform")
    if not cond and (not run.stf or (ref_size != "all" and sampling == "uniform")):
        return None
    from fastdiff import refsets
    labels = run.dataset.require_labels() if cond else None
    n_uncond = round(cfg.get("label_dropout", 0.0) * cfg["batch"]) if cond else 0
    if not run.stf:
        return lambda idx, flip: {"labels": labels[to_device(idx)], "n_uncond": n_uncond}
    # Under --ref-dist gather every rank holds (or gathers) the whole reference set; under shard
    # each rank keeps its own and stf_target_sharded combines them.
    whole = ref_size == "all" and not run.shard
    barrier = torch.distributed.barrier if world > 1 else None
    refs = refsets.make_refset(sampling, run.dataset, run.sampler, batch=cfg["batch"], ref_size=ref_size,
                               neighbours=cfg.get("ref_neighbours", 0), cond=cond, rank=0 if whole else rank,
                               world=1 if whole else world, run_dir=run.run_dir, barrier=barrier, log=run.log)
    gather = world > 1 and not run.shard and ref_size != "all"

    def next_refs(idx, flip):
        r = refs(idx, flip)
        parts = dict(ref=r.ref, ref_logw=r.ref_logw, ref_labels=r.ref_labels)
        if gather:      # every rank's reference rows, this rank's first (see the module docstring)
            for key, t in parts.items():
                if t is not None:
                    every = [torch.empty_like(t) for _ in range(world)]
                    torch.distributed.all_gather(every, t)
                    parts[key] = torch.cat([every[rank]] + [every[q] for q in range(world) if q != rank])
        out = {k: v for k, v in parts.items() if v is not None}
        if cond:
            out.update(labels=labels[to_device(idx)], n_uncond=n_uncond)
        return out

    return next_refs


def make_batch_fn(run: Run):
    """next_batch() -> (y, extra_ref, refs): this rank's mini-batch, the STF reference rows beyond it
    (the paper's uniform draws) and the objective's reference keywords (fastdiff.refsets: the whole
    set, neighbours, classes; {} for the paper's uniform draws)."""
    device, world, rank, dataset, sampler = run.device, run.world, run.rank, run.dataset, run.sampler
    gather = world > 1 and run.stf and not run.shard

    def to_device(t):
        # Pinned + non_blocking: a pageable host-to-device copy would synchronize the stream.
        if t is None or device.type != "cuda":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    next_refs = _refs_fn(run, to_device)
    n_extra = run.cfg["ref_size"] - run.cfg["batch"] if run.stf and next_refs is None else 0

    def to_device(t):
        # Pinned + non_blocking: a pageable host-to-device copy would synchronize the stream.
        if t is None or device.type != "cuda":
            return t
        return t.pin_memory().to(device, non_blocking=True)

    def next_batch():
        idx, flip = sampler.next_batch()
        y = dataset.get(to_device(idx), to_device(flip))
        if next_refs is not None:
            return y, None, next_refs(idx, flip)
        extra = None
        if n_extra > 0:
            ridx, rflip = sampler.ref_rows(n_extra)
            extra = dataset.get(to_device(ridx), to_device(rflip))
        if gather:
            # Every rank's batch and draws join the reference batch (see the module docstring).
            ys, extras = [torch.empty_like(y) for _ in range(world)], None
            torch.distributed.all_gather(ys, y)
            parts = [ys[r] for r in range(world) if r != rank]
            if extra is not None:
                extras = [torch.empty_like(extra) for _ in range(world)]
                torch.distributed.all_gather(extras, extra)
                parts += extras
            extra = torch.cat(parts)
        return y, extra, {}

    return next_batch


def save_checkpoint(run: Run) -> str | None:
    """Write checkpoint-<step>.pt (rank 0) and prune old ones; every rank takes part. The path, on rank 0."""
    world, rank = run.world, run.rank
    states = [None] * world
    rs = _rng_state(run.device, run.sampler)
    if world > 1:
        torch.distributed.all_gather_object(states, rs)
    else:
        states = [rs]
    if world > 1:
        # The ranks must hold identical parameters; record (and check) one checksum per rank.
        flat = torch.cat([p.detach().double().flatten() for p in run.net.parameters()])
        mine = torch.stack([flat.sum(), (flat * torch.arange(len(flat), device=flat.device, dtype=flat.dtype)
                                         .remainder(7.0)).sum()])
        sums = [torch.empty_like(mine) for _ in range(world)]
        torch.distributed.all_gather(sums, mine)
        if rank == 0:
            run.append_metrics({"step": run.step, "rank_param_checksums": [x.tolist() for x in sums]})
        if any(not torch.equal(x, sums[0]) for x in sums):
            raise RuntimeError(f"ranks out of sync at step {run.step}: parameter checksums "
                               f"{[x.tolist() for x in sums]}")
    if rank != 0:
        return None
    path = os.path.join(run.run_dir, f"checkpoint-{run.step:07d}.pt")
    midway = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if run.step == _fault("killwrite") else None
    try:
        ckpt_io.save({"config": run.cfg, "step": run.step, "data": run.data_info, "net": run.net.state_dict(),
                      "ema": run.ema.state_dict(), "opt": run.opt.state_dict(), "obj": run.obj.state_dict(),
                      "rank_states": states}, path, midway=midway)
    except ckpt_io.CheckpointWriteError as e:
        raise ckpt_io.CheckpointWriteError(
            f"{e}. " + (f"Continue from {run.last_good} with --resume {run.run_dir} once there is room"
                        if run.last_good else "No checkpoint of this run was written")) from None
    ckpt_io.prune(run.run_dir, run.cfg["keep"])
    return path


def evaluate(run: Run, final: bool) -> dict | None:
    """A sample grid and, when due, the FID (every rank draws its share); the metrics record, on rank 0."""
    cfg = run.cfg
    fid_due = run.dataset.is_image and ((final and cfg["fid_every"] == 0) or (cfg["fid_every"] > 0 and (
        run.step % cfg["fid_every"] == 0 or final)))
    fid = compute_fid(run) if fid_due else None
    if run.rank != 0:
        return None
    samples = torch.cat(list(generate(run.obj, run.ema, run.shape, 64 if run.dataset.is_image else 2048,
                                      seed=cfg["seed"], steps=cfg["sample_steps"], device=run.device)))
    from fastdiff.eval import save_grid
    grid = os.path.join(run.run_dir, f"samples-{run.step:07d}.png")
    save_grid(samples, grid)
    record = {"step": run.step, "samples": grid}
    if fid is not None:
        record[f"fid_{'proxy' if cfg['fid_ref'] == 'proxy' else 'clean'}"] = fid
        if "per_class" in run.proxy:
            record["fid_proxy_per_class"] = run.proxy.pop("per_class")
    run.append_metrics(record)
    return record


def compute_fid(run: Run) -> float | None:
    """FID of cfg["fid_samples"] EMA samples (on rank 0; None on the others). Under torchrun
    each rank draws an equal share, rank r with seed + 1 + r, and rank 0 gathers them."""
    from fastdiff import eval as fd_eval
    cfg, world, rank, shape = run.cfg, run.world, run.rank, run.shape
    counts = [cfg["fid_samples"] // world + (r < cfg["fid_samples"] % world) for r in range(world)]
    samples = torch.cat([torch.empty(0, *shape), *generate(run.obj, run.ema, shape, counts[rank],
                                                            seed=cfg["seed"] + 1 + rank, steps=cfg["sample_steps"],
                                                            device=run.device)])
    if world > 1:
        samples = _gather_rows(samples, counts, run.device)
    if rank != 0:
        return None
    if cfg["fid_ref"] != "proxy":
        return fd_eval.fid(samples, cfg["fid_ref"])
    if "net" not in run.proxy:
        with torch.random.fork_rng(devices=[]):
            real = run.dataset.get(torch.arange(len(run.dataset), device=run.device)).cpu()
            labels = None if run.dataset.labels is None else run.dataset.labels.cpu()
            run.proxy["net"] = fd_eval.train_proxy(real, labels, steps=200, seed=cfg["seed"])
            run.proxy["real"] = real
    classes = getattr(run.ema, "num_classes", 0)
    if classes:     # generate's default labels: 0, 1, ... in turn on every rank's share
        labels = torch.cat([torch.arange(c) % classes for c in counts])
        run.proxy["per_class"] = fd_eval.fid_per_class(samples, labels, run.proxy["real"],
                                                       run.dataset.labels.cpu(), run.proxy["net"])
    return fd_eval.fid(samples, run.proxy["real"], run.proxy["net"])


def _log_progress(run: Run, loss_sum: torch.Tensor, n_sum: int, seconds: float, lr: float, bar) -> None:
    """Read the mean loss of the last n_sum steps (the loop's one host sync), stop on a non-finite
    loss, and write it to the bar and metrics.jsonl."""
    mean_loss = (loss_sum / n_sum).item()
    if run.world > 1:
        t = torch.tensor([mean_loss], device=run.device)
        torch.distributed.all_reduce(t)
        mean_loss = t.item() / run.world
    ips = n_sum * run.images_per_step / seconds
    if not math.isfinite(mean_loss):
        msg = (f"loss became {mean_loss} between steps {run.step - n_sum} and {run.step}; stopping. "
               + (f"Last good checkpoint: {run.last_good}." if run.last_good else "No checkpoint was written.")
               + " The options were checked and the data are finite, so the optimization diverged: --lr, --warmup "
                 "and --grad-clip are fixed for a run's checkpoints, so start a new run (another --name) with a "
                 "lower --lr, a longer --warmup or a --grad-clip.")
        raise FloatingPointError(msg)
    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.0f}", refresh=False)
    if run.rank == 0:
        run.append_metrics({"step": run.step, "kimg": run.step * run.images_per_step / 1000, "loss": mean_loss,
                            "lr": lr, "images_per_s": ips, "time": time.time()})


def _update_ema(run: Run, ema_params: list, net_params: list) -> None:
    cfg = run.cfg
    nimg = run.step * run.images_per_step
    halflife = min(cfg["ema"], nimg * cfg["ema_rampup"]) if cfg["ema_rampup"] else cfg["ema"]
    beta = 0.5 ** (run.images_per_step / max(halflife, 1e-8))
    torch._foreach_lerp_(ema_params, net_params, 1 - beta)
    for b_ema, b_net in zip(run.ema.buffers(), run.net.buffers()):
        b_ema.copy_(b_net)


def _commands(run: Run) -> tuple[str, str]:
    """The commands printed for continuing the run and sampling from it. The sample count suits the
    device: 50,000 (the usual FID size) on a GPU, 5,000 on a CPU, where 50,000 images take ~30 minutes
    even for the tiny digits network. Images go to one .npz array (uint8 NHWC), the input of common FID
    evaluators, instead of as many PNG files."""
    n = 50_000 if run.device.type == "cuda" else 5_000
    out = os.path.join(run.run_dir, "samples.npz" if run.dataset.is_image else "samples")
    return (f"python -m fastdiff.train --resume {run.run_dir}",
            f"python -m fastdiff.sample --ckpt {run.run_dir} --n {n} --out {out}")


def training_loop(cfg: dict, explicit: set) -> str:
    """Set up, then step until the run's total, logging, checkpointing and evaluating on the way."""
    run = setup_run(cfg, explicit)
    cfg = run.cfg
    ddp_net = run.net
    if run.world > 1:
        ddp_net = torch.nn.parallel.DistributedDataParallel(run.net, device_ids=[run.device]
                                                            if run.device.type == "cuda" else None)
    if run.shard:
        from fastdiff.distributed import stf_target_sharded
        run.obj.stf_target_fn = stf_target_sharded
    train_step = make_step(ddp_net, run.obj, run.opt, device=run.device, bf16=cfg["precision"] == "bf16",
                           compile=cfg["compile"], grad_clip=cfg["grad_clip"], world=run.world)
    next_batch = make_batch_fn(run)

    resume_cmd, sample_cmd = _commands(run)
    if run.step >= run.total_steps:
        run.log(f"{run.run_dir} is finished: it is at step {run.step} of its total of {run.total_steps}, so there "
                f"is nothing to do. --steps is the run's total length: to train longer, resume it with a larger "
                f"total, e.g.\n  {resume_cmd} --steps {2 * run.total_steps}\n  sample: {sample_cmd}")
        return run.run_dir
    run.log(f"run directory: {run.run_dir}\n  data {cfg['data']} {len(run.dataset)} x {run.shape}, "
            f"{cfg['objective']} (ref size {_ref_size_text(run)}), "
            f"{cfg['model']}/{cfg['preset']} {sum(p.numel() for p in run.net.parameters()) / 1e6:.2f}M params, "
            f"{run.device}, {'compiled' if cfg['compile'] else 'eager'}, {cfg['precision']}, "
            f"{run.world} process(es)"
            f"{f', {torch.get_num_threads()} thread(s)' if run.device.type == 'cpu' else ''}\n"
            f"  resume: {resume_cmd}\n  sample: {sample_cmd}")
    from tqdm import tqdm
    # Redirected to a log file (a cluster job), the bar updates every 30 s instead of 10 times a second.
    bar = tqdm(total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True, disable=run.rank != 0,
               smoothing=0.1, mininterval=0.1 if sys.stderr.isatty() else 30.0)
    try:
        _steps(run, train_step, next_batch, bar)
    finally:      # an error leaves on a line of its own, not after the bar's
        bar.close()
    run.log(f"done: {run.run_dir}\n  train longer (--steps is the new total, now {run.total_steps}): "
            f"{resume_cmd} --steps {2 * run.total_steps}\n  sample: {sample_cmd}")
    if run.world > 1:
        # Ranks other than 0 wait here while rank 0 samples, so that no rank tears its
        # process group down under another's feet; main() then destroys it.
        torch.distributed.barrier()
    return run.run_dir


def _steps(run: Run, train_step, next_batch, bar) -> None:
    """The loop: step until the run's total, logging, checkpointing and evaluating on the way."""
    cfg = run.cfg
    kill_at, nan_at = _fault("kill"), _fault("nan")
    loss_sum = torch.zeros((), device=run.device)
    n_sum, t_last = 0, time.perf_counter()
    ema_params, net_params = list(run.ema.parameters()), list(run.net.parameters())
    while run.step < run.total_steps:
        if run.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        y, extra, refs = next_batch()
        lr = cfg["lr"] * min(1.0, (run.step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
        loss, stats = train_step(y, extra, lr, poison=run.step == nan_at, refs=refs)
        run.step += 1
        _update_ema(run, ema_params, net_params)
        loss_sum += loss.detach().float()
        n_sum += 1
        bar.update(1)

        step, done = run.step, run.step == run.total_steps
        if step % cfg["log_every"] == 0 or step % cfg["ckpt_every"] == 0 or done:
            _log_progress(run, loss_sum, n_sum, time.perf_counter() - t_last, lr, bar)
            loss_sum.zero_()
            n_sum, t_last = 0, time.perf_counter()
        if step % cfg["ckpt_every"] == 0 or done:
            finite = torch.stack([p.isfinite().all() for p in net_params]).all()
            if not bool(finite):
                raise FloatingPointError(f"parameters became non-finite by step {step}; stopping. " + (
                    f"Last good checkpoint: {run.last_good}." if run.last_good else "No checkpoint was written."))
            run.last_good = save_checkpoint(run) or run.last_good
        if (cfg["sample_every"] and step % cfg["sample_every"] == 0) or (cfg["fid_every"] > 0 and
                                                                         step % cfg["fid_every"] == 0) or done:
            record = evaluate(run, final=done)
            if record:
                bar.write(f"step {step}: samples {record['samples']}" + "".join(
                    f", {k} {v:.2f}" for k, v in record.items() if k.startswith("fid") and isinstance(v, float)))


def _gather_rows(rows: torch.Tensor, counts: list, device) -> torch.Tensor | None:
    """Rank 0 gets every rank's rows in rank order (counts[r] of them from rank r), on the CPU;
    the other ranks get None. Sent padded to max(counts) through `device` (gloo: CPU, nccl: CUDA)."""
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if len(rows) != counts[rank]:
        raise ValueError(f"rank {rank} has {len(rows)} rows, counts say {counts[rank]}")
    pad = torch.zeros(max(counts), *rows.shape[1:], dtype=rows.dtype, device=device)
    pad[:len(rows)] = rows
    parts = [torch.empty_like(pad) for _ in range(world)] if rank == 0 else None
    torch.distributed.gather(pad, parts, dst=0)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu() if rank == 0 else None


def _close_process_group() -> None:
    """Destroy the process group (called from main(), after training_loop has returned).

    On success every rank arrives here straight from the barrier at the end of the loop, so
    the destruction is collective, as torch.distributed asks. What it cannot do is free the
    group once DDP has been built (its gloo threads still run at exit, torch 2.14): see
    _exit_worker for the abort that caused.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    try:
        cfg, explicit = parse_config(argv)
        training_loop(cfg, explicit)
    except (ConfigError, DataError, ckpt_io.CheckpointError) as e:
        print(f"fastdiff.train: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"fastdiff.train: error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"fastdiff.train: error: no space left on the device writing {e.filename or 'a file'}; the "
              f"checkpoints written so far are intact: free space and continue with --resume", file=sys.stderr)
        return 2
    finally:
        runlock.release_all()
        _close_process_group()
    return 0


def _exit_worker(code: int) -> None:
    """Ends a torchrun worker without the interpreter's C++ teardown.

    Once DDP has been built the process group outlives destroy_process_group()
    (torch 2.14: gloo's worker threads still run at exit), and now and then a rank
    aborted in that teardown, with no Python frame left ("terminate called without
    an active exception"), turning a finished run into a failed one. The Python
    exit handlers still run (torch.compile's worker pools, logging), then the
    streams are flushed and the process exits with its code.
    """
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_worker(code)
    sys.exit(code)
