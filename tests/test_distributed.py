"""fastdiff.distributed.stf_target_sharded across 2 gloo processes, and `--ref-dist shard` training.

The sharded target must equal the float64 oracle for the concatenated reference
batch (the same contract as fastdiff.stf_target), whatever the split of the
rows over the ranks: ragged shards, an empty shard, a shard that is far from
every query (its partial lse ~ -1e7), and near-duplicate rows split across
ranks at distance ~sigma = 0.002, where both partials carry weight and the
precision of the partial lse matters most.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import fastdiff
from fastdiff.distributed import stf_target_sharded, world_size
from fastdiff.train import _exit_worker, main

sys.path.insert(0, os.path.dirname(__file__))
from test_stf import CONTRACT, assert_contract, oracle, row_err  # noqa: E402
from test_train import TINY  # noqa: E402

WORLD = 2
SIGMAS = [0.002, 0.002, 0.02, 0.5, 5.0, 80.0, 0.002]


def _case(name: str):
    """(x per rank, sigma per rank, shard per rank) for a named case; the same on every rank."""
    g = torch.Generator().manual_seed(zlib_seed(name))
    if name == "bisect":
        return _bisect(g)
    D = 3072 if name == "d3072" else 48
    if name == "empty":
        sizes, B = [0, 31], 3
    elif name == "b1":
        sizes, B = [1, 47], 1
    else:
        sizes, B = [47, 123], len(SIGMAS)
    shards = [torch.rand(n, D, generator=g) * 2 - 1 for n in sizes]
    if name == "far":
        shards[1] += 50.0                        # every row of rank 1's shard far from every query
    ref = torch.cat(shards)
    sig = torch.tensor((SIGMAS * 2)[:B], dtype=torch.float32)
    xs, sigmas = [], []
    for r in range(WORLD):
        src = torch.randint(0, sizes[0] if name == "far" else ref.shape[0], (B,), generator=g)
        y = ref[src].clone()
        s = sig.roll(r)
        if name in ("dup", "d3072") and B > 1:
            # near-duplicates across ranks: row 0 of shard 0 moved by ~sigma into shard 1
            a = shards[0][r]
            shards[1][r] = a + 0.002 * torch.randn(D, generator=g) / math.sqrt(D)
            y[0], s[0] = a, 0.002
        xs.append(y + s[:, None] * torch.randn(B, D, generator=g))
        sigmas.append(s)
    return xs, sigmas, shards


def _bisect(g):
    """Queries on the bisecting hyperplane of two clusters, one per rank, c sigma sqrt(D) apart:
    both partials carry weight ~1/2 and differ by c sigma sqrt(D), and |lse| ~ (1 + c^2/4) D/2,
    so a float32 lse (the op's before it returned float64) would err by up to ~1e-4 c (1 + c^2 / 4)
    (4e-4 at c = 4)."""
    D = 3072
    pairs = [(2.0, [2.0, 1.0, 0.5, 0.25]), (4 * 0.002, [0.004, 0.002, 0.002])]   # (c sigma, sigmas)
    shards, xs, sigmas = [[], []], [[], []], [[], []]
    for spread, sig in pairs:
        a = torch.rand(D, generator=g) * 2 - 1
        u = torch.randn(D, generator=g)
        u /= u.norm()
        b = a + spread * math.sqrt(D) * u
        for r, centre in enumerate((a, b)):
            shards[r].append(centre + 1e-3 * spread * torch.randn(3, D, generator=g) / math.sqrt(D))
        for r in range(WORLD):
            n = torch.randn(len(sig), D, generator=g)
            n -= (n @ u)[:, None] * u                    # on the bisector
            s = torch.tensor(sig)
            xs[r].append((a + b) / 2 + s[:, None] * n)
            sigmas[r].append(s)
    far = [torch.rand(5 + 4 * r, D, generator=g) * 2 - 1 for r in range(WORLD)]
    return ([torch.cat(x) for x in xs], [torch.cat(s) for s in sigmas],
            [torch.cat([*sh, f]) for sh, f in zip(shards, far)])


def _terms_case():
    """The "dup" case with labels and log-weights: per rank, query labels; per shard, ref_labels
    (label 3 on shard 1 only, so shard 0 serves none of its queries) and ref_logw with -inf
    entries; the near-duplicate pair across ranks in two classes."""
    xs, sigmas, shards = _case("dup")
    g = torch.Generator().manual_seed(zlib_seed("terms"))
    ref_labels = [torch.randint(0, 3, (sh.shape[0],), generator=g) for sh in shards]
    ref_labels[1][:20] = 3
    ref_logw = [2.0 * torch.randn(sh.shape[0], generator=g, dtype=torch.float64) for sh in shards]
    for lw in ref_logw:
        lw[5::6] = -math.inf
    labels = []
    for r in range(WORLD):
        lab = torch.randint(0, 4, (xs[r].shape[0],), generator=g)
        lab[0] = ref_labels[0][r]              # the near-duplicate's source keeps its class...
        ref_labels[1][r] = (ref_labels[0][r] + 1) % 3   # ...and the duplicate on rank 1 another one
        ref_logw[0][r] = 0.0
        labels.append(lab)
    return xs, sigmas, shards, labels, ref_labels, ref_logw


TERM_KINDS = ("labels", "ref_logw", "both")


def _terms_kw(kind, labels, ref_labels, ref_logw):
    kw = {}
    if kind in ("labels", "both"):
        kw.update(labels=labels, ref_labels=ref_labels)
    if kind in ("ref_logw", "both"):
        kw.update(ref_logw=ref_logw)
    return kw


def zlib_seed(name: str) -> int:
    import zlib
    return zlib.crc32(name.encode())


CASES = ["ragged", "far", "dup", "empty", "b1", "d3072", "bisect"]


def _worker(rank: int, init: str, out: str, port: int, task: str):
    import faulthandler
    faulthandler.dump_traceback_later(240, exit=True)     # a stuck rank prints where it is, then exits
    torch.set_num_threads(1)
    if task != "targets":
        # A short training run (as torchrun starts it): the reference rows gathered or sharded.
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        os.environ.pop("FASTDIFF_FAULT", None)
        code = main([*TINY, "--steps", "3", "--ckpt-every", "3", "--out", os.path.join(out, "runs"),
                     "--name", task, "--ref-dist", task, "--threads", "1"])
        assert code == 0, code
        _exit_worker(0)          # as under torchrun: skip the C++ teardown of the group DDP keeps alive
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    results = {}
    for name in CASES:
        xs, sigmas, shards = _case(name)
        for backend in ("auto", "torch"):
            results[name, backend] = stf_target_sharded(xs[rank], sigmas[rank], shards[rank], backend=backend)
    # a float sigma, and a (B, 1) sigma
    xs, sigmas, shards = _case("ragged")
    results["float"] = stf_target_sharded(xs[rank], 0.5, shards[rank])
    results["b1sigma"] = stf_target_sharded(xs[rank], sigmas[rank][:, None], shards[rank])
    for dt in (torch.float64, torch.bfloat16):
        results[dt] = stf_target_sharded(xs[rank].to(dt), sigmas[rank], shards[rank].to(dt))
    # labels / ref_labels / ref_logw: each rank its own queries' labels and its shard's terms
    xs, sigmas, shards, labels, ref_labels, ref_logw = _terms_case()
    for kind in TERM_KINDS:
        for backend in ("auto", "torch"):
            kw = _terms_kw(kind, labels[rank], ref_labels[rank], ref_logw[rank])
            results["terms", kind, backend] = stf_target_sharded(xs[rank], sigmas[rank], shards[rank],
                                                                 backend=backend, **kw)
    # every rank must reject a batch-size mismatch by naming the argument
    errors = {}
    lab = labels[rank].clone()
    lab[1] = 42 if rank == 1 else lab[1]
    try:
        stf_target_sharded(xs[rank], sigmas[rank], shards[rank], labels=lab, ref_labels=ref_labels[rank])
    except ValueError as e:
        errors["no_ref"] = str(e)
    try:
        stf_target_sharded(xs[rank], sigmas[rank], shards[rank], ref_logw=ref_logw[rank] if rank else None)
    except ValueError as e:
        errors["terms_mismatch"] = str(e)
    try:
        stf_target_sharded(xs[rank][:3 + rank], 0.5, shards[rank])
    except ValueError as e:
        errors["batch"] = str(e)
    try:
        stf_target_sharded(xs[rank].double() if rank else xs[rank], 0.5, shards[rank].double() if rank else
                           shards[rank])
    except TypeError as e:
        errors["dtype"] = str(e)
    try:
        stf_target_sharded(xs[rank], 0.5, shards[rank][:0])
    except ValueError as e:
        errors["all_empty"] = str(e)
    torch.save({"results": results, "errors": errors}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    # The sharded targets, then the two training runs, each in processes of its own: with
    # torch 2.11, a second training run in processes that had run one before hung now and then
    # in its process-group teardown (never a first run; torchrun starts one run per process).
    for task in ("targets", "gather", "shard"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.spawn(_worker, args=(f"file://{tmp / task}", str(tmp), port, task), nprocs=WORLD, join=False)
        deadline = time.monotonic() + 300               # a rank stuck in a collective must not hang the suite
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for proc in ctx.processes:
                    proc.kill()
                pytest.fail(f"the 2-process {task!r} workers did not finish within 300 s")
    return {"ranks": [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)], "dir": tmp}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("name", CASES)
def test_sharded_target_meets_the_contract_for_the_whole_reference(sharded, name, backend):
    xs, sigmas, shards = _case(name)
    ref = torch.cat(shards)
    for r in range(WORLD):
        t = sharded["ranks"][r]["results"][name, backend]
        assert t.shape == xs[r].shape and t.dtype == xs[r].dtype
        t64, _ = oracle(xs[r], sigmas[r], ref)
        err = row_err(t, t64, sigmas[r])
        assert err.max() <= CONTRACT, f"rank {r}: err {err.tolist()} sigma {sigmas[r].tolist()}"


def test_sharded_target_sigma_forms(sharded):
    xs, sigmas, shards = _case("ragged")
    ref = torch.cat(shards)
    for r in range(WORLD):
        assert row_err(sharded["ranks"][r]["results"]["float"], oracle(xs[r], 0.5, ref)[0], 0.5).max() <= CONTRACT
        t = sharded["ranks"][r]["results"]["b1sigma"]
        assert row_err(t, oracle(xs[r], sigmas[r], ref)[0], sigmas[r]).max() <= CONTRACT


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sharded_target_dtypes(sharded, dtype):
    xs, sigmas, shards = _case("ragged")
    for r in range(WORLD):
        t = sharded["ranks"][r]["results"][dtype]
        assert t.dtype == dtype
        assert_contract(t, xs[r].to(dtype), sigmas[r], torch.cat(shards).to(dtype))


def test_sharded_target_mismatches_raise_on_every_rank(sharded):
    for r in range(WORLD):
        e = sharded["ranks"][r]["errors"]
        assert "x must have the same batch size on every rank" in e["batch"]
        assert "x must have the same dtype on every rank" in e["dtype"]
        assert "ref_shard is empty on every rank" in e["all_empty"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("kind", TERM_KINDS)
def test_sharded_target_with_labels_and_log_weights(sharded, kind, backend):
    xs, sigmas, shards, labels, ref_labels, ref_logw = _terms_case()
    ref = torch.cat(shards)
    for r in range(WORLD):
        kw = _terms_kw(kind, labels[r], torch.cat(ref_labels), torch.cat(ref_logw))
        t = sharded["ranks"][r]["results"]["terms", kind, backend]
        assert t.shape == xs[r].shape and torch.isfinite(t).all()
        t64, _ = oracle(xs[r], sigmas[r], ref, **kw)
        err = row_err(t, t64, sigmas[r])
        assert err.max() <= CONTRACT, f"rank {r}: err {err.tolist()} sigma {sigmas[r].tolist()}"


def test_sharded_target_terms_errors_on_every_rank(sharded):
    for r in range(WORLD):
        e = sharded["ranks"][r]["errors"]
        assert "row 1 of rank 1 has label 42 but no rank has a reference row with ref_labels == 42" in e["no_ref"]
        assert "ref_logw must be given on every rank or on none" in e["terms_mismatch"]


def test_single_process_is_stf_target():
    assert world_size() == 1
    x, ref = torch.randn(5, 3, 4), torch.randn(9, 3, 4)
    sigma = torch.tensor([0.002, 0.1, 1.0, 5.0, 80.0])
    assert torch.equal(stf_target_sharded(x, sigma, ref), fastdiff.stf_target(x, sigma, ref))
    with pytest.raises(ValueError, match="ref must have shape"):
        stf_target_sharded(x, sigma, ref[:, :2])


def _run_record(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    sums = [x["rank_param_checksums"] for x in lines if "rank_param_checksums" in x]
    assert len(sums) == 1 and all(s[0] == s[1] for s in sums)          # the ranks stay in sync
    return [x["loss"] for x in lines if "loss" in x], json.loads((run / "config.json").read_text())


def test_ddp_shard_matches_gather(sharded):
    gather, config = _run_record(sharded["dir"] / "runs" / "gather")
    assert config["ref_dist"] == "gather" and config["world_size"] == WORLD
    shard, config = _run_record(sharded["dir"] / "runs" / "shard")
    assert config["ref_dist"] == "shard"
    # The same reference set in another order: targets agree to ~1e-6, so do the losses.
    assert len(shard) == len(gather) == 3
    assert shard == pytest.approx(gather, rel=1e-4, abs=1e-6)


def test_objective_target_hook():
    from fastdiff.diffusion import make_objective
    calls = []

    def target_fn(x, sigma, ref, **kw):
        calls.append((x.shape, ref.shape, kw))
        return fastdiff.stf_target(x, sigma, ref, **kw)

    y, extra = torch.rand(4, 6) * 2 - 1, torch.rand(5, 6) * 2 - 1
    net = lambda x, c: x                                  # noqa: E731
    obj = make_objective(stf_target_fn=target_fn)
    g = torch.Generator().manual_seed(0)
    loss, _ = obj(net, y, extra, generator=g)
    assert calls == [((4, 6), (9, 6), {"precision": "highest", "backend": "auto"})]
    ref_loss, _ = make_objective()(net, y, extra, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, ref_loss)


def test_checkpoint_without_ref_dist_resumes(tmp_path):
    """A checkpoint from before --ref-dist (no such key in its config) resumes; ref_dist is decided afresh."""
    from fastdiff import checkpoint as ckpt_io
    assert main([*TINY, "--steps", "2", "--ckpt-every", "2", "--out", str(tmp_path), "--name", "old"]) == 0
    path = tmp_path / "old" / "checkpoint-0000002.pt"
    state = ckpt_io.load(str(path))
    del state["config"]["ref_dist"]
    ckpt_io.save(state, str(path))
    assert main(["--resume", str(tmp_path / "old"), "--steps", "3", "--ref-dist", "shard"]) == 0
    assert ckpt_io.load(str(tmp_path / "old" / "checkpoint-0000003.pt"))["config"]["ref_dist"] == "shard"
