"""STF reference sets: which clean rows a batch's targets average over, and with what weights.

`make_refset(kind, dataset, ...)` returns a callable `refs(idx, flip) -> Refs(ref, ref_logw,
ref_labels)` for a batch of dataset rows idx (with their x-flips); the objective passes them to
`fastdiff.stf_target(x, sigma, ref, ref_logw=..., labels=..., ref_labels=...)`.

    uniform     the paper's: the batch's own rows plus ref_size - batch uniform draws with
                replacement, all of weight 1 (a consistent estimate only as ref_size grows).
    all         the whole training set, held on the device once: the empirical posterior mean,
                DSM's own minimizer on a finite set, with zero target variance. Under torchrun
                each rank holds rows rank::world and the ranks' partial targets are combined by
                their log-sum-exps (fastdiff.distributed.stf_target_sharded).
    neighbours  every batch row's source and its K nearest training samples (the union U,
                weight 1: they are in every draw) plus m = ref_size - |U| uniform draws without
                replacement from the other N - |U| rows, each of Horvitz-Thompson weight
                (N - |U|) / m: numerator and denominator of the posterior mean are then unbiased
                estimates of the whole set's, so the target is a consistent estimate of `all`'s,
                with the rows that carry the weight at small sigma always present.

Augmentation (--xflip). The set is the augmented training set: every image and its mirror
image, 2N rows (flipped copies are part of the set). That is the data distribution the network
is trained on, so `all` stays DSM's minimizer for it; matching a flipped batch row only against
flipped references would instead condition the target on a flip the network is never told of.
The cost is 2N rows; N for data without flips. A row's index in the augmented set is
i (as stored) or N + i (flipped); the k-NN table covers the stored rows, and a flipped row's
neighbours are its source's neighbours mirrored (the flip is an isometry that maps the set
onto itself).

Class-conditional models (--cond): ref_labels holds every reference row's class, the k-NN
table ranks rows of the source's class only, and the objective's label-dropout rows (trained
unconditionally) average over every class of the same reference rows.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from typing import NamedTuple

import torch

__all__ = ["Refs", "REF_SAMPLING", "make_refset", "knn_table", "augmented_index"]

REF_SAMPLING = ("uniform", "neighbours")


class Refs(NamedTuple):
    ref: torch.Tensor                    # (R, *S) clean reference rows (this rank's shard of them)
    ref_logw: torch.Tensor | None        # (R,) float32 additive log-weights, -inf for padding, or None
    ref_labels: torch.Tensor | None      # (R,) int64 classes, or None for unconditional training


# ----------------------------------------------------------------------------
# the k-NN table
# ----------------------------------------------------------------------------

def augmented_index(idx: torch.Tensor, flip: torch.Tensor | None, n: int) -> torch.Tensor:
    """Indices into the augmented set (i, or n + i for a flipped row)."""
    return idx if flip is None else idx + n * flip.to(idx.dtype)


def _mirror(aug: torch.Tensor, n: int) -> torch.Tensor:
    """The augmented index of each row's mirror image."""
    return torch.where(aug < n, aug + n, aug - n)


def _rows(dataset, aug: torch.Tensor, xflip: bool) -> torch.Tensor:
    """Augmented-set rows aug as float32 (N, D)."""
    n = len(dataset)
    src = aug % n if xflip else aug
    flip = (aug >= n) if xflip else None
    return dataset.get(src.to(dataset.data.device), None if flip is None else flip.to(dataset.data.device))


