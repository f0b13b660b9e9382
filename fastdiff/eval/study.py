"""A DSM-versus-STF training study: every arm trained with the same budget, seeds, network and data order.

    python -m fastdiff.eval.study --data gmm --steps 600 --seeds 3 --out DIR \\
        --arms dsm,stf-256,stf-all,sigmoid,adaptive

Arms (--arms, comma-separated; '+key=value' modifies any arm, e.g. stf-256+density=adaptive):
  dsm         DSM with EDM's defaults: edm process and preconditioning, EDM weighting, log-normal density
  stf-N       the same with the STF target over a reference batch of N rows: the mini-batch plus
              N - batch uniform draws from the data (Xu et al. 2023); N >= --batch
  stf-all     STF with the whole data set as the reference every step: the target is the exact
              posterior mean over the training set (the op is given the whole set as ref)
  sigmoid     DSM with Kingma & Gao's sigmoid weighting w = sigmoid(b - lambda), b = 2
  adaptive    DSM with EDM's weighting and the adaptive noise density (K&G's importance sampling)

What is measured, on a fixed evaluation set (the same for every arm and seed): at 24 noise
levels uniform in log-SNR over the process's range, rows x = y + sigma n with y from the true
distribution (gmm) or the data set, the error of the EMA network's denoiser D(x; sigma)

    e(sigma) = E ||D(x; sigma) - D*(x; sigma)||^2 / (sigma^2 D)      (eps units)

against D* = the exact denoiser of the gmm's mixture ("err"), and against the empirical
posterior mean over the training set ("err_emp", computed exactly with fastdiff.stf_target;
DSM's minimizer on a finite set). Each is reported per sigma band and as one number weighted as
in training, sum_j w(lambda_j) e(sigma_j) dlambda, with EDM's weighting w for every arm (the
DSM baseline's; one yardstick for all) and also with the arm's own weighting ("*_own"). On images
the proxy FID (fastdiff.eval.proxy) of EMA samples is recorded too. Wall-clock counts training
steps only (evaluation excluded); on a shared machine the process CPU time ("cpu") is the
steadier clock, and the plot uses it.

The steps an arm needs to reach DSM's final error: the threshold is DSM's final primary error
(err on gmm, err_emp otherwise) averaged over seeds; per seed, the first evaluation at or below
it, interpolated in log-error between evaluations; mean and 95% t-interval over the seeds.

Writes DIR/study.json (settings, every curve of every arm and seed, the summary), DIR/study.png
(curves with seed bands: min..max over seeds around the mean) and DIR/runs/*.json, one per
(arm, seed): a rerun with the same settings reuses them, so an interrupted study continues.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time

import torch

import fastdiff
from fastdiff.data import DataError, Sampler, load_dataset
from fastdiff.diffusion import GaussianMixture, get_weighting, make_objective
from fastdiff.eval.variance import MissingDependency, UsageError, _Parser, _pyplot
from fastdiff.nn import build_net

__all__ = ["parse_arms", "run_arm", "summarize", "plot", "main"]

TOOL = "fastdiff.eval.study"
EVAL_LEVELS, EVAL_BANDS = 24, 6
ARM_KEYS = ("weighting", "density")


# ----------------------------------------------------------------------------
# arms
# ----------------------------------------------------------------------------

def parse_arms(text: str, batch: int) -> dict:
    """'dsm,stf-256,stf-all,sigmoid' -> {name: {"objective", "ref", "weighting", "density"}}."""
    arms = {}
    for name in (p.strip() for p in text.split(",")):
        if not name:
            continue
        base, *mods = name.split("+")
        arm = {"objective": "dsm", "ref": None, "weighting": "edm", "density": "lognormal"}
        if base == "dsm":
            pass
        elif base == "sigmoid":
            arm["weighting"] = "sigmoid"
        elif base == "adaptive":
            arm["density"] = "adaptive"
        elif base.startswith("stf-"):
            arm["objective"] = "stf"
            size = base[4:]
            if size == "all":
                arm["ref"] = "all"
            else:
                try:
                    arm["ref"] = int(size)
                except ValueError:
                    raise UsageError(f"--arms {name!r}: stf-N needs an integer N or 'all'") from None
                if arm["ref"] < batch:
                    raise UsageError(f"--arms {name!r}: the reference batch holds the mini-batch, so N must be "
                                     f">= --batch {batch}")
        else:
            raise UsageError(f"--arms {name!r}: unknown arm; expected dsm, stf-N, stf-all, sigmoid or adaptive "
                             f"(with optional +weighting=W / +density=P)")
        for mod in mods:
            key, _, value = mod.partition("=")
            if key not in ARM_KEYS or not value:
                raise UsageError(f"--arms {name!r}: modifier {mod!r} must be weighting=W or density=P")
            arm[key] = value
        try:
            make_objective(arm["objective"], weighting=arm["weighting"], density=arm["density"])
        except ValueError as e:
            raise UsageError(f"--arms {name!r}: {e}") from None
        if name in arms:
            raise UsageError(f"--arms: {name!r} given twice")
        arms[name] = arm
    if not arms:
        raise UsageError("--arms: no arms given")
    return arms


# ----------------------------------------------------------------------------
# evaluation set
# ----------------------------------------------------------------------------

class EvalSet:
    """Fixed noisy rows at EVAL_LEVELS noise levels and their exact denoised values."""

    def __init__(self, data: torch.Tensor, shape: tuple, mixture: GaussianMixture | None, rows: int, seed: int,
                 process):
        g = torch.Generator().manual_seed(seed + 7919)
        self.lam = torch.linspace(process.lam_max, process.lam_min, EVAL_LEVELS, dtype=torch.float64)
        self.sigma = torch.exp(-0.5 * self.lam)
        self.dlam = float(process.lam_max - process.lam_min) / (EVAL_LEVELS - 1)
        self.shape, self.D = shape, math.prod(shape)
        flat = data.reshape(len(data), -1)
        self.x, self.ref_mix, self.ref_emp = [], [], []
        for s in self.sigma.tolist():
            if mixture is not None:
                y = mixture.sample(rows, generator=g).reshape(rows, -1)
            else:
                y = flat[torch.randint(len(flat), (rows,), generator=g)].double()
            x = (y + s * torch.randn(y.shape, generator=g, dtype=torch.float64)).float()
            self.x.append(x)
            self.ref_emp.append(fastdiff.stf_target(x, s, flat).double())
            self.ref_mix.append(mixture.denoiser(x.double(), s) if mixture is not None else None)
        bands = torch.arange(EVAL_LEVELS) * EVAL_BANDS // EVAL_LEVELS
        self.bands = bands.tolist()
        self.band_sigma = [[float(self.sigma[bands == b].min()), float(self.sigma[bands == b].max())]
                           for b in range(EVAL_BANDS)]

    @torch.no_grad()
    def errors(self, obj, net) -> dict:
        """Per-level errors in eps units against both references."""
        out = {"err": [], "err_emp": []}
        for s, x, rm, re in zip(self.sigma.tolist(), self.x, self.ref_mix, self.ref_emp):
            den = obj.param.denoise(net, x.reshape(-1, *self.shape), s).reshape(len(x), -1).double()
            scale = 1.0 / (s * s * self.D)
            out["err_emp"].append(float((den - re).pow(2).sum(1).mean()) * scale)
            if rm is not None:
                out["err"].append(float((den - rm).pow(2).sum(1).mean()) * scale)
        if not out["err"]:
            del out["err"]
        return out

    def weighted(self, per_level: list, weighting) -> float:
        w = weighting(self.lam).double()
        return float((w * torch.tensor(per_level, dtype=torch.float64)).sum()) * self.dlam

    def banded(self, per_level: list) -> list:
        sums = [0.0] * EVAL_BANDS
        counts = [0] * EVAL_BANDS
        for b, e in zip(self.bands, per_level):
            sums[b] += e
            counts[b] += 1
        return [s / c for s, c in zip(sums, counts)]


# ----------------------------------------------------------------------------
# one arm, one seed
# ----------------------------------------------------------------------------

def _eval_steps(steps: int, evals: int) -> list[int]:
    """Evaluation steps: roughly log-spaced early, never step 0, always the last."""
    pts = {max(1, round(steps * (i / evals) ** 1.5)) for i in range(1, evals + 1)}
    return sorted(pts | {steps})


def run_arm(arm: dict, seed: int, cfg: dict, dataset, evalset: EvalSet, fid_eval=None, progress=None) -> dict:
    """Trains one arm with one seed and returns its curves (see the module docstring)."""
    from fastdiff.train import make_step
    device = torch.device("cpu")
    torch.manual_seed(seed)                           # the same initial network for every arm
    net = build_net(cfg["model"], cfg["preset"], dataset.shape).train()
    obj = make_objective(arm["objective"], process="edm", param="edm", weighting=arm["weighting"],
                         density=arm["density"], sigma_data=cfg["sigma_data"])
    all_ref = None
    if arm["ref"] == "all":
        all_ref = dataset.get(torch.arange(len(dataset)))

        def whole_set_target(x, sigma, ref, **kw):     # the whole training set as the reference batch
            return fastdiff.stf_target(x, sigma, all_ref, **kw)
        obj.stf_target_fn = whole_set_target
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(list(net.parameters()) + list(obj.parameters()), lr=cfg["lr"])
    step_fn = make_step(net, obj, opt, device=device, bf16=False, compile=False, grad_clip=cfg["grad_clip"])
    sampler = Sampler(len(dataset), cfg["batch"], seed)   # the same data order for every arm
    torch.manual_seed(seed + 1)                           # and the same noise draws where arms draw alike
    n_extra = arm["ref"] - cfg["batch"] if isinstance(arm["ref"], int) else 0
    own_w = get_weighting(arm["weighting"], sigma_data=cfg["sigma_data"])
    edm_w = get_weighting("edm", sigma_data=cfg["sigma_data"])
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    curves = {"step": [], "wall": [], "cpu": [], "loss": []}
    wall, cpu, loss_sum, loss_n = 0.0, 0.0, 0.0, 0
    evals = set(_eval_steps(cfg["steps"], cfg["evals"]))
    for step in range(1, cfg["steps"] + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        idx, _ = sampler.next_batch()
        y = dataset.get(idx)
        extra = dataset.get(sampler.ref_rows(n_extra)[0]) if n_extra > 0 else None
        lr = cfg["lr"] * min(1.0, step / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]
        loss, _ = step_fn(y, extra, lr)
        # EMA as fastdiff.train keeps it: half-life min(ema, images seen * rampup)
        halflife = min(cfg["ema"], step * cfg["batch"] * cfg["ema_rampup"])
        torch._foreach_lerp_(ema_params, net_params, 1 - 0.5 ** (cfg["batch"] / max(halflife, 1e-8)))
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
        loss_sum += float(loss.detach())
        loss_n += 1
        if progress is not None:
            progress.update(1)
        if step in evals:
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"arm {arm} seed {seed}: the loss became {loss_sum} by step {step}")
            errs = evalset.errors(obj, ema)
            curves["step"].append(step)
            curves["wall"].append(wall)
            curves["cpu"].append(cpu)
            curves["loss"].append(loss_sum / loss_n)
            loss_sum, loss_n = 0.0, 0
            for key, per_level in errs.items():
                curves.setdefault(key, []).append(evalset.weighted(per_level, edm_w))
                curves.setdefault(key + "_own", []).append(evalset.weighted(per_level, own_w))
                curves.setdefault(key + "_bands", []).append(evalset.banded(per_level))
            if fid_eval is not None and (step == cfg["steps"] or len(curves["step"]) % cfg["fid_every"] == 0):
                curves.setdefault("fid_step", []).append(step)
                curves.setdefault("fid", []).append(fid_eval(obj, ema, seed))
    curves["seconds_per_step"] = wall / cfg["steps"]
    curves["cpu_seconds_per_step"] = cpu / cfg["steps"]
    return curves


def make_fid_eval(dataset, cfg: dict):
    """proxy FID of cfg['fid_samples'] EMA samples against the data set (fastdiff.eval.proxy)."""
    from fastdiff import eval as fd_eval
    from fastdiff.train import generate
    real = dataset.get(torch.arange(len(dataset)))
    labels = None if dataset.labels is None else dataset.labels.cpu()     # as fastdiff.train's proxy
    net = fd_eval.train_proxy(real, labels, steps=cfg["proxy_steps"], seed=0)
    real_stats = fd_eval.feature_stats(fd_eval.extract(net, real))

    def fid_eval(obj, ema, seed: int) -> float:
        samples = torch.cat(list(generate(obj, ema, dataset.shape, cfg["fid_samples"], seed=seed + 1,
                                          steps=cfg["sample_steps"], device=torch.device("cpu"))))
        mu, cov = fd_eval.feature_stats(fd_eval.extract(net, samples))
        return fd_eval.frechet_distance(mu, cov, *real_stats)
    return fid_eval


# ----------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def _t975(dof: int) -> float:
    return _T975.get(dof, 1.96 + 2.5 / dof)          # within 1% of Student's t for dof > 10


def steps_to_reach(steps: list, err: list, threshold: float) -> float | None:
    """First step where err <= threshold, interpolated in log(err) between evaluations; None if never."""
    prev = None
    for s, e in zip(steps, err):
        if e <= threshold:
            if prev is None or prev[1] <= 0 or e <= 0:
                return float(s)
            (s0, e0) = prev
            f = (math.log(e0) - math.log(threshold)) / (math.log(e0) - math.log(e))
            return s0 + f * (s - s0)
        prev = (s, e)
    return None


def _mean_ci(vals: list) -> dict:
    k = len(vals)
    mean = sum(vals) / k
    if k < 2:
        return {"mean": mean, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (k - 1))
    half = _t975(k - 1) * sd / math.sqrt(k)
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def summarize(results: dict, metric: str, total_steps: int, baseline: str = "dsm") -> dict:
    """Per arm: final error (mean, CI), steps to reach the baseline's mean final error (mean, CI,
    per seed) and the implied speed-up total_steps / steps."""
    out = {"metric": metric, "baseline": baseline if baseline in results else None, "arms": {}}
    threshold = None
    if baseline in results:
        finals = [r[metric][-1] for r in results[baseline].values()]
        threshold = sum(finals) / len(finals)
        out["threshold"] = threshold
    for arm, seeds in results.items():
        finals = [r[metric][-1] for r in seeds.values()]
        entry = {"final": _mean_ci(finals),
                 "seconds_per_step": _mean_ci([r["seconds_per_step"] for r in seeds.values()]),
                 "cpu_seconds_per_step": _mean_ci([r.get("cpu_seconds_per_step", float("nan"))
                                                   for r in seeds.values()])}
        if threshold is not None:
            per_seed = [steps_to_reach(r["step"], r[metric], threshold) for r in seeds.values()]
            reached = [s for s in per_seed if s is not None]
            entry["steps_to_baseline_final"] = {"per_seed": per_seed, "reached": f"{len(reached)}/{len(per_seed)}",
                                                **(_mean_ci(reached) if reached else {"mean": None, "ci95": None})}
            if len(reached) == len(per_seed):
                entry["speedup"] = total_steps / entry["steps_to_baseline_final"]["mean"]
        if "fid" in next(iter(seeds.values())):
            entry["final_fid"] = _mean_ci([r["fid"][-1] for r in seeds.values()])
        out["arms"][arm] = entry
    return out


# ----------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------

def _band(ax, xs, ys, color, label):
    import numpy as np
    y = np.array(ys, dtype=float)
    x = np.array(xs, dtype=float).mean(0)
    ax.plot(x, y.mean(0), color=color, lw=1.6, label=label)
    if len(y) > 1:
        ax.fill_between(x, y.min(0), y.max(0), color=color, alpha=0.18, lw=0)


def plot(study: dict, path: str) -> None:
    """study.png: error vs steps and vs wall-clock (mean over seeds, band min..max), final error per
    sigma band, and proxy FID vs steps on images."""
    plt = _pyplot()
    res, metric = study["results"], study["summary"]["metric"]
    has_fid = any("fid" in r for seeds in res.values() for r in seeds.values())
    ncols = 4 if has_fid else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 4.0), dpi=110)
    cmap = plt.get_cmap("tab10")
    for j, (arm, seeds) in enumerate(res.items()):
        runs = list(seeds.values())
        c = cmap(j % 10)
        _band(axes[0], [r["step"] for r in runs], [r[metric] for r in runs], c, arm)
        _band(axes[1], [r["cpu"] for r in runs], [r[metric] for r in runs], c, arm)
        bands = [r[metric + "_bands"][-1] for r in runs]
        centers = [math.sqrt(a * b) for a, b in study["settings"]["band_sigma"]]
        _band(axes[2], [centers] * len(runs), bands, c, arm)
        if has_fid:
            _band(axes[3], [r["fid_step"] for r in runs], [r["fid"] for r in runs], c, arm)
    if study["summary"].get("threshold") is not None:
        for ax in axes[:2]:
            ax.axhline(study["summary"]["threshold"], color="0.5", ls=":", lw=1)
    what = "vs exact denoiser" if metric == "err" else "vs empirical post. mean"
    axes[0].set(xlabel="training step", ylabel=f"denoiser error {what}\n(EDM-weighted, eps units)", yscale="log")
    axes[1].set(xlabel="training time (process CPU s, 1 thread)", yscale="log")
    axes[2].set(xlabel="sigma (band centre)", ylabel="final error per band (eps units)", xscale="log", yscale="log")
    if has_fid:
        axes[3].set(xlabel="training step", ylabel="proxy FID", yscale="log")
    axes[0].legend(fontsize=8)
    s = study["settings"]
    fig.suptitle(f"{s['data']}: {s['model']}/{s['preset']}, {s['steps']} steps x batch {s['batch']}, "
                 f"{len(s['seeds'])} seeds (band: min..max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=TOOL, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default="gmm", help="gmm | digits | a folder / .zip of images | an .npz array")
    a("--arms", default="dsm,stf-256,stf-all,sigmoid,adaptive", help="see the module docstring")
    a("--steps", type=int, default=600, help="training steps per arm and seed")
    a("--seeds", type=int, default=3, help="seeds 0 .. K-1 for every arm")
    a("--out", required=True, help="output directory")
    a("--batch", type=int, default=128)
    a("--lr", type=float, default=1e-3)
    a("--warmup", type=int, default=50, help="linear learning-rate warmup, steps")
    a("--grad-clip", type=float, default=1.0)
    a("--ema", type=float, default=500_000, help="EMA half-life in images (as fastdiff.train)")
    a("--ema-rampup", type=float, default=0.05)
    a("--sigma-data", type=float, default=0.5)
    a("--model", default=None, help="mlp | unet (default: mlp for vectors, unet for images)")
    a("--preset", default=None, help="network size (default: small MLP, tiny U-Net)")
    a("--evals", type=int, default=10, help="evaluations per run")
    a("--eval-rows", type=int, default=256, help="evaluation rows per noise level")
    a("--fid-every", type=int, default=3, help="images: proxy FID at every k-th evaluation and the last")
    a("--fid-samples", type=int, default=500, help="images: samples per proxy FID")
    a("--sample-steps", type=int, default=18, help="images: Heun steps per sample")
    a("--proxy-steps", type=int, default=200, help="images: training steps of the proxy-FID classifier")
    a("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    a("--no-plot", action="store_true", help="write only study.json (no matplotlib needed)")
    return p


def _settings_key(cfg: dict) -> str:
    keep = {k: v for k, v in cfg.items() if k not in ("out", "seeds", "arms", "threads", "no_plot")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def run_study(cfg: dict, progress: bool = True) -> dict:
    """Runs (or reuses from DIR/runs) every arm x seed and writes study.json and study.png."""
    for key in ("steps", "seeds", "batch", "evals", "eval_rows", "fid_samples", "sample_steps", "proxy_steps",
                "warmup"):
        if cfg[key] < (0 if key == "warmup" else 1):
            raise UsageError(f"--{key.replace('_', '-')} must be >= {0 if key == 'warmup' else 1}, got {cfg[key]}")
    try:
        dataset = load_dataset(cfg["data"])
    except DataError as e:
        raise UsageError(str(e)) from None
    arms = parse_arms(cfg["arms"], cfg["batch"])
    if cfg["model"] is None:
        cfg["model"] = "unet" if dataset.is_image else "mlp"
    if cfg["preset"] is None:
        cfg["preset"] = "tiny" if dataset.is_image else "small"
    try:
        build_net(cfg["model"], cfg["preset"], dataset.shape)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    mixture = GaussianMixture.ring(n_components=8, radius=1.0, std=0.05, dim=2) if cfg["data"] == "gmm" else None
    from fastdiff.diffusion import get_process
    evalset = EvalSet(dataset.get(torch.arange(len(dataset))), dataset.shape, mixture, cfg["eval_rows"], 0,
                      get_process("edm"))
    cfg = {**cfg, "band_sigma": evalset.band_sigma}
    key = _settings_key(cfg)
    runs_dir = os.path.join(cfg["out"], "runs")
    os.makedirs(runs_dir, exist_ok=True)
    fid_eval = make_fid_eval(dataset, cfg) if dataset.is_image else None
    seeds = list(range(cfg["seeds"]))
    from tqdm import tqdm
    bar = tqdm(total=len(arms) * len(seeds) * cfg["steps"], unit="step", disable=not progress, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)
    results, t_start = {}, time.perf_counter()
    for name, arm in arms.items():
        results[name] = {}
        for seed in seeds:
            path = os.path.join(runs_dir, f"{name}__seed{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    saved = json.load(f)
                if saved.get("key") == key:
                    results[name][str(seed)] = saved["curves"]
                    bar.update(cfg["steps"])
                    continue
            curves = run_arm(arm, seed, cfg, dataset, evalset, fid_eval, bar)
            with open(path + ".tmp", "w") as f:
                json.dump({"key": key, "arm": arm, "seed": seed, "curves": curves}, f)
            os.replace(path + ".tmp", path)
            results[name][str(seed)] = curves
    bar.close()
    metric = "err" if mixture is not None else "err_emp"
    study = {"settings": {**cfg, "seeds": seeds, "arm_specs": arms, "metric": metric,
                          "eval_sigma": evalset.sigma.tolist(), "seconds": round(time.perf_counter() - t_start, 1),
                          "threads": torch.get_num_threads(),
                          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
             "results": results, "summary": summarize(results, metric, cfg["steps"])}
    with open(os.path.join(cfg["out"], "study.json"), "w") as f:
        json.dump(study, f, indent=1)
    return study


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = {k: v for k, v in vars(args).items()}
    try:
        if not cfg["no_plot"]:
            _pyplot()                            # before the work, not after it
        os.makedirs(cfg["out"], exist_ok=True)
        study = run_study(cfg)
        if not cfg["no_plot"]:
            plot(study, os.path.join(cfg["out"], "study.png"))
    except (UsageError, MissingDependency) as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 2
    summ = study["summary"]
    print(f"{TOOL}: wrote {os.path.join(cfg['out'], 'study.json')} ({study['settings']['seconds']:.0f} s); "
          f"{summ['metric']} final (mean over seeds) and steps to reach {summ['baseline']}'s final:")
    for arm, e in summ["arms"].items():
        reach = e.get("steps_to_baseline_final", {})
        print(f"  {arm:>12}: final {e['final']['mean']:.4g}, steps {reach.get('mean') or float('nan'):.0f} "
              f"({reach.get('reached', '-')} seeds reached)" + (f", speed-up {e['speedup']:.2f}x" if "speedup" in e
                                                                else "")
              + (f", proxy FID {e['final_fid']['mean']:.2f}" if "final_fid" in e else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
