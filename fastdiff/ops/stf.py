"""The Stable Target Field target (Xu, Tong & Jaakkola, ICLR 2023).

For noisy rows x_i = y_i + sigma_i n_i (VE form) and a reference batch ref
(N clean samples, the sources y_i among them):

    l_ik = -||x_i - ref_k||^2 / (2 sigma_i^2)
    t_i  = sum_k softmax_k(l_ik) ref_k          lse_i = logsumexp_k(l_ik)

This module holds the public functions, their argument checks, the
torch.library registration and the plain-PyTorch backend. The other backends
(C++ in csrc/, Triton in kernels/) implement the same backend contract:

    impl(x, sigma, ref, precision, t_out, lse_out[, labels=, ref_labels=, ref_logw=]) -> None

with x (B, D) and ref (N, D) contiguous in any float dtype, sigma (B,) float32,
t_out (B, D) in x's dtype and lse_out (B,) float64, all on one device; the
impl writes every element of t_out and lse_out. The keyword arguments come
only where the caller gave them (the plain call is unchanged): labels (B,) and
ref_labels (N,) int64, ref_logw (N,) float64, contiguous, on x's device. They
add b_ik = ref_logw_k (0 without), or -inf where ref_labels_k != labels_i, to
each logit: l_ik + b_ik. A row whose every b_ik is -inf gets t_i = 0 and
lse_i = -inf (never NaN; the public functions reject such rows before, and
fastdiff.distributed combines such partials with weight 0). lse is float64 because the
backends hold m + log s in float64 and |lse| is ~D/2 and more: rounded to
float32 it would err by ~1e-4 absolute, too coarse to combine partial targets
by their log-sum-exps (fastdiff.distributed).

Exactness ("highest"). The logits come from a GEMM through the expansion
||x||^2 - 2 x.r + ||r||^2, whose fp32 rounding error is amplified by
1/sigma^2. Each logit carries a bound on that error (GEMM_GAMMA below);
the entries whose bounded error could move the target by more than a small
budget (in units of the row's noise, sigma_i sqrt(D)) are re-evaluated by
direct difference in float64. Far from the row's maximum, an entry's weight is
negligible whatever its error; at large sigma the error itself is negligible;
so only the few near neighbours at small sigma are re-evaluated.
The bound is on the distance part of a logit only: b_ik is added in float64
(exact to float64 rounding), and an entry with b_ik = -inf has weight 0
whatever its distance, so it is never re-evaluated.
"""
from __future__ import annotations

import math
import os

import torch

from fastdiff.ops import _dispatch, _library
from fastdiff.ops._checks import FLOAT_DTYPES, check_tensor

PRECISIONS = ("highest", "tf32x3", "tf32", "bf16")

# Per-call working memory of the chunked backends: the B x chunk logit tiles
# (and the float32 copy of a chunk of ref, if ref is not float32) stay within
# this many bytes, so memory never grows with N x D.
CHUNK_BYTES = int(os.environ.get("FASTDIFF_CHUNK_BYTES", 64 << 20))

# Bound on the error of a = 2 x.r - ||r||^2 computed in fp32 (GEMM + norms):
#   |a~ - a| <= GEMM_GAMMA(D) * (||r||^2 + 2 ||x|| ||r||).
# Worst case is D*u; blocked GEMM accumulation measures under 6u on random,
# positive and mean-offset data for D in [1, 12288] (tests/test_stf.py checks
# the bound), so u * (8 + 2 sqrt(D)) keeps a margin of 10x or more.
def gemm_gamma(D: int, unit: float = 2.0 ** -24) -> float:
    """The bound's factor for a GEMM with unit roundoff `unit` (2^-24 fp32, 2^-53 fp64)."""
    return unit * (8.0 + 2.0 * math.sqrt(D))


# A row whose flagged entries in a chunk exceed this share of the chunk
# (moderate sigma: weights spread over many rows, error bound above budget) is
# re-evaluated by float64 GEMMs instead of one direct difference per entry:
# its logits by the float64 expansion (error bound gemm_gamma(D, 2^-53): only
# entries still flagged then go to direct differences) and its weighted sum by
# a float64 GEMM.
DENSE_SHARE = 1 / 4    # measured break-even on CPU: ~30% of a row flagged


# The unflagged entries together may move the target by at most a few times
# this much, in units of sigma_i sqrt(D); the contract is 1e-4.
ERROR_BUDGET = 1e-5