def knn_table(dataset, k: int, *, xflip: bool = False, labels: torch.Tensor | None = None,
              chunk: int = 1024) -> torch.Tensor:
    """(N, k) int64: for each stored row, the augmented-set indices of its k nearest other rows
    (Euclidean, nearest first, ties by index), among rows of its class when labels is given.

    Distances are ranked by float32 GEMMs (||q||^2 - 2 q.r + ||r||^2, chunked over the
    queries), whose error is bounded per query row by tau = 2.05 gamma_D ||q|| max||r|| + (a few
    ulps of the norms), gamma_D = D u / (1 - D u) (Higham's bound for a length-D dot product).
    Every row whose float32 distance is within a_k + 2 tau (a_k: the k-th smallest float32
    distance) is a candidate: the true k nearest are among them. The candidates are re-ranked by
    exact float64 differences; a row with more candidates than the GEMM pass kept falls back to
    float64 distances to every row. So the table is exact, not approximate.
    """
    n = len(dataset)
    naug = 2 * n if xflip else n
    if k < 1 or k > naug - 1:
        raise ValueError(f"--ref-neighbours must be in [1, {naug - 1}] for {naug} reference rows, got {k}")
    dev = dataset.data.device
    allrows = torch.arange(naug, device=dev)
    R = _rows(dataset, allrows, xflip).flatten(1)                       # (Naug, D) float32
    D = R.shape[1]
    # float64 copies are made a slice at a time (at CIFAR-10 size the whole set would be 2.4 GB more)
    rn64 = torch.cat([R[i:i + 8192].double().pow(2).sum(1) for i in range(0, naug, 8192)])
    rn32 = rn64.float()
    u = 2.0 ** -24
    gamma = D * u / (1 - D * u)
    rmax = rn64.max().sqrt()
    lab_aug = None if labels is None else labels.to(dev).repeat(2 if xflip else 1)
    keep = min(naug - 1, 2 * k + 16)                                     # candidates kept from the GEMM pass
    out = torch.empty(n, k, dtype=torch.long, device=dev)
    for s in range(0, n, chunk):
        q = torch.arange(s, min(s + chunk, n), device=dev)
        Q = R[q]
        qn64 = rn64[q]
        d = (qn64.float()[:, None] - 2 * (Q @ R.T)) + rn32[None, :]      # (c, Naug) float32
        tau = (2.05 * gamma * qn64.sqrt() * rmax + 8 * u * (qn64 + rmax ** 2)).float()
        excluded = torch.zeros_like(d, dtype=torch.bool)
        excluded[torch.arange(len(q), device=dev), q] = True            # the row itself
        if lab_aug is not None:
            excluded |= lab_aug[None, :] != lab_aug[q][:, None]
        d.masked_fill_(excluded, float("inf"))
        vals, cand = d.topk(keep, dim=1, largest=False, sorted=True)
        a_k = vals[:, k - 1]
        if torch.isinf(a_k).any():
            c = int(lab_aug[q[torch.isinf(a_k)][0]])
            raise ValueError(f"--ref-neighbours {k}: class {c} has at most {k} rows in the reference set; "
                             f"choose a smaller K")
        enough = (vals[:, -1] > a_k + 2 * tau) | torch.isinf(vals[:, -1])
        # exact float64 distances of the candidates, re-ranked (ties: the lower index first)
        exact = torch.cat([(Q[i:i + 32, None, :].double() - R[cand[i:i + 32]].double()).pow(2).sum(-1)
                           for i in range(0, len(q), 32)])
        exact = torch.where(torch.isinf(vals), float("inf"), exact)
        out[q] = _rank(exact, cand, k)
        for j in torch.nonzero(~enough).flatten().tolist():               # too many near-ties: every row
            out[q[j]] = _exact_neighbours(R, int(q[j]), k, lab_aug)
    return out


def _exact_neighbours(R: torch.Tensor, r: int, k: int, lab_aug) -> torch.Tensor:
    """Row r's k nearest other rows of R (of its class), by float64 differences."""
    q = R[r].double()
    e = torch.cat([(R[i:i + 8192].double() - q).pow(2).sum(1) for i in range(0, len(R), 8192)])
    e[r] = float("inf")
    if lab_aug is not None:
        e[lab_aug != lab_aug[r]] = float("inf")
    return _rank(e[None], torch.arange(len(R), device=R.device)[None], k)[0]


