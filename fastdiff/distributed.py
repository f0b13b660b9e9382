"""The STF target over a reference batch sharded across processes.

Under torchrun each rank holds its own queries x (B rows, the same B on every
rank) and its own shard of the reference rows. `stf_target_sharded` returns on
every rank what `fastdiff.stf_target(x, sigma, cat(all shards))` returns for
its own x, without moving the reference rows:

    x_all, sigma_all = all_gather(x), all_gather(sigma)            (W*B rows)
    t_k, lse_k = stf_target(x_all, sigma_all, shard_k, return_lse=True)
    LSE = logsumexp_k lse_k                                         (all_gather, W*B floats)
    t   = x + reduce_scatter_k( exp(lse_k - LSE) * (t_k - x_all) )

The softmax over the whole reference batch is the partial softmaxes weighted
by w_k = exp(lse_k - LSE) (flash-attention's split-KV combine), formed in
float64. The partials are combined as offsets from x, the scale of the row's
noise (sigma sqrt(D) at small sigma), so rounding the transported sum in
float32 costs ~W ulps of that scale rather than of ||t||, 500 times larger at
sigma = 0.002. A convex combination of partials keeps each partial's own bound
(the op's ~4e-5 in units of sigma sqrt(D)).

The float32 lse the op returns is the one weak point: |lse| is ~D/2 and more
(the noise alone puts x at distance ~sigma sqrt(D) from every row), so its
rounding u_k = 2^-24 |lse_k| moves t_i by up to 2 sum_k w_k (1 - w_k) u_k
max_k ||t_k - t_i||. Where two ranks' partials both carry weight and lie a few
sigma sqrt(D) apart (moderate sigma, a query between two groups of rows) that
reaches 4e-4 at D = 3072 (tests/test_distributed.py, "bisect"). Rows whose
bound exceeds COMBINE_BUDGET get their partial lse recomputed in float64
(_lse64: an fp32 GEMM picks the entries within e^-60 of the maximum, direct
float64 differences evaluate them) and all-gathered once more; deciding which
rows is the one host sync. An op returning lse in float64 (its backends hold
m + log s in float64 before rounding) would make this pass unnecessary.

Per rank and step this moves ~2 (W-1) B D values plus (W-1) W B floats of
lse, against (W-1) N_local D for gathering the rows; the FLOPs are the same
(W*B queries against N/W rows instead of B against N). Which is faster is
measured in benchmarks/distributed_ref.py (results/distributed-cpu-gloo.txt).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

import fastdiff.ops
from fastdiff.ops.stf import ERROR_BUDGET, _checking_values, _exact_sqdist, _sigma_rows, chunk_rows, gemm_gamma

__all__ = ["stf_target_sharded", "world_size"]

_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


def world_size(group=None) -> int:
    """The number of processes in group (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _check_across_ranks(x: torch.Tensor, ref_shard: torch.Tensor, group, world: int) -> None:
    # One tiny collective: the all-gathers below need equal shapes on every rank
    # (a mismatch would hang or fail with a message naming no argument).
    code = _DTYPE_CODES.get(x.dtype, -1)
    mine = torch.tensor([x.shape[0], x[0].numel() if x.shape[0] else -1, x.dim(), code, ref_shard.shape[0],
                         _DTYPE_CODES.get(ref_shard.dtype, -1)], dtype=torch.int64, device=x.device)
    every = torch.empty(world, mine.numel(), dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(every.view(-1), mine, group=group)
    rows = every.tolist()
    me = dist.get_rank(group)
    for r, (b, d, nd, xc, n, rc) in enumerate(rows):
        if b != rows[me][0]:
            raise ValueError(f"x must have the same batch size on every rank (the queries are all-gathered); "
                             f"rank {me} has {rows[me][0]} rows, rank {r} has {b}")
        if (d, nd) != tuple(rows[me][1:3]):
            raise ValueError(f"x must have the same row shape on every rank; rank {me} has {tuple(x.shape)} "
                             f"({rows[me][1]} values per row), rank {r} has {d} values per row")
        if xc != rows[me][3]:
            raise TypeError(f"x must have the same dtype on every rank; rank {me} has {x.dtype}, rank {r} differs")
        if rc != rows[me][5] and n > 0 and rows[me][4] > 0:
            raise TypeError(f"ref_shard must have the same dtype on every rank; rank {me} has "
                            f"{ref_shard.dtype}, rank {r} differs")
    if sum(row[4] for row in rows) == 0:
        raise ValueError("ref_shard is empty on every rank: the reference batch needs at least one row")


# The combine's share of the 1e-4 contract: each partial keeps the op's own ~4 * ERROR_BUDGET
# (fastdiff/ops/stf.py), and a convex combination of partials keeps that; the float32 lse may
# add at most this much.
COMBINE_BUDGET = 5 * ERROR_BUDGET

# Entries more than this far below a row's largest logit are left out of its float64 lse
# (each weighs < e^-60 of the largest: far below float64's resolution of the sum).
LSE_WINDOW = 60.0

# Rows seen and rows whose partial lse was recomputed in float64, since import (for benchmarks).
_STATS = {"rows": 0, "refined": 0}


def _lse64(x: torch.Tensor, sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """logsumexp_k(-||x_i - ref_k||^2 / (2 sigma_i^2)) in float64, (R,).

    An fp32 GEMM screens the entries (no float64 copy of ref): those within LSE_WINDOW of
    the row's maximum, widened by twice their bound on the fp32 error (the op's gemm_gamma),
    are evaluated by direct difference in float64 (fastdiff/ops/stf.py's _exact_sqdist); the
    others weigh < e^-LSE_WINDOW each, relative to the maximum. Rows keeping most entries
    (large sigma) take float64 GEMMs instead where the expansion's logit error is < 1e-7."""
    R, D = x.shape
    out = torch.full((R,), float("-inf"), dtype=torch.float64, device=x.device)
    if ref.shape[0] == 0:
        return out
    x64 = x.double()
    xf = x.float()
    inv2s2 = 0.5 / sigma.double() ** 2
    xnorm = x64.norm(dim=1)
    gamma = 2.0 * gemm_gamma(D)             # twice the op's bound: the norms here are fp32 sums
    step = chunk_rows(R, ref.shape[0], D, torch.float32)
    logit, err = [], []
    for k0 in range(0, ref.shape[0], step):
        rf = ref[k0:k0 + step].float()
        rn = (rf * rf).sum(1).double()
        a = (2.0 * (xf @ rf.T)).double() - rn[None, :]
        logit.append((a - (x64 * x64).sum(1)[:, None]) * inv2s2[:, None])
        err.append(gamma * (rn[None, :] + 2.0 * xnorm[:, None] * rn.sqrt()[None, :]) * inv2s2[:, None])
    logit, err = torch.cat(logit, 1), torch.cat(err, 1)
    keep = logit + err >= (logit - err).amax(1, keepdim=True) - LSE_WINDOW
    # Rows keeping many entries (large sigma) take the float64 expansion, where its error
    # bound allows, instead of one direct difference per entry.
    bound64 = gemm_gamma(D, 2.0 ** -53) * (err / gamma).amax(1)
    dense = (keep.sum(1) > ref.shape[0] // 4) & (bound64 < 1e-7)
    keep[dense] = False
    rows, cols = keep.nonzero(as_tuple=True)
    exact = -_exact_sqdist(x64, ref, rows, cols, D) * inv2s2[rows]
    m = out.scatter_reduce(0, rows, exact, "amax")
    total = torch.zeros(R, dtype=torch.float64, device=x.device)
    total.index_add_(0, rows, torch.exp(exact - m[rows]))
    out = m + torch.log(total)
    d = dense.nonzero().flatten()
    if d.numel():
        lse = torch.full((d.numel(),), float("-inf"), dtype=torch.float64, device=x.device)
        for k0 in range(0, ref.shape[0], step):
            r = ref[k0:k0 + step].double()
            d2 = (x64[d] * x64[d]).sum(1)[:, None] - 2.0 * (x64[d] @ r.T) + (r * r).sum(1)[None, :]
            lse = torch.logaddexp(lse, torch.logsumexp(-d2 * inv2s2[d, None], 1))
        out[d] = lse
    return out


def stf_target_sharded(x: torch.Tensor, sigma, ref_shard: torch.Tensor, *, group=None,
                       precision: str = "highest", backend: str = "auto") -> torch.Tensor:
    """fastdiff.stf_target(x, sigma, cat(ref_shard of every rank)) for this rank's x.

    Args:
        x: this rank's noisy rows (B, *S); B must be the same on every rank of group.
        sigma: as for fastdiff.stf_target (float, 0-d, (B,) or (B, 1, ...)).
        ref_shard: this rank's share of the reference rows (N_r, *S); N_r may
            differ between ranks and may be 0 on some (not on all).
        group: the process group (default: the world). Without an initialized
            process group, or with one process, this is fastdiff.stf_target.
        precision, backend: passed to fastdiff.stf_target on each shard.

    Every rank of group must call it (it runs collectives). The result has x's
    shape and dtype and carries no gradient, like fastdiff.stf_target.
    """
    world = world_size(group)
    if world == 1:
        return fastdiff.ops.stf_target(x, sigma, ref_shard, precision=precision, backend=backend)
    for name, t in (("x", x), ("ref_shard", ref_shard)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1 or ref_shard.dim() != x.dim() or ref_shard.shape[1:] != x.shape[1:]:
        raise ValueError(f"ref_shard must have shape (N, {', '.join(map(str, x.shape[1:]))}) to match x of "
                         f"shape {tuple(x.shape)}; got {tuple(ref_shard.shape)}")
    if ref_shard.device != x.device:
        raise ValueError(f"x and ref_shard must be on the same device; x is on {x.device}, "
                         f"ref_shard on {ref_shard.device}")
    if _checking_values():
        _check_across_ranks(x, ref_shard, group, world)
    B = x.shape[0]
    x2 = x.detach().reshape(B, -1).contiguous()
    s = _sigma_rows(sigma.detach() if isinstance(sigma, torch.Tensor) else sigma, B, x2)
    D = x2.shape[1]
    rank = dist.get_rank(group)

    if x2.dtype in (torch.float32, torch.float64):          # sigma rides along as one more column
        both = x2.new_empty(world * B, D + 1)
        dist.all_gather_into_tensor(both, torch.cat([x2, s.to(x2.dtype)[:, None]], 1), group=group)
        x_all, s_all = both[:, :D], both[:, D].float()
    else:
        x_all, s_all = x2.new_empty(world * B, D), s.new_empty(world * B)
        dist.all_gather_into_tensor(x_all, x2, group=group)
        dist.all_gather_into_tensor(s_all, s, group=group)
    if ref_shard.shape[0]:
        t_k, lse_k = fastdiff.ops.stf_target(x_all, s_all, ref_shard.detach().reshape(ref_shard.shape[0], D),
                                         precision=precision, backend=backend, return_lse=True)
    else:                                       # an empty shard: weight 0 everywhere
        t_k = x_all
        lse_k = torch.full((world * B,), float("-inf"), dtype=torch.float32, device=x.device)
    # lse_k and ||t_k - x|| of every shard, in one all-gather.
    mine = torch.stack([lse_k.double(), (t_k.double() - x_all.double()).norm(dim=1)])
    every = mine.new_empty(world * 2 * world * B)
    dist.all_gather_into_tensor(every, mine.view(-1), group=group)
    every = every.view(world, 2, world * B)
    lse64, dist_t = every[:, 0], every[:, 1]
    w = torch.exp(lse64 - torch.logsumexp(lse64, 0))                    # (world, W*B) shard weights
    # The op returns lse in float32: rounding |lse| (~D/2 and up) errs by u_k = 2^-24 |lse_k|,
    # which moves t_i by up to 2 sum_k w_k (1 - w_k) u_k max_k ||t_k - t_i||. Rows where that
    # could exceed COMBINE_BUDGET (in units of sigma_i sqrt(D)) get their partial lse again, in
    # float64: a host sync, and a float64 pass over the shard for those rows.
    u = torch.where(torch.isfinite(lse64), lse64.abs() * 2.0 ** -24, 0.0)
    lever = 2.0 * dist_t.amax(0)                                         # >= ||t_k - t_i|| for every k
    bound = 2.0 * (w * (1.0 - w) * u).sum(0) * lever / (s_all.double() * math.sqrt(D))
    rows = (bound > COMBINE_BUDGET).nonzero().flatten()                 # the same on every rank
    _STATS["rows"] += world * B
    if rows.numel():
        _STATS["refined"] += rows.numel()
        mine = _lse64(x_all[rows], s_all[rows], ref_shard.reshape(ref_shard.shape[0], D))
        exact = mine.new_empty(world * rows.numel())
        dist.all_gather_into_tensor(exact, mine, group=group)
        lse64 = lse64.index_copy(1, rows, exact.view(world, rows.numel()))
        w = torch.exp(lse64 - torch.logsumexp(lse64, 0))
    scale = w[rank]                                                      # this shard's share of each row
    # Offsets from x in float32 (float64 for float64 x): see the module docstring.
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = ((t_k.double() - x_all.double()) * scale[:, None]).to(cdt)
    off = part.new_empty(B, D)
    dist.reduce_scatter_tensor(off, part, group=group)
    return (x2.to(cdt) + off).to(x.dtype).reshape(x.shape)
