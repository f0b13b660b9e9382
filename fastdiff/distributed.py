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

The op returns lse in float64 (|lse| is ~D/2 and more, so float32 would err
by ~1e-4 absolute, 4e-4 in t at D = 3072 where two ranks' partials both carry
weight: tests/test_distributed.py, "bisect"). Its remaining error is that of
the logits the op left unflagged, which its flags bound (a few ERROR_BUDGET
sigma sqrt(D) / max ||r||); through the weights that moves t_i by a few
ERROR_BUDGET sigma_i sqrt(D), inside the contract.

Class labels and log-weights (fastdiff.stf_target's labels / ref_labels /
ref_logw): each rank passes its own rows' ref_labels and ref_logw with its
shard, and the labels of its queries, which are gathered with the queries. A
shard may hold no reference row of a query's label: its partial is then
t_k = 0, lse_k = -inf, weight 0. A query that no shard serves raises
ValueError on every rank (naming the rank, row and label) before the last
collective, so no rank is left waiting.

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
from fastdiff.ops.stf import _checking_values, _sigma_rows, _stf_target

__all__ = ["stf_target_sharded", "world_size"]

_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


def world_size(group=None) -> int:
    """The number of processes in group (1 without an initialized process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _check_across_ranks(x: torch.Tensor, ref_shard: torch.Tensor, group, world: int, labels, ref_logw) -> None:
    # One tiny collective: the all-gathers below need equal shapes on every rank
    # (a mismatch would hang or fail with a message naming no argument).
    code = _DTYPE_CODES.get(x.dtype, -1)
    mine = torch.tensor([x.shape[0], x[0].numel() if x.shape[0] else -1, x.dim(), code, ref_shard.shape[0],
                         _DTYPE_CODES.get(ref_shard.dtype, -1), labels is not None, ref_logw is not None],
                        dtype=torch.int64, device=x.device)
    every = torch.empty(world, mine.numel(), dtype=torch.int64, device=x.device)
    dist.all_gather_into_tensor(every.view(-1), mine, group=group)
    rows = every.tolist()
    me = dist.get_rank(group)
    for r, (b, d, nd, xc, n, rc, has_labels, has_logw) in enumerate(rows):
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
        for name, given, mine_given in (("labels", has_labels, rows[me][6]), ("ref_logw", has_logw, rows[me][7])):
            if given != mine_given:
                raise ValueError(f"{name} must be given on every rank or on none; rank {me} "
                                 f"{'passes' if mine_given else 'does not pass'} it, rank {r} "
                                 f"{'does' if given else 'does not'}")
    if sum(row[4] for row in rows) == 0:
        raise ValueError("ref_shard is empty on every rank: the reference batch needs at least one row")


def stf_target_sharded(x: torch.Tensor, sigma, ref_shard: torch.Tensor, *, labels: torch.Tensor | None = None,
                       ref_labels: torch.Tensor | None = None, ref_logw: torch.Tensor | None = None,
                       group=None, precision: str = "highest", backend: str = "auto") -> torch.Tensor:
    """fastdiff.stf_target(x, sigma, cat(ref_shard of every rank)) for this rank's x.

    Args:
        x: this rank's noisy rows (B, *S); B must be the same on every rank of group.
        sigma: as for fastdiff.stf_target (float, 0-d, (B,) or (B, 1, ...)).
        ref_shard: this rank's share of the reference rows (N_r, *S); N_r may
            differ between ranks and may be 0 on some (not on all).
        labels: this rank's query labels (B,); ref_labels (N_r,) and ref_logw
            (N_r,): those of this rank's reference rows. As for
            fastdiff.stf_target, given on every rank or on none.
        group: the process group (default: the world). Without an initialized
            process group, or with one process, this is fastdiff.stf_target.
        precision, backend: passed to fastdiff.stf_target on each shard.

    Every rank of group must call it (it runs collectives). The result has x's
    shape and dtype and carries no gradient, like fastdiff.stf_target.
    """
    world = world_size(group)
    if world == 1:
        return fastdiff.ops.stf_target(x, sigma, ref_shard, labels=labels, ref_labels=ref_labels,
                                       ref_logw=ref_logw, precision=precision, backend=backend)
    for name, t in (("x", x), ("ref_shard", ref_shard)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1 or ref_shard.dim() != x.dim() or ref_shard.shape[1:] != x.shape[1:]:
        raise ValueError(f"ref_shard must have shape (N, {', '.join(map(str, x.shape[1:]))}) to match x of "
                         f"shape {tuple(x.shape)}; got {tuple(ref_shard.shape)}")
    if ref_shard.device != x.device:
        raise ValueError(f"x and ref_shard must be on the same device; x is on {x.device}, "
                         f"ref_shard on {ref_shard.device}")
    if (labels is None) != (ref_labels is None):     # before any collective: the same on every rank
        raise ValueError("labels and ref_labels go together: pass both (every rank) or neither")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (x.shape[0],)):
        raise ValueError(f"labels must be a tensor of shape ({x.shape[0]},), one label per row of x; got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    if _checking_values():
        _check_across_ranks(x, ref_shard, group, world, labels, ref_logw)
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
    labels_all = None
    if labels is not None:
        labels_all = labels.new_empty(world * B, dtype=torch.int64)
        dist.all_gather_into_tensor(labels_all, labels.detach().to(torch.int64).contiguous(), group=group)
    if ref_shard.shape[0]:
        # rows=False: a query whose label this shard lacks is the combine's business (weight 0)
        t_k, lse_k = _stf_target(x_all, s_all, ref_shard.detach().reshape(ref_shard.shape[0], D), labels_all,
                                 ref_labels, ref_logw, precision, backend, rows=False)
    else:                                       # an empty shard: weight 0 everywhere
        t_k = x_all
        lse_k = torch.full((world * B,), float("-inf"), dtype=torch.float64, device=x.device)
    every = lse_k.new_empty(world * world * B)
    dist.all_gather_into_tensor(every, lse_k, group=group)
    lse = every.view(world, world * B)                                   # every shard's float64 lse
    total = torch.logsumexp(lse, 0)
    served = None
    if labels_all is not None or ref_logw is not None:
        served = total > -math.inf                  # a query no shard serves: -inf everywhere
        if _checking_values():
            missing = (~served).nonzero().flatten()  # every rank holds all of lse: all raise alike
            if missing.numel():
                j = int(missing[0])
                r, i = divmod(j, B)
                if labels_all is None:
                    why = "no reference row to average over: every ref_logw is -inf on every rank"
                else:
                    lab = int(labels_all[j])
                    why = (f"label {lab} but no rank has a reference row with ref_labels == {lab}"
                           f"{' and ref_logw > -inf' if ref_logw is not None else ''}: its target is undefined")
                raise ValueError(f"row {i} of rank {r} has {why}")
        total = torch.where(served, total, 0.0)
    w = torch.exp(lse - total)                                           # (world, W*B) shard weights
    scale = w[rank]                                                      # this shard's share of each row
    # Offsets from x in float32 (float64 for float64 x): see the module docstring.
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = ((t_k.double() - x_all.double()) * scale[:, None]).to(cdt)
    off = part.new_empty(B, D)
    dist.reduce_scatter_tensor(off, part, group=group)
    t = x2.to(cdt) + off
    if served is not None:                      # value checks off: an unserved row is 0, as in stf_target
        t = torch.where(served[rank * B:(rank + 1) * B, None], t, 0.0)
    return t.to(x.dtype).reshape(x.shape)
