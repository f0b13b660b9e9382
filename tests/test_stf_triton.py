"""The Triton backend of stf_target, run on CPU in Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is imported, so the checks run
in one subprocess (this file executed as a script with the variable set) that
prints a JSON report; the tests below read it. Small fp32 cases that still
reach every path: ragged tails in B, N and D (tiles are 16 wide there),
several N chunks, several splits, an empty split, the combine, mixed per-row
sigma, near-duplicate and duplicated reference rows at small sigma, x equal to
a reference row, return_lse, outputs poisoned with NaN, against a float64
oracle (direct differences). tests/test_triton_aot.py compiles the kernels
ahead of time for sm_90 (Hopper).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

CONTRACT = 1e-4   # err_i = ||t_i - t64_i|| / (sigma_i sqrt(D)), precision="highest"


# ----------------------------------------------------------------------------
# the worker (runs under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------

def _oracle(x, sigma, ref, labels=None, ref_labels=None, ref_logw=None):
    """float64 direct-difference reference: (t, lse); + ref_logw_k, -inf across labels."""
    import torch
    x, s, r = x.double(), sigma.double(), ref.double()
    d = ((x[:, None, :] - r[None]) ** 2).sum(-1)
    logit = -d / (2 * s[:, None] ** 2)
    if ref_logw is not None:
        logit = logit + ref_logw.double()[None, :]
    if labels is not None:
        logit = logit.masked_fill(labels[:, None] != ref_labels[None, :], -math.inf)
    return torch.softmax(logit, 1) @ r, torch.logsumexp(logit, 1)


def _err(t, t64, sigma, D):
    return ((t.double() - t64).norm(dim=1) / (sigma.double() * math.sqrt(D))).max().item()


def _adversarial(B, N, D, seed, offset=8.0):
    """Mean-offset data (the expansion cancels badly), a near-duplicate pair at distance
    ~sigma, an exact duplicate, x equal to a reference row, sigma over [0.002, 80]."""
    import torch
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(N, D, generator=g) * 2 - 1 + offset
    ref[min(5, N - 1)] = ref[min(3, N - 1)] + 0.002 * torch.randn(D, generator=g)
    ref[N - 1] = ref[0]
    sig_all = torch.tensor([0.002, 0.01, 0.1, 1.0, 10.0, 80.0, 0.002, 0.03])
    sigma = sig_all[torch.arange(B) % len(sig_all)]
    x = ref[torch.arange(B) % N] + sigma[:, None] * torch.randn(B, D, generator=g)
    x[B - 1] = ref[min(3, N - 1)]
    return x, sigma, ref


def _run_case(name, x, sigma, ref, precision="highest", splits=None, chunk=None, **terms):
    import torch
    from fastdiff.kernels import stf as K
    B, D = x.shape
    t = torch.full_like(x, float("nan"))
    lse = torch.full((B,), float("nan"), dtype=torch.float64)
    K.stf_target_splits(x, sigma, ref, precision, t, lse, splits=splits, chunk=chunk, **terms)
    t64, lse64 = _oracle(x, sigma, ref, **terms)
    return name, {
        "finite": bool(torch.isfinite(t).all() and torch.isfinite(lse).all()),
        "err": _err(t, t64, sigma, D),
        "lse_rel": ((lse.double() - lse64).abs() / lse64.abs().clamp_min(1.0)).max().item(),
    }


def _worker() -> dict:
    import warnings
    import time

    import numpy as np
    import torch

    import fastdiff
    from fastdiff.kernels import stf as K

    warnings.simplefilter("ignore")
    np.seterr(all="ignore")      # masked-off lanes compute exp(-inf - -inf) in the interpreter
    out = {}
    t_start = time.time()

    # splits x chunks: S=1 one chunk; S=2, Cs=16: span 32 -> two chunks per split (N=47);
    # S=4: span 16 -> splits cover 48 >= 47 rows, split 3 is empty; S=3, Cs=16 on N=40.
    x, s, r = _adversarial(7, 47, 37, seed=1)
    for splits, chunk in [(1, None), (2, 16), (4, 16)]:
        k, v = _run_case(f"adv_S{splits}_C{chunk}", x, s, r, splits=splits, chunk=chunk)
        out[k] = v
    x, s, r = _adversarial(8, 40, 40, seed=2)
    k, v = _run_case("adv_B8_N40_D40_S3", x, s, r, splits=3, chunk=16)
    out[k] = v
    # the P @ R kernel's 64-bit tile offsets (taken on a GPU where BM * D could pass int32)
    max_bm, K._MAX_BM = K._MAX_BM, 2 ** 31
    try:
        k, v = _run_case("adv_B8_N40_D40_S3_off64", x, s, r, splits=3, chunk=16)
    finally:
        K._MAX_BM = max_bm
    out[k] = v
    x, s, r = _adversarial(8, 96, 33, seed=3, offset=0.0)
    k, v = _run_case("adv_N96_offset0_S4", x, s, r, splits=4, chunk=16)
    out[k] = v
    # the same adversarial data without re-evaluation: shows the exact path is needed
    x, s, r = _adversarial(7, 47, 37, seed=1)
    k, v = _run_case("adv_no_reeval_tf32x3", x, s, r, precision="tf32x3", splits=2, chunk=16)
    out[k] = v
    for prec in ("tf32", "bf16"):
        k, v = _run_case(f"mode_{prec}", x, s, r, precision=prec, splits=2, chunk=16)
        out[k] = v

    # tiny ragged sizes: B = 1, N = 1 (t = ref[0]), D = 1
    g = torch.Generator().manual_seed(4)
    for B, N, D in [(1, 1, 5), (3, 2, 1), (1, 17, 16)]:
        r = torch.randn(N, D, generator=g)
        x = torch.randn(B, D, generator=g)
        s = torch.rand(B, generator=g) * 2 + 0.01
        k, v = _run_case(f"tiny_{B}_{N}_{D}", x, s, r, splits=2)
        out[k] = v

    # the public API: image-shaped x, sigma (B, 1, 1, 1), return_lse, fp64 and bf16 inputs
    g = torch.Generator().manual_seed(5)
    ref = torch.rand(29, 2, 3, 5, generator=g) * 2 - 1
    x = ref[:5] + 0.05 * torch.randn(5, 2, 3, 5, generator=g)
    sig = torch.tensor([0.002, 0.05, 0.5, 5.0, 50.0]).reshape(5, 1, 1, 1)
    t, lse = fastdiff.stf_target(x, sig, ref, backend="triton", return_lse=True)
    t64, lse64 = _oracle(x.reshape(5, -1), sig.reshape(5), ref.reshape(29, -1))
    out["api_lse"] = {
        "finite": bool(torch.isfinite(t).all() and torch.isfinite(lse).all()),
        "err": _err(t.reshape(5, -1), t64, sig.reshape(5), 30),
        "lse_rel": ((lse.double() - lse64).abs() / lse64.abs().clamp_min(1.0)).max().item(),
        "shape_ok": t.shape == x.shape and t.dtype == x.dtype and lse.shape == (5,) and lse.dtype == torch.float64,
    }
    t = fastdiff.stf_target(x.double(), sig, ref.double(), backend="triton")
    out["api_fp64"] = {"finite": bool(torch.isfinite(t).all()), "dtype_ok": t.dtype == torch.float64,
                       "err": _err(t.reshape(5, -1), t64, sig.reshape(5), 30)}
    xb, rb = x.bfloat16(), ref.bfloat16()
    t = fastdiff.stf_target(xb, sig, rb, backend="triton")
    t64b, _ = _oracle(xb.reshape(5, -1), sig.reshape(5), rb.reshape(29, -1))
    # bf16 output: compare with the oracle rounded to bf16 (half an ulp each side)
    gap = (t.reshape(5, -1).double() - t64b.bfloat16().double()).abs()
    ulp = t64b.abs().clamp_min(1e-30) * 2.0 ** -7
    out["api_bf16"] = {"finite": bool(torch.isfinite(t).all()), "dtype_ok": t.dtype == torch.bfloat16,
                       "within_ulp": bool((gap <= ulp + 1e-4 * sig.reshape(5, 1).double()).all())}

    # combine: the empty-split guard, directly
    S, B, D = 3, 2, 5
    m = torch.tensor([[-math.inf, -math.inf], [0.5, -math.inf], [2.0, -math.inf]], dtype=torch.float64)
    l = torch.tensor([[0.0, 0.0], [1.5, 0.0], [3.0, 0.0]], dtype=torch.float64)
    acc32 = torch.randn(S, B, D, generator=g)
    acc32[0] = 0.0
    acc32[:, 1] = 0.0
    acc64 = torch.randn(S, B, D, generator=g, dtype=torch.float64)
    acc64[0] = 0.0
    acc64[:, 1] = 0.0
    xn = torch.tensor([1.0, 2.0], dtype=torch.float64)
    inv2s2 = torch.tensor([0.5, 0.25], dtype=torch.float64)
    t = torch.full((B, D), float("nan"))
    lse = torch.full((B,), float("nan"), dtype=torch.float64)
    K.combine(m, l, acc32, acc64, xn, inv2s2, t, lse)
    w = torch.exp(m[1:, 0] - 2.0)
    want = (w[:, None] * (acc32[1:, 0].double() + acc64[1:, 0])).sum(0) / (w * l[1:, 0]).sum()
    want_lse = 2.0 + math.log((w * l[1:, 0]).sum().item()) - 0.5
    out["combine"] = {
        "row0_err": (t[0].double() - want).abs().max().item(),
        "row0_lse_err": abs(lse[0].item() - want_lse),
        "row1_t_zero": bool((t[1] == 0).all()),
        "row1_lse_neginf": lse[1].item() == -math.inf,
        "no_nan": not bool(torch.isnan(t).any() or torch.isnan(lse).any()),
    }
    # NaN data (value checks off, or under torch.compile, which skips them): NaN out, in the
    # row of a NaN x and in every row for a NaN reference row, never a finite wrong number
    for where in ("x", "ref"):
        g = torch.Generator().manual_seed(7)
        x, r, s = torch.randn(4, 24, generator=g), torch.randn(40, 24, generator=g), torch.full((4,), 0.5)
        (x[1] if where == "x" else r[7])[3] = float("nan")
        for prec in ("highest", "tf32x3"):
            for splits, chunk in [(1, None), (2, 16)]:
                t = torch.zeros_like(x)
                lse = torch.zeros(4, dtype=torch.float64)
                K.stf_target_splits(x, s, r, prec, t, lse, splits=splits, chunk=chunk)
                out[f"nan_{where}_{prec}_S{splits}"] = {"t_nan_rows": t.isnan().all(1).tolist(),
                                                        "lse_nan_rows": lse.isnan().tolist()}
    # labels / ref_labels and ref_logw (issue 13): the adversarial data with each near-duplicate
    # pair split across two classes, log-weights over +-3 with -inf entries, over splits and
    # chunks; a class living only in the last chunk of the last split; a row whose label has no
    # reference row (kernel contract: t = 0, lse = -inf, never NaN)
    x, s, r = _adversarial(7, 47, 37, seed=11)
    g = torch.Generator().manual_seed(12)
    ref_labels = torch.randint(0, 3, (47,), generator=g)
    ref_labels[5] = (ref_labels[3] + 1) % 3            # the near-duplicate pair in two classes
    labels = ref_labels[torch.arange(7) % 47].clone()
    labels[6] = ref_labels[3]
    ref_logw = 3.0 * torch.randn(47, generator=g, dtype=torch.float64)
    ref_logw[7::5] = -math.inf
    ref_labels[40:] = 9                                # class 9: the last rows only
    labels[1] = 9
    kinds = {"labels": dict(labels=labels, ref_labels=ref_labels), "logw": dict(ref_logw=ref_logw),
             "both": dict(labels=labels, ref_labels=ref_labels, ref_logw=ref_logw)}
    for kind, kw in kinds.items():
        for splits, chunk in [(1, None), (2, 16), (4, 16)]:
            k, v = _run_case(f"terms_{kind}_S{splits}_C{chunk}", x, s, r, splits=splits, chunk=chunk, **kw)
            out[k] = v
    for splits in (1, 3):
        lab = labels.clone()
        lab[2] = 42
        t = torch.full_like(x, float("nan"))
        lse = torch.full((7,), float("nan"), dtype=torch.float64)
        K.stf_target_splits(x, s, r, "highest", t, lse, splits=splits, chunk=16, labels=lab,
                            ref_labels=ref_labels, ref_logw=ref_logw)
        keep = [0, 1, 3, 4, 5, 6]
        t64, _ = _oracle(x[keep], s[keep], r, labels=lab[keep], ref_labels=ref_labels, ref_logw=ref_logw)
        out[f"terms_empty_row_S{splits}"] = {
            "row_zero": bool((t[2] == 0).all()), "lse_neginf": lse[2].item() == -math.inf,
            "others_finite": bool(torch.isfinite(t[keep]).all() and torch.isfinite(lse[keep]).all()),
            "err": _err(t[keep], t64, s[keep], 37)}
    # the public API with terms (int32 labels, float32 log-weights)
    t, lse = fastdiff.stf_target(x, s, r, labels=labels.int(), ref_labels=ref_labels.int(),
                                 ref_logw=ref_logw.float(), backend="triton", return_lse=True)
    t64, lse64 = _oracle(x, s, r, labels=labels, ref_labels=ref_labels, ref_logw=ref_logw.float())
    out["terms_api"] = {"finite": bool(torch.isfinite(t).all() and torch.isfinite(lse).all()),
                        "err": _err(t, t64, s, 37),
                        "lse_rel": ((lse - lse64).abs() / lse64.abs().clamp_min(1.0)).max().item()}
    # sigma down to float32's smallest normal: the GEMM part is scaled by 1/(2 sigma^2) in
    # float64 (in fp32 it overflowed below sigma ~ 4e-20)
    x, s, r = _adversarial(4, 20, 16, seed=13)
    for sig in (1e-30, 1.2e-38):
        k, v = _run_case(f"tiny_sigma_{sig:g}", r[:4] + 0.0, torch.full((4,), sig), r, splits=2, chunk=16)
        out[k] = v
    out["seconds"] = time.time() - t_start
    return out


# ----------------------------------------------------------------------------
# the tests (parent process)
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


HIGHEST_CASES = ["adv_S1_CNone", "adv_S2_C16", "adv_S4_C16", "adv_B8_N40_D40_S3", "adv_B8_N40_D40_S3_off64",
                 "adv_N96_offset0_S4",
                 "tiny_1_1_5", "tiny_3_2_1", "tiny_1_17_16", "api_lse", "api_fp64",
                 *[f"terms_{kind}_S{s}_C{c}" for kind in ("labels", "logw", "both")
                   for s, c in [(1, None), (2, 16), (4, 16)]],
                 "terms_api"]


@pytest.mark.parametrize("case", ["tiny_sigma_1e-30", "tiny_sigma_1.2e-38"])
def test_tiny_sigma_is_computed(report, case):
    # t meets the contract; lse here is m + log l - ||x||^2 / (2 sigma^2) with terms of ~1e60 and
    # more, so it is exact only to their float64 rounding (a log 2 is lost): not checked.
    r = report[case]
    assert r["finite"] and r["err"] <= CONTRACT, r


@pytest.mark.parametrize("splits", [1, 3])
def test_terms_row_without_reference(report, splits):
    r = report[f"terms_empty_row_S{splits}"]
    assert r["row_zero"] and r["lse_neginf"] and r["others_finite"], r
    assert r["err"] <= CONTRACT, r


@pytest.mark.parametrize("where", ["x", "ref"])
@pytest.mark.parametrize("precision", ["highest", "tf32x3"])
@pytest.mark.parametrize("splits", [1, 2])
def test_nan_data_gives_nan(report, where, precision, splits):
    r = report[f"nan_{where}_{precision}_S{splits}"]
    want = [False, True, False, False] if where == "x" else [True] * 4
    assert r["t_nan_rows"] == want and r["lse_nan_rows"] == want, r


@pytest.mark.parametrize("case", HIGHEST_CASES)
def test_highest_meets_contract(report, case):
    r = report[case]
    assert r["finite"], f"{case}: NaN/Inf left in the (NaN-poisoned) outputs"
    assert r["err"] <= CONTRACT, f"{case}: err {r['err']:.3g} > {CONTRACT}"
    if "lse_rel" in r:
        assert r["lse_rel"] <= 1e-5, f"{case}: lse relative error {r['lse_rel']:.3g}"


def test_exact_path_is_exercised(report):
    # Without re-evaluation the same data errs by orders of magnitude more than the
    # contract: the near-duplicate rows at sigma = 0.002 need the float64 path.
    assert report["adv_no_reeval_tf32x3"]["finite"]
    assert report["adv_no_reeval_tf32x3"]["err"] > 100 * CONTRACT
    assert report["adv_S2_C16"]["err"] <= CONTRACT


@pytest.mark.parametrize("case", ["mode_tf32", "mode_bf16"])
def test_fast_modes_run(report, case):
    # In the interpreter every tl.dot is ieee fp32: this checks the plumbing of the
    # modes, not their GPU error (see kernels/stf.py PRECISION_BOUNDS).
    assert report[case]["finite"]


def test_dtypes_and_shapes(report):
    assert report["api_lse"]["shape_ok"]
    assert report["api_fp64"]["dtype_ok"]
    assert report["api_bf16"]["dtype_ok"] and report["api_bf16"]["finite"]
    assert report["api_bf16"]["within_ulp"]


def test_combine_empty_split_guard(report):
    c = report["combine"]
    assert c["no_nan"]
    assert c["row0_err"] <= 1e-6 and c["row0_lse_err"] <= 1e-5
    assert c["row1_t_zero"] and c["row1_lse_neginf"]


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (sets TRITON_INTERPRET=1)"
    from _triton_compat import patch_triton_interpreter
    patch_triton_interpreter()
    print("REPORT " + json.dumps(_worker()))