# The flag rule, shared by every backend (csrc/ and kernels/ mirror it). With
# e the bound on an entry's logit error, lever = 2 max_k ||r_k|| >= ||r_k - t_i||
# and budget = ERROR_BUDGET * sigma_i sqrt(D), an entry keeps its GEMM logit if
#   (A) expm1(e) * lever <= budget: its error is small at any weight (the
#       weights of all such entries sum to <= 1), or
#   (B) exp(l + e - m_low) * expm1(e) * lever <= budget / N: its weight is too
#       small for its error to matter (m_low: a lower bound on the row's max);
# every other entry is re-evaluated exactly. Both groups together move t_i by
# at most ~4 * ERROR_BUDGET (the renormalization can double each share).
def log_expm1(e: torch.Tensor) -> torch.Tensor:
    """log(expm1(e)) for e >= 0, finite for large e (where expm1 overflows)."""
    big = e > 20.0
    return torch.where(big, e + torch.log1p(-torch.exp(-e)),
                       torch.log(torch.expm1(torch.where(big, 0.0, e)).clamp_min(1e-300)))


def flag_entries(logit, err, m_low, log_budget_row, N: int, masked: bool = False):
    """Boolean (B, C): the entries that need exact re-evaluation (rules A and B above).

    log_budget_row is log(ERROR_BUDGET * sigma_i sqrt(D) / lever), per row.
    masked: logit may hold -inf (labels, ref_logw): such an entry weighs 0
    and is never flagged (where the row's m_low is -inf too, rule B's
    -inf - -inf would be NaN).
    """
    lem1 = log_expm1(err)
    rule_a = lem1 <= log_budget_row[:, None]
    rule_b = logit + err - m_low[:, None] + lem1 <= log_budget_row[:, None] - math.log(N)
    flags = ~(rule_a | rule_b)
    return flags & (logit != -math.inf) if masked else flags


