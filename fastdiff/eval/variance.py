"""Target-variance diagnostics of Stable Target Field (Xu, Tong & Jaakkola, ICLR 2023, sections 3, 5.2, 6.1).

    python -m fastdiff.eval.variance --data two-gaussians --process edm --n 1,2,16,128,1024,all --out DIR

For noisy x = y + sigma n (VE form) with y drawn from the data set, over a grid of sigma:

  V_DSM(sigma)     E_x tr Cov[target | x] of the DSM target: the posterior p(y | x)'s
                   trace of covariance, computed exactly over the whole data set.
  V_STF(sigma; n)  the same for the STF target with a reference batch of n rows: the
                   source y ~ p(y | x) plus n - 1 draws from the data (Xu et al. eq. 6);
                   estimated without bias as E 1/2 ||t1 - t2||^2 over two independent
                   (source, reference) draws for the same x. n = 1 is DSM itself (the
                   target is the source), so V_STF(1) = V_DSM exactly; n = "all" is the
                   whole data set as reference, whose target is the posterior mean, a
                   function of x alone: V_STF(all) = 0 exactly.
  D(sigma)         E_x KL(p(y | x) || p_data), in nats, with p_data the data set's
                   empirical distribution: log N in the near field, 0 in the far field.

Units (--units). "eps" (default): the variance of the eps-target (x - y) / sigma per
dimension, tr Cov[y | x] / (sigma^2 D). This is the score target's covariance times
sigma^2 / D: the score model of the paper is trained with Song et al.'s weighting
lambda(sigma) = sigma^2, so sigma^2 tr Cov[score target] is the variance that enters its
loss, and fastdiff's losses average over dimensions. "score": the paper's tr Cov of the
score target grad log p(x_t | y) of the chosen process, tr Cov[y | x] / (alpha^2 sigma^4)
(alpha = 1 for ve and edm); it spans ~1e20 over [0.002, 80], which hides the phases.
Ratios V_STF / V_DSM are the same in both. In the near field the values fall below 1e-30
and reach exactly 0: the posterior weights come from stf_weights in float32, so a weight
under ~1e-45 is 0; the error this makes is below ~N 1e-38 diam(data)^2 in absolute terms.

The posteriors come from fastdiff's fused op: stf_weights for p(y | x) over the whole set
(V_DSM, D, and the resampled source), stf_target for every STF target. Cost per sigma:
samples x N x D for the posterior, samples x n x D for each n (n = all costs nothing).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

import fastdiff
from fastdiff.data import DataError, load_dataset
from fastdiff.diffusion import get_process

__all__ = ["two_gaussians", "load_vectors", "posterior_stats", "stf_pair_variance", "compute", "plot", "main"]

TOOL = "fastdiff.eval.variance"
UNITS = ("eps", "score")

# The paper's synthetic set (section 3): a 64-dimensional mixture of two Gaussians. Its exact
# parameters were not at hand; these put the data in [-1, 1] like images and give clearly
# separated near-field, intermediate and far-field phases on [0.002, 80].
TWO_GAUSSIANS = {"dim": 64, "size": 4096, "means": [0.5, -0.5], "std": 0.2, "weights": [0.5, 0.5]}


class UsageError(ValueError):
    """A bad command-line value; the message names the option."""


class MissingDependency(RuntimeError):
    """An optional package the command needs is not installed."""


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def two_gaussians(size: int = TWO_GAUSSIANS["size"], seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(data (size, 64) float32, parameters): equal-weight N(+0.5 * 1, 0.2^2 I) and N(-0.5 * 1, 0.2^2 I)."""
    p = TWO_GAUSSIANS
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(torch.tensor(p["weights"], dtype=torch.float64), size, replacement=True, generator=g)
    means = torch.tensor(p["means"], dtype=torch.float64)[k, None].expand(size, p["dim"])
    y = means + p["std"] * torch.randn(size, p["dim"], generator=g, dtype=torch.float64)
    params = {**p, "size": size, "seed": seed,
              "description": f"{p['dim']}-d mixture of N(m 1, {p['std']}^2 I) for m in {p['means']}, "
                             f"weights {p['weights']}; {size} samples drawn with seed {seed}"}
    return y.float(), params