def _rank(dist: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries of idx with the smallest dist per row, ties broken by the lower index."""
    order = torch.argsort(idx, dim=1, stable=True)
    dist, idx = dist.gather(1, order), idx.gather(1, order)
    top = torch.argsort(dist, dim=1, stable=True)[:, :k]
    return idx.gather(1, top)


def _fingerprint(dataset, k: int, xflip: bool, labels) -> str:
    h = hashlib.sha256()
    h.update(f"knn v1 k={k} xflip={xflip} n={len(dataset)} shape={tuple(dataset.shape)} "
             f"dtype={dataset.data.dtype}".encode())
    h.update(dataset.data.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_knn_table(dataset, k: int, run_dir: str | None, *, xflip: bool, labels=None, log=print,
                     rank: int = 0, barrier=None) -> torch.Tensor:
    """knn_table, computed once and kept in run_dir/knn-K.pt. On reuse the file must name the same
    data, K, flips and labels (a hash of them) and a few of its rows, recomputed, must agree;
    otherwise it is computed afresh (with a warning) and rewritten. Under torchrun rank 0 writes
    it and the others wait at barrier(), then read it."""
    fp = _fingerprint(dataset, k, xflip, labels)
    path = None if run_dir is None else os.path.join(run_dir, f"knn-{k}.pt")
    table = _load_table(path, fp, dataset, k, xflip, labels, log) if path and rank == 0 else None
    if rank == 0 and table is None:
        log(f"  k-NN table: {k} neighbours of {len(dataset)} rows" + (f" -> {path}" if path else ""))
        table = knn_table(dataset, k, xflip=xflip, labels=labels)
        if path:
            os.makedirs(run_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            torch.save({"fingerprint": fp, "k": k, "table": table.cpu()}, tmp)
            os.replace(tmp, path)
    if barrier is not None:
        barrier()
        if rank != 0:
            table = _load_table(path, fp, dataset, k, xflip, labels, log, check=False)
            if table is None:
                raise RuntimeError(f"rank {rank}: rank 0's k-NN table {path} is missing or does not match")
    return table.to(dataset.data.device)


def _load_table(path, fp, dataset, k, xflip, labels, log, check: bool = True):
    if path is None or not os.path.exists(path):
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        table = saved["table"]
        ok = saved["fingerprint"] == fp and table.shape == (len(dataset), k) and table.dtype == torch.long
    except Exception as e:                          # a torn or foreign file: computed afresh
        ok, table = False, None
        warnings.warn(f"{path}: unreadable k-NN table ({type(e).__name__}: {e}); computing it afresh")
    if ok and check:
        # spot-check: a few rows recomputed against the whole set
        rows = torch.linspace(0, len(dataset) - 1, min(8, len(dataset))).long()
        again = knn_table_rows(dataset, rows, k, xflip=xflip, labels=labels)
        ok = torch.equal(again.cpu(), table[rows])
    if not ok:
        if table is not None:
            warnings.warn(f"{path} does not match this data, K, --xflip and labels; computing it afresh")
        return None
    log(f"  k-NN table: reusing {path}")
    return table


def knn_table_rows(dataset, rows: torch.Tensor, k: int, *, xflip: bool, labels=None) -> torch.Tensor:
    """The k-NN table's rows `rows`, by float64 distances to every row (the oracle and the cache's check)."""
    n = len(dataset)
    dev = dataset.data.device
    R = _rows(dataset, torch.arange(2 * n if xflip else n, device=dev), xflip).flatten(1)
    lab_aug = None if labels is None else labels.to(dev).repeat(2 if xflip else 1)
    return torch.stack([_exact_neighbours(R, r, k, lab_aug) for r in rows.tolist()])


# ----------------------------------------------------------------------------
# reference sets
# ----------------------------------------------------------------------------

class _Uniform:
    """The batch's own rows plus m uniform draws with replacement (the paper's reference batch)."""

    batch_in_ref = True

    def __init__(self, dataset, sampler, m: int, labels):
        self.dataset, self.sampler, self.m, self.labels = dataset, sampler, m, labels

    def __call__(self, idx, flip) -> Refs:
        dev = self.dataset.data.device
        if self.m:
            ridx, rflip = self.sampler.ref_rows(self.m)
            idx = torch.cat([idx, ridx])
            flip = None if flip is None else torch.cat([flip, rflip])
        ref = self.dataset.get(idx.to(dev), None if flip is None else flip.to(dev))
        return Refs(ref, None, None if self.labels is None else self.labels[idx.to(dev)])


class _All:
    """The whole (augmented) training set, this rank's rows rank::world of it, built once."""

    def __init__(self, dataset, labels, xflip: bool, rank: int, world: int):
        n = len(dataset)
        naug = 2 * n if xflip else n
        mine = torch.arange(rank, naug, world, device=dataset.data.device)
        self.ref = _rows(dataset, mine, xflip)
        self.ref_labels = None if labels is None else (torch.cat([labels, labels]) if xflip else labels)[mine]

    def __call__(self, idx, flip) -> Refs:
        return Refs(self.ref, None, self.ref_labels)