def chunk_rows(B: int, N: int, D: int, ref_dtype: torch.dtype) -> int:
    """Rows of ref processed per chunk under CHUNK_BYTES."""
    per_row = 48 * max(B, 1) + (0 if ref_dtype == torch.float32 else 4 * D)
    return int(max(1, min(N, CHUNK_BYTES // per_row)))


# ----------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------

def _checking_values() -> bool:
    # Value checks read data back to the host; skip them while torch.compile
    # traces (the graph must not break) and let the caller opt out for hot loops.
    return not torch.compiler.is_compiling() and os.environ.get("FASTDIFF_CHECK_VALUES", "1") != "0"


# sigma is used as float32 (its square's inverse in float64): a number that is 0,
# denormal or infinite there is out of range, whatever it was as a Python float.
FLOAT32_TINY = torch.finfo(torch.float32).tiny      # the smallest normal float32, ~1.2e-38
FLOAT32_MAX = torch.finfo(torch.float32).max

# The backends' GEMMs run in float32: |2 x.r - ||r||^2| <= ||x||^2 + 2 ||r||^2 must stay finite
# there, so every row's squared norm must be at most this (data elements up to ~1e17 at D = 3072).
# Beyond it, scale the data: stf_target(c x, c sigma, c ref) = c stf_target(x, sigma, ref).
MAX_SQNORM = FLOAT32_MAX / 4
_MAX_NORM = math.sqrt(MAX_SQNORM)

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_finite(name: str, t: torch.Tensor) -> None:
    # A finite sum proves every element finite (a NaN or Inf anywhere makes it
    # NaN or Inf) and costs one pass with no temporary; isfinite().all() costs
    # several times the op itself on CPU, so it only settles the rare overflow.
    if t.numel() and not bool(t.sum().isfinite()) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_sqnorms(name: str, t: torch.Tensor) -> None:
    """ValueError naming `name` and a row if a row's squared norm exceeds MAX_SQNORM (t finite)."""
    if t.dtype == torch.float16 or not t.numel():       # |v| <= 65504: cannot reach MAX_SQNORM
        return
    t2 = t.reshape(t.shape[0], -1)
    step = max(1, CHUNK_BYTES // (8 * t2.shape[1]))
    for k0 in range(0, t2.shape[0], step):
        n2 = t2[k0:k0 + step].double().square().sum(1)
        big = (n2 > MAX_SQNORM).nonzero().flatten()
        if big.numel():
            k = int(big[0])
            raise ValueError(f"{name} row {k0 + k} has squared norm {float(n2[k]):.3g}, more than {MAX_SQNORM:.3g}: "
                             f"the float32 distance GEMMs would overflow. Scale the data down (the target scales "
                             f"with it: stf_target(c x, c sigma, c ref) = c stf_target(x, sigma, ref))")


def _data_gauge(t: torch.Tensor) -> torch.Tensor:
    """0-d, finite iff t is finite and its total squared norm is within MAX_SQNORM (then so is
    every row's): one pass, like t.sum(); past the bound _check_sqnorms looks row by row."""
    if t.dtype == torch.float16:       # its norm could overflow float16, no row norm float32
        return t.sum()
    n = torch.linalg.vector_norm(t)    # float32 accumulation overflows to inf for fp32/bf16 data
    return torch.where(n <= _MAX_NORM, n, math.nan)


def _term(name: str, t, dtypes: tuple[torch.dtype, ...], what: str, n: int, size_of: str,
          device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have {what}; got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one entry per row of {size_of}; got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; it must be on x's device")


def _ref_terms(labels, ref_labels, ref_logw, B: int, N: int, device: torch.device):
    """labels, ref_labels, ref_logw checked (type, dtype, shape, device) and as the backends take
    them: (labels int64, ref_labels int64, ref_logw float64), each contiguous or None; or None
    where none is given."""
    if labels is None and ref_labels is None and ref_logw is None:
        return None
    if (labels is None) != (ref_labels is None):
        given, missing = ("labels", "ref_labels") if ref_labels is None else ("ref_labels", "labels")
        raise ValueError(f"labels and ref_labels go together (row i averages over the reference rows "
                         f"whose ref_labels equal labels[i]): {given} was given without {missing}")
    if labels is not None:
        _term("labels", labels, _INT_DTYPES, "an integer dtype", B, "x", device)
        _term("ref_labels", ref_labels, _INT_DTYPES, "an integer dtype", N, "ref", device)
        labels = labels.detach().to(torch.int64).contiguous()
        ref_labels = ref_labels.detach().to(torch.int64).contiguous()
    if ref_logw is not None:
        _term("ref_logw", ref_logw, FLOAT_DTYPES, "a floating dtype", N, "ref", device)
        ref_logw = ref_logw.detach().to(torch.float64).contiguous()
    return labels, ref_labels, ref_logw


def _rows_without_reference(B: int, terms) -> torch.Tensor:
    """(B,) bool: the rows that no reference row serves (none of the row's label, or every such
    row with ref_logw = -inf): their target would be 0/0. O((N + B) log N), no B x N mask."""
    labels, ref_labels, ref_logw = terms
    live = None if ref_logw is None else ref_logw > -math.inf
    if labels is None:
        return (~live).all().expand(B)
    keys, order = torch.sort(ref_labels)
    lo = torch.searchsorted(keys, labels, side="left")
    hi = torch.searchsorted(keys, labels, side="right")
    if live is None:
        return hi == lo
    cum = torch.zeros(keys.shape[0] + 1, dtype=torch.int64, device=keys.device)
    cum[1:] = live[order].cumsum(0)
    return cum[hi] == cum[lo]


def _terms_gauge(B: int, terms, rows: bool) -> torch.Tensor | None:
    """0-d, finite iff ref_logw holds no NaN or +inf and (rows) every row has a reference row."""
    bad = None
    if terms[2] is not None:
        bad = ~(terms[2] < math.inf).all()
    if rows and B:
        empty = _rows_without_reference(B, terms).any()
        bad = empty if bad is None else bad | empty
    return None if bad is None else torch.where(bad, math.nan, 0.0)


def _check_terms(B: int, terms, rows: bool) -> None:
    """The error _terms_gauge found, naming the entry, or the row and its label."""
    labels, ref_labels, ref_logw = terms
    if ref_logw is not None:
        bad = (~(ref_logw < math.inf)).nonzero().flatten()
        if bad.numel():
            k = int(bad[0])
            raise ValueError(f"ref_logw must be finite or -inf (-inf excludes a reference row); "
                             f"ref_logw[{k}] is {float(ref_logw[k])}")
    if rows and B:
        empty = _rows_without_reference(B, terms).nonzero().flatten()
        if empty.numel():
            i = int(empty[0])
            if labels is None:
                raise ValueError(f"row {i} has no reference row to average over: every ref_logw is -inf")
            lab = int(labels[i])
            why = " with ref_logw > -inf" if ref_logw is not None else ""
            raise ValueError(f"row {i} has label {lab} but no reference row has ref_labels == {lab}{why} "
                             f"({empty.numel()} row(s) without a reference row): its target is undefined")


def _sigma_rows(sigma, B: int, x: torch.Tensor, check_values: bool | None = None) -> torch.Tensor:
    """sigma (float, 0-d, (B,) or (B, 1, ...)) as a (B,) float32 tensor on x's device."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"sigma must be a float or a tensor, got {type(sigma).__name__}")
    if not isinstance(sigma, torch.Tensor):
        try:
            v = float(sigma)
        except OverflowError:                   # an int beyond float64
            v = math.inf
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"sigma must be positive and finite, got {v}")
        if not FLOAT32_TINY <= v <= FLOAT32_MAX:
            raise ValueError(f"sigma must be a normal float32 number, in [{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] "
                             f"(the kernels compute in float32); got {v}")
        return torch.full((B,), v, dtype=torch.float32, device=x.device)
    if sigma.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sigma must have a floating dtype, got {sigma.dtype}")
    # A one-element sigma may sit on the host beside CUDA x; meta holds no value to copy.
    if sigma.device != x.device and (sigma.numel() != 1 or sigma.device.type == "meta"):
        raise ValueError(f"sigma is on {sigma.device} but x is on {x.device}")
    if sigma.dim() == 0 or (sigma.numel() == 1 and B != 1 and sigma.dim() <= 1):
        s = sigma.reshape(()).to(device=x.device, dtype=torch.float32).expand(B)
    elif sigma.shape[0] == B and math.prod(sigma.shape[1:]) == 1:
        s = sigma if sigma.dim() == 1 else sigma.reshape(B)
        if s.dtype != torch.float32 or s.device != x.device:
            s = s.to(device=x.device, dtype=torch.float32)
    else:
        raise ValueError(f"sigma must be a float, a 0-d tensor, or have shape ({B},) or ({B}, 1, ...) "
                         f"for x with batch size {B}; got shape {tuple(sigma.shape)}")
    if check_values is None:
        check_values = _checking_values()
    if check_values:
        _check_values(s)
    return s.contiguous()


def _sigma_gauge(s: torch.Tensor) -> torch.Tensor:
    # a row below the smallest normal float32 (0, denormal, negative, NaN) gives log(0) = -inf
    return torch.where(s >= FLOAT32_TINY, s, 0.0).log().sum()


def _check_values(s: torch.Tensor | None, data: tuple[tuple[str, torch.Tensor], ...] = (),
                  terms=None, B: int = 0, rows: bool = True) -> None:
    """ValueError unless every row of sigma `s` is a positive, finite, normal float32, every
    (name, tensor) of `data` finite with row norms in range (MAX_SQNORM), and `terms` (from
    _ref_terms, for B rows) valid: ref_logw without NaN or +inf and (rows) no row of x without a
    reference row.

    s is None where sigma was a Python number, checked already.

    One read-back to the host (on CUDA, one synchronization) for all of them:
    sum_i log(s_i) is finite exactly when every s_i is positive and finite (0
    gives -inf, a negative or NaN row NaN, +inf +inf; a finite float32 log is
    at most ~104 in size, so the sum cannot overflow), a finite norm of the
    data within _MAX_NORM proves the data finite and its rows in range
    (_data_gauge), and each bad term adds a NaN. Only when the total is not
    finite are the arguments checked one by one, in order, to name the culprit;
    if none is (finite data whose total norm exceeds the bound, no row's), nothing is raised.
    """
    gauges = [] if s is None else [_sigma_gauge(s)]
    gauges += [_data_gauge(t) for _, t in data]
    if terms is not None:
        g = _terms_gauge(B, terms, rows)
        if g is not None:
            gauges.append(g)
    if not gauges:
        return
    total = gauges[0]
    for g in gauges[1:]:
        total = total + g
    if math.isfinite(total.item()):
        return
    if s is not None and s.numel() and not math.isfinite(_sigma_gauge(s).item()):
        i = int((~((s >= FLOAT32_TINY) & (s <= FLOAT32_MAX))).nonzero()[0])
        raise ValueError(f"sigma must be positive and finite in every row (a normal float32, at least "
                         f"{FLOAT32_TINY:.4g}); row {i} is {float(s[i]):.4g}")
    for name, t in data:
        _check_finite(name, t)
        _check_sqnorms(name, t)
    if terms is not None:
        _check_terms(B, terms, rows)


# Backends that reject NaN/Inf in x and ref themselves, from the float64 row
# norms they compute anyway (csrc/cpu/stf.cpp): a check here would read ref,
# the largest input, once more, about a tenth of the op's time on CPU.
_CHECKS_DATA = ("cpu",)


def _prepare(x, sigma, ref, check_data: bool = True, check_values: bool | None = None):
    """Checks the arguments; returns x as (B, D), sigma as (B,) float32, ref as (N, D).

    check_values: whether value checks run (default: _checking_values()).
    """
    check_tensor("x", x)
    check_tensor("ref", ref)
    nd = x.dim()
    if nd < 1:
        raise ValueError("x must have a batch dimension: shape (B, *S), got a 0-d tensor")
    if ref.dim() != nd or ref.shape[1:] != x.shape[1:]:
        raise ValueError(f"ref must have shape (N, {', '.join(map(str, x.shape[1:]))}) to match x of shape "
                         f"{tuple(x.shape)}; got {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError("ref is empty: the reference batch needs at least one row")
    if ref.device != x.device:
        raise ValueError(f"x and ref must be on the same device; x is on {x.device}, ref on {ref.device}")
    if x.device.type == "meta":
        raise ValueError("x and ref are on the meta device, which holds no values: the STF target needs "
                         "their data (for shapes alone, trace under torch.compile or FakeTensorMode)")
    if check_values is None:
        check_values = _checking_values()
    B = x.shape[0]
    s = _sigma_rows(sigma, B, x, check_values=False)
    if check_values:
        _check_values(s if isinstance(sigma, torch.Tensor) else None, (("x", x), ("ref", ref)) if check_data else ())
    if nd != 2:
        D = math.prod(x.shape[1:])
        x, ref = x.reshape(B, D), ref.reshape(ref.shape[0], D)
    return x.contiguous(), s, ref.contiguous()


def _check_mode(precision: str, backend: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    _dispatch.check_backend(backend)


# ----------------------------------------------------------------------------
# the op (a torch.library registration, see ops/_library.py)
# ----------------------------------------------------------------------------

def _stf_target_run(impl, x, sigma, ref, precision, terms=None):
    t = torch.empty_like(x)
    lse = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    if terms is None:
        impl(x, sigma, ref, precision, t, lse)
    else:
        impl(x, sigma, ref, precision, t, lse, labels=terms[0], ref_labels=terms[1], ref_logw=terms[2])
    return t, lse


def _as_terms(labels, ref_labels, ref_logw):
    return None if labels is None and ref_logw is None else (labels, ref_labels, ref_logw)


def _stf_target_kernel(x, sigma, ref, precision, backend, labels=None, ref_labels=None, ref_logw=None):
    if backend == "auto":            # at run time, also under torch.compile (nothing here is traced)
        backend = _auto_backend(x, ref, precision)
    return _stf_target_run(_dispatch.resolve("stf_target", backend, x.device.type)[1], x, sigma, ref, precision,
                           _as_terms(labels, ref_labels, ref_logw))


def _stf_target_fake(x, sigma, ref, precision, backend, labels=None, ref_labels=None, ref_logw=None):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float64)


# labels, ref_labels, ref_logw: as _ref_terms returns them (int64, int64, float64) or None.
_stf_target_op = _library.define(
    "stf_target(Tensor x, Tensor sigma, Tensor ref, str precision, str backend, Tensor? labels=None, "
    "Tensor? ref_labels=None, Tensor? ref_logw=None) -> (Tensor, Tensor)",
    _stf_target_kernel, _stf_target_fake)


def stf_target(x: torch.Tensor, sigma, ref: torch.Tensor, *, labels: torch.Tensor | None = None,
               ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None,
               precision: str = "highest", backend: str = "auto", return_lse: bool = False):
    """Stable Target Field target: the posterior-weighted mean of `ref` given `x`.

    Args:
        x: noisy samples in VE form, shape (B, *S).
        sigma: noise level, a float, a 0-d tensor, or per row (B,) or (B, 1, ...);
            positive, finite and a normal float32 (>= 1.2e-38).
        ref: clean reference samples, shape (N, *S), on x's device (the rows
            that produced x belong in it, as STF requires).
        labels, ref_labels: class labels, integer tensors of shape (B,) and
            (N,) on x's device, both or neither: row i averages only over the
            reference rows with ref_labels[k] == labels[i] (class-conditional
            STF; the logits of the other rows are -inf).
        ref_logw: (N,) float, an additive log-weight per reference row:
            w_ik = softmax_k(l_ik + ref_logw_k), e.g. the self-normalized
            importance weight log p0(r_k)/q(r_k) of rows drawn from a proposal
            q. -inf excludes a row; NaN and +inf are errors.
            A row that no reference row serves (no row of its label, or all of
            them at -inf) raises ValueError naming the row and its label. That
            check is a value check: under torch.compile or with
            FASTDIFF_CHECK_VALUES=0 such a row gets t_i = 0 and lse_i = -inf.
        precision: "highest" (default) keeps err_i = ||t_i - t64_i|| /
            (sigma_i sqrt(D)) <= 1e-4 on every row against a float64 oracle
            (with labels and ref_logw too).
            "tf32x3", "tf32", "bf16" are faster GPU modes with looser,
            documented bounds; the torch and cpu backends always compute at
            "highest".
        backend: "auto" (fastest available for x's device), "torch", "cpu",
            "triton" or "cuda". A named backend that cannot run raises
            RuntimeError with the reason.
        return_lse: also return lse_i = logsumexp_k(-||x_i - ref_k||^2 /
            (2 sigma_i^2) + b_ik) in float64 (b_ik: ref_logw_k, -inf for
            another label).

    Returns:
        t with x's shape and dtype (accumulated in float32), or (t, lse).

    Every row of x and ref must have a squared norm of at most MAX_SQNORM
    (~8.5e37: the distance GEMMs run in float32); beyond, scale the data.
    The target is a training target and carries no gradient: the result is
    computed from detached inputs, by design.
    """
    t, lse = _stf_target(x, sigma, ref, labels, ref_labels, ref_logw, precision, backend)
    return (t, lse) if return_lse else t


def _stf_target(x, sigma, ref, labels, ref_labels, ref_logw, precision, backend, rows: bool = True):
    """stf_target's work; rows=False lets rows without a reference row through (t_i = 0,
    lse_i = -inf): a shard of the reference batch may hold none of a row's label
    (fastdiff.distributed combines such partials with weight 0)."""
    _check_mode(precision, backend)
    x2, s, r2 = _prepare(x, sigma, ref, check_data=False, check_values=False)
    terms = _ref_terms(labels, ref_labels, ref_logw, x2.shape[0], r2.shape[0], x2.device)
    trivial = _trivial(x2, r2, terms)
    if torch.compiler.is_compiling():
        t, lse = trivial or _stf_target_op(x2.detach(), s.detach(), r2.detach(), precision, backend,
                                           *(terms or (None, None, None)))
    else:
        if backend == "auto":
            backend = _auto_backend(x2, r2, precision)
        name, impl = _dispatch.resolve("stf_target", backend, x2.device.type)  # unavailable backends raise here
        if _checking_values():
            # sigma, x and ref unless the backend checks them, and the terms, with one read-back
            _check_values(s if isinstance(sigma, torch.Tensor) else None,
                          (("x", x2), ("ref", r2)) if x2.shape[0] == 0 or name not in _CHECKS_DATA else (),
                          terms, x2.shape[0], rows)
        if trivial:
            t, lse = trivial
        else:
            if torch._C._any_requires_grad(x2, s, r2):
                x2, s, r2 = x2.detach(), s.detach(), r2.detach()
            if _library.plain_eager(x2, s, r2):
                # what the op would do, without the dispatcher's round trip into
                # Python, which costs more than a small call's work
                t, lse = _stf_target_run(impl, x2, s, r2, precision, terms)
            else:
                t, lse = _stf_target_op(x2, s, r2, precision, backend, *(terms or (None, None, None)))
    if t.dim() != x.dim():
        t = t.reshape(x.shape)
    return t, lse


def _auto_backend(x2: torch.Tensor, r2: torch.Tensor, precision: str) -> str:
    """backend="auto" at this call's (B, N, D): the measured table's choice, or "auto"."""
    return _dispatch.auto_by_size("stf_target", x2.device.type, precision, (x2.shape[0], r2.shape[0], x2.shape[1]))


def _trivial(x2: torch.Tensor, r2: torch.Tensor, terms=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(t, lse) where no kernel is needed, else None: no rows (B = 0: both empty), or no
    features (x of shape (B, 0, ...): every logit is b_ik, 0 without terms, so lse = log N and
    t is empty; the backends' kernels assume D >= 1, and a CUDA grid of width 0 does not launch)."""
    if x2.shape[0] == 0:
        return torch.empty_like(x2), x2.new_empty(0, dtype=torch.float64)
    if x2.shape[1] == 0:
        if terms is None:
            lse = torch.full((x2.shape[0],), math.log(r2.shape[0]), dtype=torch.float64, device=x2.device)
        else:
            lse = torch.logsumexp(_chunk_bias(terms, 0, r2.shape[0]), 1).expand(x2.shape[0]).contiguous()
        return torch.empty_like(x2), lse
    return None


def _chunk_bias(terms, k0: int, k1: int) -> torch.Tensor:
    """b_ik for the reference rows k0..k1-1, float64: (B, C) with labels, (1, C) without."""
    labels, ref_labels, ref_logw = terms
    b = None if ref_logw is None else ref_logw[None, k0:k1]
    if labels is not None:
        match = labels[:, None] == ref_labels[None, k0:k1]
        zero = torch.zeros((), dtype=torch.float64, device=match.device)
        b = torch.where(match, zero if b is None else b, -math.inf)
    return b


def _pick(bias: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """bias[rows, cols] for a (B, C) or (1, C) bias."""
    return bias[rows, cols] if bias.shape[0] != 1 else bias[0, cols]


def stf_weights(x: torch.Tensor, sigma, ref: torch.Tensor, *, labels: torch.Tensor | None = None,
                ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, N) self-normalized weights softmax_k(l_ik + b_ik), for analysis.

    labels, ref_labels and ref_logw as for stf_target (b_ik = ref_logw_k, or
    -inf where ref_labels[k] != labels[i]); a row without a reference row
    raises ValueError (value checks off: its weights are 0).

    Computed in float64 in chunks of ref (the float64 expansion is exact to
    well below float32 resolution for sigma >= 1e-4 at data scale ~1) and
    returned in float32. Memory is O(B * N), the size of the answer.
    """
    x2, s, r2 = _prepare(x, sigma, ref, check_values=False)
    B, D = x2.shape
    N = r2.shape[0]
    terms = _ref_terms(labels, ref_labels, ref_logw, B, N, x2.device)
    if _checking_values():
        _check_values(s if isinstance(sigma, torch.Tensor) else None, (("x", x2), ("ref", r2)), terms, B)
    x64 = x2.detach().double()
    inv2s2 = 0.5 / s.double() ** 2
    xn = (x64 * x64).sum(1)
    logits = torch.empty(B, N, dtype=torch.float64, device=x2.device)
    step = chunk_rows(B, N, D, torch.float64)
    for k0 in range(0, N, step):
        r64 = r2[k0:k0 + step].detach().double()
        d = xn[:, None] - 2.0 * (x64 @ r64.T) + (r64 * r64).sum(1)[None, :]
        logits[:, k0:k0 + step] = -d.clamp_min(0) * inv2s2[:, None]
        if terms is not None:
            logits[:, k0:k0 + step] += _chunk_bias(terms, k0, k0 + step)
    w = torch.softmax(logits, dim=1)
    if terms is not None:           # a row without a reference row (checks off): 0, not NaN
        w = torch.where((logits == -math.inf).all(1, keepdim=True), 0.0, w)
    return w.float()


# ----------------------------------------------------------------------------
# backend: torch
# ----------------------------------------------------------------------------

def _exact_sqdist(x64: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  D: int) -> torch.Tensor:
    """||x[rows] - ref[cols]||^2 by direct difference in float64, in memory-bounded pieces."""
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=x64.device)
    step = max(1, CHUNK_BYTES // (16 * D))
    for p0 in range(0, rows.shape[0], step):
        i, k = rows[p0:p0 + step], cols[p0:p0 + step]
        diff = x64[i] - ref[k].double()
        out[p0:p0 + step] = (diff * diff).sum(1)
    return out


def _add_flagged(acc64: torch.Tensor, weights: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor,
                 cols: torch.Tensor) -> None:
    """acc64[rows] += weights * ref[cols] in float64, in memory-bounded pieces."""
    D = ref.shape[1]
    step = max(1, CHUNK_BYTES // (16 * D))
    for p0 in range(0, rows.shape[0], step):
        k = cols[p0:p0 + step]
        acc64.index_add_(0, rows[p0:p0 + step], weights[p0:p0 + step, None] * ref[k].double())


def stf_target_torch(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, precision: str,
                     t_out: torch.Tensor, lse_out: torch.Tensor, labels: torch.Tensor | None = None,
                     ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None) -> None:
    """Plain-PyTorch backend (_stf_target_torch) with autocast off: inside a bf16/fp16 autocast
    region (a mixed-precision train step) its fp32 GEMMs would run in half precision, outside the
    error bound the exactness rests on."""
    with torch.autocast(x.device.type, enabled=False):
        _stf_target_torch(x, sigma, ref, precision, t_out, lse_out, labels, ref_labels, ref_logw)


def _stf_target_torch(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, precision: str,
                      t_out: torch.Tensor, lse_out: torch.Tensor, labels: torch.Tensor | None = None,
                      ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None) -> None:
    """Plain-PyTorch backend: chunked over N with an online log-sum-exp.

    Per chunk: one fp32 GEMM for the logits (with an error bound per entry),
    float64 direct-difference re-evaluation of the entries that bound flags,
    then an fp32 GEMM of the weights with the chunk. The flagged entries are
    the heavy ones at small sigma, where fp32 accumulation of sum_k w_k r_k
    alone would err by sqrt(K) ulps / sigma; they are accumulated in float64.
    Rows with many flags (DENSE_SHARE) take float64 GEMMs instead. Always
    "highest". labels / ref_logw add b_ik (float64) to each chunk's logits,
    GEMM and exact alike; -inf entries are never flagged and weigh 0.
    """
    terms = _as_terms(labels, ref_labels, ref_logw)
    B, D = x.shape
    N = ref.shape[0]
    dev = x.device
    xf = x.float()
    x64 = x.double()
    s64 = sigma.double()
    inv2s2 = 0.5 / (s64 * s64)                      # (B,)
    xn = (x64 * x64).sum(1)                          # (B,)
    xnorm = xn.sqrt()
    offset = xn * inv2s2                             # l_ik = a_ik * inv2s2 - offset_i
    step = chunk_rows(B, N, D, ref.dtype)

    rn = torch.empty(N, dtype=torch.float64, device=dev)
    for k0 in range(0, N, step):
        rc = ref[k0:k0 + step].double()
        rn[k0:k0 + step] = (rc * rc).sum(1)
    rnorm = rn.sqrt()
    # ||r_k - t_i|| <= 2 max_k ||r_k||: the lever an error in one weight has on t_i.
    lever = (2.0 * rnorm.max()).clamp_min(1e-30)
    log_budget = math.log(ERROR_BUDGET) + torch.log(sigma.double() * math.sqrt(D)) - torch.log(lever)
    gamma, gamma64 = gemm_gamma(D), gemm_gamma(D, 2.0 ** -53)
    # Precision note: torch.matmul on CUDA honours allow_tf32; "highest" needs true fp32.
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = torch.full((B,), -math.inf, dtype=torch.float64, device=dev)      # running max logit
        m_low = torch.full((B,), -math.inf, dtype=torch.float64, device=dev)  # lower bound on max logit
        s = torch.zeros(B, dtype=torch.float64, device=dev)
        acc = torch.zeros(B, D, dtype=torch.float32, device=dev)
        acc64 = torch.zeros(B, D, dtype=torch.float64, device=dev)
        for k0 in range(0, N, step):
            rc = ref[k0:k0 + step]
            rcf = rc.float()
            rn_c, rnorm_c = rn[k0:k0 + step], rnorm[k0:k0 + step]
            a = 2.0 * (xf @ rcf.T) - rn_c.float()[None, :]                      # fp32, GEMM
            logit = a.double() * inv2s2[:, None] - offset[:, None]              # fp64 (B, C)
            bias = None if terms is None else _chunk_bias(terms, k0, k0 + step)
            if bias is not None:
                logit = logit + bias
            err = gamma * (rn_c[None, :] + 2.0 * xnorm[:, None] * rnorm_c[None, :]) * inv2s2[:, None]
            m_low = torch.maximum(m_low, (logit - err).amax(1))
            flags = flag_entries(logit, err, m_low, log_budget, N, bias is not None)
            dense = (flags.sum(1) > max(1, int(DENSE_SHARE * rc.shape[0]))).nonzero(as_tuple=True)[0]
            if dense.numel():
                rc64 = rc.double()
                a64 = 2.0 * (x64[dense] @ rc64.T) - rn_c[None, :]
                logit[dense] = a64 * inv2s2[dense, None] - offset[dense, None]
                if bias is not None:
                    logit[dense] += bias[dense] if bias.shape[0] != 1 else bias
                err64 = gamma64 * (rn_c[None, :] + 2.0 * xnorm[dense, None] * rnorm_c[None, :]) \
                    * inv2s2[dense, None]
                m_low[dense] = torch.maximum(m_low[dense], (logit[dense] - err64).amax(1))
                flags[dense] = flag_entries(logit[dense], err64, m_low[dense], log_budget[dense], N,
                                            bias is not None)
            rows, cols = flags.nonzero(as_tuple=True)
            if rows.numel():
                logit[rows, cols] = -_exact_sqdist(x64, rc, rows, cols, D) * inv2s2[rows]
                if bias is not None:
                    logit[rows, cols] += _pick(bias, rows, cols)
            m_new = torch.maximum(m, logit.amax(1))
            m_ref = m_new               # a row with only -inf so far: exp(-inf - -inf) would be NaN
            if bias is not None:
                m_ref = torch.where(m_new == -math.inf, 0.0, m_new)
            scale = torch.exp(m - m_ref)
            p = torch.exp(logit - m_ref[:, None])
            s = s * scale + p.sum(1)
            acc64 *= scale[:, None]
            if rows.numel():
                _add_flagged(acc64, p[rows, cols], rc, rows, cols)
                p[rows, cols] = 0.0
            if dense.numel():
                acc64[dense] += p[dense] @ rc64
                p[dense] = 0.0
            acc = acc * scale.float()[:, None] + p.float() @ rcf
            m = m_new
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    if terms is not None:           # rows no reference row serves: t = 0, lse = -inf
        s_safe = torch.where(s == 0.0, 1.0, s)
        t_out.copy_((acc64 + acc.double()) / s_safe[:, None])
        lse_out.copy_(torch.where(s == 0.0, -math.inf, m + torch.log(s_safe)))
        return
    t_out.copy_((acc64 + acc.double()) / s[:, None])
    lse_out.copy_(m + torch.log(s))


def stf_target_ext(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor, precision: str,
                   t_out: torch.Tensor, lse_out: torch.Tensor, labels: torch.Tensor | None = None,
                   ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None) -> None:
    """C++ backends (`cpu` in csrc/cpu, `cuda` in csrc/cuda), one op for both devices."""
    step = chunk_rows(x.shape[0], ref.shape[0], x.shape[1], ref.dtype)
    if labels is None and ref_logw is None:
        torch.ops.fastdiff_ext.stf_target(x, sigma, ref, precision, step, t_out, lse_out)
    else:
        torch.ops.fastdiff_ext.stf_target(x, sigma, ref, precision, step, t_out, lse_out,
                                          labels, ref_labels, ref_logw)