def load_vectors(spec: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The data set named by spec as (N, D) float32 rows, and a description for the output."""
    if spec == "two-gaussians":
        return two_gaussians(seed=seed)
    try:
        ds = load_dataset(spec)
    except DataError as e:
        raise UsageError(f"{e} (or use 'two-gaussians')") from None
    y = ds.get(torch.arange(len(ds))).reshape(len(ds), -1).contiguous()
    return y, {"name": spec, "size": len(ds), "shape": list(ds.shape)}


# ----------------------------------------------------------------------------
# the estimates
# ----------------------------------------------------------------------------

def _row_chunk(N: int) -> int:
    return max(1, min(4096, (1 << 22) // max(N, 1)))      # B x N float64 weights: <= 32 MiB


@torch.no_grad()
def posterior_stats(x: torch.Tensor, sigma: float, data: torch.Tensor, generator: torch.Generator | None = None):
    """Exact posterior over the whole data set for rows x (B, D) at noise sigma.

    Returns (var, kl, draw): var (B,) = tr Cov[y | x] in float64, kl (B,) = KL(p(y | x) ||
    uniform over data) in nats, draw (B,) = one index sampled from p(y | x) per row.
    """
    N = data.shape[0]
    var = torch.empty(x.shape[0], dtype=torch.float64)
    kl = torch.empty(x.shape[0], dtype=torch.float64)
    draw = torch.empty(x.shape[0], dtype=torch.long)
    data64 = data.double()
    norms = (data64 * data64).sum(1)
    step = _row_chunk(N)
    for i in range(0, x.shape[0], step):
        w = fastdiff.stf_weights(x[i:i + step], sigma, data).double()
        # Renormalized in float64, w is a distribution within 1e-7 (relative, per entry) of the exact
        # posterior, so its variance is within 1e-7 relative: the float32 rounding of the weights
        # multiplies ||r_k - m||^2, never ||r_k||^2. The float64 expansion below then loses only
        # ~1e-16 ||r||^2 absolute to cancellation.
        w = w / w.sum(1, keepdim=True)
        m = w @ data64
        var[i:i + step] = w @ norms - (m * m).sum(1)
        kl[i:i + step] = math.log(N) + torch.special.xlogy(w, w).sum(1)
        u = torch.rand(w.shape[0], 1, generator=generator, dtype=torch.float64)
        draw[i:i + step] = torch.searchsorted(w.cumsum_(1), u)[:, 0].clamp_max(N - 1)
    return var.clamp_min(0), kl.clamp_min(0), draw


@torch.no_grad()
def stf_pair_variance(x: torch.Tensor, sigma: float, data: torch.Tensor, src1: torch.Tensor, src2: torch.Tensor,
                      n: int, generator: torch.Generator | None = None, group: int = 8) -> torch.Tensor:
    """Per-row unbiased estimates of tr Cov[STF target | x] with a reference batch of n rows.

    src1, src2 (B,): two independent draws of the source index from p(y | x). For each, the
    rows are taken in groups of G = min(n, group); a group's reference batch is its G
    sources plus n - G uniform draws (with replacement) from data, so for every row the
    reference is its own source plus n - 1 independent draws from the data, as in Xu et
    al. eq. 6 (rows of a group share draws; that correlates rows, not a row's estimate).
    Returns 1/2 ||t1 - t2||^2 (B,) in float64.
    """
    B, N = x.shape[0], data.shape[0]
    G = max(1, min(n, group))
    targets = []
    for src in (src1, src2):
        t = torch.empty_like(x)
        for i in range(0, B, G):
            rows = src[i:i + G]
            extra = n - rows.shape[0]
            idx = rows if extra == 0 else torch.cat([rows, torch.randint(N, (extra,), generator=generator)])
            t[i:i + G] = fastdiff.stf_target(x[i:i + G], sigma, data[idx])
        targets.append(t.double())
    return 0.5 * (targets[0] - targets[1]).pow(2).sum(1)


# Rows per stf_target call in stf_pair_variance: rows of a call share their reference draws, so
# samples / GROUP calls give ~samples / GROUP independent estimates (in the far field a call's
# rows all see nearly the same target). Smaller is less noisy per sample, slower per sample.
GROUP = 8


def _unit_scale(units: str, sigma: float, D: int, alpha: float) -> float:
    """Factor turning tr Cov[y | x] into the reported units (see the module docstring)."""
    return 1.0 / (sigma * sigma * D) if units == "eps" else 1.0 / (alpha * alpha * sigma ** 4)


def _mean_se(v: torch.Tensor, group: int = 1) -> tuple[float, float]:
    """Mean and standard error of per-row values; rows in consecutive groups of `group` are
    correlated (they share reference draws), so the error is taken over group means."""
    k = v.numel() // group
    g = v[:k * group].reshape(k, group).mean(1) if k > 0 else v
    return float(v.mean()), float(g.std() / math.sqrt(g.numel())) if g.numel() > 1 else float("nan")


def compute(data: torch.Tensor, sigmas, ns, *, samples: int = 4096, seed: int = 0, process: str = "edm",
            units: str = "eps", progress: bool = False) -> dict:
    """V_DSM, V_STF (per n) and D on the sigma grid; see the module docstring.

    data (N, D) float32; ns: ints >= 1 and/or "all". Returns the dict written to variance.json.
    """
    if units not in UNITS:
        raise UsageError(f"--units must be one of {list(UNITS)}, got {units!r}")
    proc = get_process(process)
    N, D = data.shape
    gen = torch.Generator().manual_seed(seed)
    out = {"sigma": [float(s) for s in sigmas], "t": [], "V_DSM": [], "V_DSM_se": [], "D": [],
           "V_STF": {str(n): [] for n in ns}, "V_STF_se": {str(n): [] for n in ns}}
    from tqdm import tqdm
    bar = tqdm(total=len(sigmas) * (1 + len(ns)), unit="est", disable=not progress, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30.0)
    for sigma in out["sigma"]:
        sig_t = torch.tensor(sigma, dtype=torch.float64)
        out["t"].append(float(proc.t_of_sigma_ve(sig_t)))
        alpha = float(proc.alpha_of_sigma_ve(sig_t))
        scale = _unit_scale(units, sigma, D, alpha)
        idx = torch.randint(N, (samples,), generator=gen)
        x = data[idx] + sigma * torch.randn(samples, D, generator=gen)
        var, kl, src2 = posterior_stats(x, sigma, data, generator=gen)
        m, se = _mean_se(var * scale)
        out["V_DSM"].append(m)
        out["V_DSM_se"].append(se)
        out["D"].append(float(kl.mean()))
        bar.update(1)
        for n in ns:
            if n == "all" or n == 1:
                # all: the target is the posterior mean, a function of x alone; 1: the target is the source
                m, se = (0.0, 0.0) if n == "all" else (out["V_DSM"][-1], out["V_DSM_se"][-1])
            else:
                m, se = _mean_se(stf_pair_variance(x, sigma, data, idx, src2, n, generator=gen, group=GROUP) * scale,
                                 min(n, GROUP))
            out["V_STF"][str(n)].append(m)
            out["V_STF_se"][str(n)].append(se)
            bar.update(1)
    bar.close()
    out["phases"] = phases(out["sigma"], out["V_DSM"])
    out["far_field_ratio"] = {str(n): out["V_STF"][str(n)][-1] / out["V_DSM"][-1] if out["V_DSM"][-1] > 0 else None
                              for n in ns}
    return out


def phases(sigmas, v_dsm) -> dict:
    """The intermediate phase: where V_DSM is at least half its peak; near field below, far field above."""
    peak = max(range(len(v_dsm)), key=lambda i: v_dsm[i])
    if not v_dsm[peak] > 0:                    # the whole grid in the near field: no peak to mark
        return {"peak_sigma": None, "peak_V_DSM": 0.0, "intermediate": None, "peak_inside_grid": False}
    half = 0.5 * v_dsm[peak]
    lo = hi = peak
    while lo > 0 and v_dsm[lo - 1] >= half:
        lo -= 1
    while hi < len(v_dsm) - 1 and v_dsm[hi + 1] >= half:
        hi += 1
    return {"peak_sigma": sigmas[peak], "peak_V_DSM": v_dsm[peak], "intermediate": [sigmas[lo], sigmas[hi]],
            "peak_inside_grid": 0 < peak < len(v_dsm) - 1}


# ----------------------------------------------------------------------------
# plot
# ----------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("plots need matplotlib: pip install matplotlib, or pass --no-plot") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(result: dict, path: str, title: str | None = None) -> None:
    """variance.png: V_DSM and V_STF (log-log) with the three phases marked, D on the right axis."""
    plt = _pyplot()
    s = result["sigma"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ph = result["phases"]
    if ph["intermediate"] is not None:
        lo, hi = ph["intermediate"]
        ax.axvspan(lo, hi, color="0.9", zorder=0)
        for x_text, label in ((math.sqrt(s[0] * lo), "near field"), (math.sqrt(lo * hi), "intermediate"),
                              (math.sqrt(hi * s[-1]), "far field")):
            ax.text(x_text, 1.02, label, transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9)
    ax.plot(s, result["V_DSM"], color="k", lw=2.2, label="V_DSM")
    zero = []
    cmap = plt.get_cmap("viridis")
    keys = [k for k in result["V_STF"] if k != "1"]
    for j, k in enumerate(keys):
        v = result["V_STF"][k]
        if not any(val > 0 for val in v):
            zero.append(k)
            continue
        ax.plot(s, [val if val > 0 else float("nan") for val in v], color=cmap(j / max(1, len(keys) - 1)),
                lw=1.4, label=f"V_STF, n={k}")
    if zero:
        ax.plot([], [], " ", label=f"V_STF, n={', '.join(zero)}: 0 (exact mean)")
    ax.set_xscale("log")
    ax.set_yscale("log" if ph["peak_V_DSM"] > 0 else "linear")     # all zero: nothing to show on log axes
    # Near-field values fall to 1e-90 and below (the posterior sits on one sample; with float32
    # weights they end at exactly 0): show seven decades under the peak, where the far field lies.
    if ph["peak_V_DSM"] > 0:
        ax.set_ylim(ph["peak_V_DSM"] * 1e-7, ph["peak_V_DSM"] * 3)
    ax.set_xlabel("sigma (VE noise level)")
    units = result.get("settings", {}).get("units", "eps")
    ax.set_ylabel("tr Cov of the target / D  (eps units)" if units == "eps" else "tr Cov of the score target")
    ax2 = ax.twinx()
    ax2.plot(s, result["D"], color="tab:red", ls="--", lw=1.2, label="D = KL(posterior || data)")
    ax2.set_ylabel("D (nats)", color="tab:red")
    ax2.tick_params(axis="y", colors="tab:red")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower left")
    if title:
        ax.set_title(title, fontsize=10, pad=18)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line, exit 2, like every fastdiff tool
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_ns(text: str) -> list:
    """'1,2,16,all' -> [1, 2, 16, 'all'] (in the given order, duplicates dropped)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "all":
            n = "all"
        else:
            try:
                n = int(part)
            except ValueError:
                raise UsageError(f"--n: expected positive integers or 'all', got {part!r}") from None
            if n < 1:
                raise UsageError(f"--n: a reference batch needs n >= 1 (the source itself), got {n}")
        if n not in out:
            out.append(n)
    if not out:
        raise UsageError("--n: empty list; give e.g. 1,2,16,128,all")
    return out


def parse_sigmas(text: str | None, process: str, count: int = 41) -> list[float]:
    """'0.01,0.1,1' (a list) or 'lo:hi:count' (log-spaced); None: count points over the process's range."""
    try:
        proc = get_process(process)
    except ValueError as e:
        raise UsageError(f"--process: {e}") from None
    if text is None:
        lo, hi = proc.sigma_min, proc.sigma_max
    elif ":" in text:
        parts = text.split(":")
        try:
            lo, hi, count = float(parts[0]), float(parts[1]), int(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise UsageError(f"--sigmas: expected lo:hi:count, got {text!r}") from None
        if not (0 < lo < hi and math.isfinite(hi)):
            raise UsageError(f"--sigmas: need 0 < lo < hi, got {lo}:{hi}")
        if count < 1:
            raise UsageError(f"--sigmas: empty sigma grid (count {count}); give at least one point")
    else:
        try:
            vals = [float(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise UsageError(f"--sigmas: expected numbers separated by commas or lo:hi:count, got {text!r}") from None
        if not vals:
            raise UsageError("--sigmas: empty sigma grid; give e.g. 0.002:80:41 or 0.1,1,10")
        bad = [v for v in vals if not (v > 0 and math.isfinite(v))]
        if bad:
            raise UsageError(f"--sigmas: every sigma must be positive and finite, got {bad[0]}")
        return sorted(set(vals))
    if count == 1:
        return [lo]
    return [lo * (hi / lo) ** (i / (count - 1)) for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=TOOL, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="two-gaussians",
                   help="two-gaussians | digits | gmm | a folder / .zip of images | an .npz array")
    p.add_argument("--process", default="edm", help="ve | vp | edm: sets the default sigma range and the "
                                                    "score units")
    p.add_argument("--n", default="1,2,16,128,1024,all", help="reference batch sizes, incl. 'all'")
    p.add_argument("--sigmas", default=None, help="lo:hi:count (log-spaced) or a comma list "
                                                  "(default: 41 points over the process's range)")
    p.add_argument("--samples", type=int, default=4096, help="noisy samples per sigma")
    p.add_argument("--units", default="eps", choices=list(UNITS), help="see the module docstring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    p.add_argument("--out", required=True, help="output directory (variance.json, variance.png)")
    p.add_argument("--no-plot", action="store_true", help="write only variance.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ns = parse_ns(args.n)
        sigmas = parse_sigmas(args.sigmas, args.process)
        if args.samples < 2:
            raise UsageError(f"--samples must be >= 2 (standard errors need two), got {args.samples}")
        if not args.no_plot:
            _pyplot()                            # before the work, not after it
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        data, info = load_vectors(args.data, seed=args.seed)
        os.makedirs(args.out, exist_ok=True)
        t0 = time.perf_counter()
        result = compute(data, sigmas, ns, samples=args.samples, seed=args.seed, process=args.process,
                         units=args.units, progress=True)
        settings = {"data": args.data, "data_info": info, "process": args.process, "n": [str(n) for n in ns],
                    "samples": args.samples, "seed": args.seed, "units": args.units, "N": data.shape[0],
                    "D": data.shape[1], "seconds": round(time.perf_counter() - t0, 2),
                    "threads": torch.get_num_threads(), "command": " ".join(["python -m", TOOL, *sys.argv[1:]])
                    if argv is None else " ".join(["python -m", TOOL, *argv])}
        result = {**result, "settings": settings}
        with open(os.path.join(args.out, "variance.json"), "w") as f:
            json.dump(result, f, indent=1)
        if not args.no_plot:
            plot(result, os.path.join(args.out, "variance.png"),
                 title=f"{args.data} (N={data.shape[0]}, D={data.shape[1]}), {args.process}")
    except (UsageError, DataError, MissingDependency) as e:
        print(f"{TOOL}: error: {e}", file=sys.stderr)
        return 2
    ph = result["phases"]
    where = (f"V_DSM peaks at sigma {ph['peak_sigma']:.3g}, intermediate phase {ph['intermediate'][0]:.3g}.."
             f"{ph['intermediate'][1]:.3g}" if ph["intermediate"] else "V_DSM is 0 on the whole grid (near field)")
    print(f"{TOOL}: wrote {os.path.join(args.out, 'variance.json')} ({settings['seconds']:.1f} s); {where}; "
          f"far-field V_STF/V_DSM: " + ", ".join(f"n={k}: {v:.3g}" for k, v in result["far_field_ratio"].items()
                                                if v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