class _Neighbours:
    """Every batch row's source and its K nearest rows (weight 1) plus m uniform draws without
    replacement from the rest (Horvitz-Thompson weight (N_aug - |U|) / m each); R rows in all,
    padded with -inf-weighted rows where the rest has fewer than m rows."""

    def __init__(self, dataset, sampler, table: torch.Tensor, size: int, labels, xflip: bool):
        self.dataset, self.sampler, self.size, self.labels, self.xflip = dataset, sampler, size, labels, xflip
        self.n = len(dataset)
        self.naug = 2 * self.n if xflip else self.n
        self.table = table.cpu()                 # the index work runs on the CPU, beside the sampler's generator
        self.labels_aug = None if labels is None else (torch.cat([labels, labels]) if xflip else labels).cpu()

    def union(self, idx: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        own = augmented_index(idx, flip, self.n)
        nb = self.table[idx]
        if flip is not None:
            nb = torch.where(flip[:, None], _mirror(nb, self.n), nb)
        return torch.unique(torch.cat([own, nb.flatten()]))

    def draw(self, idx, flip, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented indices (R,), log-weights (R,)) of one reference draw."""
        u = self.union(idx.cpu(), None if flip is None else flip.cpu())
        if len(u) > self.size:
            raise ValueError(f"--ref-size {self.size} is smaller than this batch's neighbour union ({len(u)} "
                             f"rows): raise --ref-size or lower --ref-neighbours")
        rest = self.naug - len(u)
        m = min(self.size - len(u), rest)
        keys = torch.rand(self.naug, generator=gen)
        keys[u] = 2.0                                         # never drawn: uniform without replacement from the rest
        drawn = keys.topk(m, largest=False).indices if m else torch.zeros(0, dtype=torch.long)
        pad = self.size - len(u) - m
        aug = torch.cat([u, drawn, u[:1].expand(pad)])
        logw = torch.cat([torch.zeros(len(u)), torch.full((m,), math.log(rest / m) if m else 0.0),
                          torch.full((pad,), float("-inf"))])
        return aug, logw

    def __call__(self, idx, flip) -> Refs:
        aug, logw = self.draw(idx, flip, self.sampler.ref_gen)
        dev = self.dataset.data.device
        ref = _rows(self.dataset, aug, self.xflip)
        labels = None if self.labels_aug is None else self.labels_aug[aug].to(dev)
        return Refs(ref, logw.to(dev), labels)


def make_refset(kind, dataset, sampler, *, batch: int, ref_size, neighbours: int = 0, cond: bool = False,
                rank: int = 0, world: int = 1, run_dir: str | None = None, barrier=None, log=print):
    """The reference set for training: kind "uniform" or "neighbours", or ref_size "all".

    Returns refs(idx, flip) -> Refs. For "all" the rows are built here, once, on the dataset's
    device (this rank's share under torchrun); "neighbours" computes or reuses its k-NN table.
    """
    labels = dataset.require_labels() if cond else None
    xflip = bool(dataset.xflip)
    if ref_size == "all":
        return _All(dataset, labels, xflip, rank, world)
    if kind == "uniform":
        return _Uniform(dataset, sampler, ref_size - batch, labels)
    if kind != "neighbours":
        raise ValueError(f"--ref-sampling must be one of {REF_SAMPLING}, got {kind!r}")
    if neighbours < 1:
        raise ValueError(f"--ref-sampling neighbours needs --ref-neighbours K >= 1, got {neighbours}")
    table = cached_knn_table(dataset, neighbours, run_dir, xflip=xflip, labels=labels, log=log, rank=rank,
                             barrier=barrier)
    return _Neighbours(dataset, sampler, table, ref_size, labels, xflip)
