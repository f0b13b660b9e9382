"""Distributed STF reference batch: gather the rows vs shard them (fastdiff.distributed).

Per step and rank, the STF target part of a step under torchrun:

    gather  all_gather every rank's reference rows (N/W each), then
            fastdiff.stf_target(x, sigma, all N rows)                  (what train.py --ref-dist gather does)
    shard   fastdiff.distributed.stf_target_sharded(x, sigma, own N/W rows)
            (all_gather x and sigma, local partial, all_gather lse, reduce_scatter)

Both give the same target. W processes on this machine's CPU over gloo, one
thread each; the two peers alternate round by round (paired, robust to the
machine's speed drifting), and a round's time is the slowest rank's.

    python benchmarks/distributed_ref.py [--world 2] [--batch 16] [--dim 3072] [--sizes 512,1024,2048]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdiff
from fastdiff.distributed import stf_target_sharded


def gather_target(x, sigma, ref_shard):
    world = dist.get_world_size()
    rows = torch.empty(world * ref_shard.shape[0], *ref_shard.shape[1:], dtype=ref_shard.dtype)
    dist.all_gather_into_tensor(rows, ref_shard.contiguous())
    return fastdiff.stf_target(x, sigma, rows)


PEERS = {"gather": gather_target, "shard": stf_target_sharded}


def _worker(rank, world, init, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    g = torch.Generator().manual_seed(1000 + rank)
    times = {}
    for N in args.sizes:
        n_local = N // world
        if args.clusters:
            # rows around a few centres shared by all ranks: posteriors spread over both shards
            centres = torch.rand(args.clusters, args.dim, generator=torch.Generator().manual_seed(7)) * 2 - 1
            pick = torch.randint(0, args.clusters, (n_local,), generator=g)
            shard = centres[pick] + args.spread * torch.randn(n_local, args.dim, generator=g)
        else:
            shard = torch.rand(n_local, args.dim, generator=g) * 2 - 1    # this rank's y and draws
        # EDM's training density: ln sigma ~ N(-1.2, 1.2^2)
        sigma = torch.exp(-1.2 + 1.2 * torch.randn(args.batch, generator=g))
        x = shard[:args.batch] + sigma[:, None] * torch.randn(args.batch, args.dim, generator=g)
        t = {name: fn(x, sigma, shard) for name, fn in PEERS.items()}                    # warm-up
        diff = ((t["gather"] - t["shard"]).norm(dim=1) / (sigma * args.dim ** 0.5)).max()
        # The local op alone, on inputs gathered beforehand: where the time goes.
        rows = torch.empty(world * n_local, args.dim)
        dist.all_gather_into_tensor(rows, shard)
        x_all, s_all = torch.empty(world * args.batch, args.dim), torch.empty(world * args.batch)
        dist.all_gather_into_tensor(x_all, x)
        dist.all_gather_into_tensor(s_all, sigma)
        peers = {**PEERS, "gather op": lambda *_: fastdiff.stf_target(x, sigma, rows),
                 "shard op": lambda *_: fastdiff.stf_target(x_all, s_all, shard, return_lse=True)}
        for name in peers:
            times[N, name] = []
        for _ in range(args.rounds):
            for name, fn in peers.items():
                dist.barrier()
                t0 = time.perf_counter()
                fn(x, sigma, shard)
                times[N, name].append(time.perf_counter() - t0)
        times[N, "diff"] = float(diff)
    every = [None] * world
    dist.all_gather_object(every, times)
    if rank == 0:
        torch.save(every, out)
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="queries per rank")
    p.add_argument("--dim", type=int, default=3072, help="values per row (3x32x32)")
    p.add_argument("--sizes", default="512,1024,2048", help="total reference rows N (all ranks)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clusters", type=int, default=0, help="draw the rows around this many shared centres "
                                                           "(0: uniform in [-1, 1]^D)")
    p.add_argument("--spread", type=float, default=0.1, help="per-value std of the rows around their centre")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        mp.spawn(_worker, args=(args.world, f"file://{tmp}/store", args, out), nprocs=args.world, join=True)
        every = torch.load(out)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    W, B, D = args.world, args.batch, args.dim
    print(f"machine: {cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end")
    from fastdiff.ops import _dispatch
    print(f"software: Python {platform.python_version()}, torch {torch.__version__}, gloo, {W} processes x 1 "
          f"thread; fastdiff.stf_target backend auto = {_dispatch.resolve('stf_target', 'auto', 'cpu')[0]}")
    print(f"commit: {commit}")
    print(f"command: python benchmarks/distributed_ref.py --world {W} --batch {B} --dim {D} "
          f"--sizes {','.join(map(str, args.sizes))} --rounds {args.rounds}"
          + (f" --clusters {args.clusters} --spread {args.spread}" if args.clusters else ""))
    print("data: " + (f"rows around {args.clusters} centres shared by the ranks (std {args.spread})" if args.clusters
                      else "rows uniform in [-1, 1]^D"))
    print(f"B = {B} queries per rank, D = {D}, sigma ~ EDM's lognormal; time per call = the slowest rank's, "
          f"median over {args.rounds} rounds; paired = median over rounds of shard / gather")
    print("MB received per rank and step: gather (W-1) (N/W) D 4 bytes; shard (W-1) B (2 D + 1) 4 + (W-1) W B 8 bytes "
          "(x and sigma all-gathered, the (B, D) offsets reduce-scattered, the float64 lse all-gathered)")
    print("gather op / shard op: the local fastdiff.stf_target call alone (B x N, and W B x N/W), no collectives")
    print("max diff: max_i ||t_gather - t_shard|| / (sigma_i sqrt(D))")
    print()
    print(f"{'N total':>8} {'N/rank':>7} {'gather ms':>10} {'shard ms':>9} {'paired':>7} {'gather op':>10} "
          f"{'shard op':>9} {'gather MB':>10} {'shard MB':>9} {'max diff':>9}")
    for N in args.sizes:
        slowest = {name: [max(every[r][N, name][i] for r in range(W)) for i in range(args.rounds)]
                   for name in (*PEERS, "gather op", "shard op")}
        med = {name: statistics.median(v) * 1e3 for name, v in slowest.items()}
        paired = statistics.median(s / g for s, g in zip(slowest["shard"], slowest["gather"]))
        gather_mb = (W - 1) * (N // W) * D * 4 / 1e6
        shard_mb = (W - 1) * B * ((2 * D + 1) * 4 + W * 8) / 1e6
        diff = max(every[r][N, "diff"] for r in range(W))
        print(f"{N:>8} {N // W:>7} {med['gather']:>10.2f} {med['shard']:>9.2f} {paired:>7.2f} "
              f"{med['gather op']:>10.2f} {med['shard op']:>9.2f} {gather_mb:>10.2f} {shard_mb:>9.2f} {diff:>9.1e}")


if __name__ == "__main__":
    main()
