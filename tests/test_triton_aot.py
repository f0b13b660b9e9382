"""Every Triton kernel compiled ahead of time for sm_90 (Hopper) to a cubin: no GPU needed.

`python tests/test_triton_aot.py` prints each entry's registers, spills and shared memory
(ptxas -v, as Triton's own ptxas sees the PTX).

The interpreter (tests/test_stf_triton.py, the triton cases of test_weighted_mse.py and
test_sampling.py) checks what the kernels compute; it lets through what only the compiler
rejects (types across scf.if, float64 math, tf32x3 dots, rounding modes of bf16/fp16
stores, 64-bit offsets). This compiles each kernel with the signatures our launchers use.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

_F16, _BF16, _F32, _F64, _I32, _I64 = "*fp16", "*bf16", "*fp32", "*fp64", "i32", "i64"


class _Launch(str):
    """A constexpr that the launcher takes from a module constant (read when compiling)."""

# name -> (module, kernel, signature of the non-constexpr arguments, constexprs, options)
_AOT = {
    # --- stf_target (kernels/stf.py)
    "stf_logits_tf32x3": ("stf", "_logits_kernel",
                          dict(X=_F32, R=_F32, RN32=_F32, G=_F32, B=_I32, N=_I32, D=_I32, Cs=_I32,
                               span=_I32, j0=_I32),
                          dict(PREC="tf32x3", BF16=False, BM=128, BN=128, BK=32), dict(num_warps=8, num_stages=3)),
    "stf_logits_bf16": ("stf", "_logits_kernel",
                        dict(X=_BF16, R=_BF16, RN32=_F32, G=_F32, B=_I32, N=_I32, D=_I32, Cs=_I32,
                             span=_I32, j0=_I32),
                        dict(PREC="ieee", BF16=True, BM=64, BN=64, BK=32), dict(num_warps=4, num_stages=4)),
    "stf_row_exact": ("stf", "_row_kernel",
                      dict(G=_F32, E64=_F64, X=_F32, R=_F64, RN=_F64, RNORM=_F64, XN=_F64, XNORM=_F64, INV2S2=_F64,
                           LB=_F64, LBE=_F64, M=_F64, ML=_F64, L=_F64, L64=_F64, SCALE=_F32, ACC64=_F64,
                           LAB="*i64", RLAB="*i64", LW=_F64, B=_I32, N=_I32, D=_I32, Cs=_I32, span=_I32, j0=_I32,
                           gamma="fp32"),
                      dict(EXACT=True, HAS_LAB=True, HAS_LW=True, BLK=_Launch("_ROW_BLK"), BD=_Launch("_ROW_BD"),
                           BV=_Launch("_ROW_BV")),
                      dict(num_warps=4)),
    "stf_pv_tf32x3": ("stf", "_pv_kernel",
                      dict(P=_F32, R=_F16, SCALE=_F32, ACC_IN=_F32, ACC_OUT=_F32, B=_I32, N=_I32, D=_I32, Cs=_I32,
                           span=_I32, j0=_I32),
                      dict(PREC="tf32x3", BF16=False, OFF64=False, BM=128, BD=128, BK=32),
                      dict(num_warps=8, num_stages=3)),
    "stf_pv_bf16_off64": ("stf", "_pv_kernel",
                          dict(P=_F32, R=_BF16, SCALE=_F32, ACC_IN=_F32, ACC_OUT=_F32, B=_I32, N=_I32, D=_I32,
                               Cs=_I32, span=_I32, j0=_I32),
                          dict(PREC="ieee", BF16=True, OFF64=True, BM=64, BD=64, BK=32),
                          dict(num_warps=4, num_stages=4)),
    "stf_combine": ("stf", "_combine_kernel",
                    dict(M=_F64, L=_F64, ACC32=_F32, ACC64=_F64, XN=_F64, INV2S2=_F64, T=_BF16, LSE=_F64, B=_I32,
                         D=_I32, S=_I32),
                    dict(HAS64=True, BS=4, BD=256), dict()),
    # --- weighted_mse (kernels/weighted_mse.py): bf16 pred with an fp32 target, fp32, fp64, 64-bit offsets
    "wmse_fwd_bf16": ("weighted_mse", "_weighted_mse_fwd",
                      dict(pred_ptr=_BF16, target_ptr=_F32, weight_ptr=_F32, grad_ptr=_BF16, partial_ptr=_F64,
                           n=_I32, d=_I32),
                      dict(NEED_GRAD=True, INT64=False, BLOCK=4096), dict(num_warps=8)),
    "wmse_fwd_fp16_int64": ("weighted_mse", "_weighted_mse_fwd",
                            dict(pred_ptr=_F16, target_ptr=_F16, weight_ptr=_F32, grad_ptr=_F16, partial_ptr=_F64,
                                 n=_I64, d=_I64),
                            dict(NEED_GRAD=True, INT64=True, BLOCK=4096), dict(num_warps=8)),
    "wmse_fwd_fp32_nograd": ("weighted_mse", "_weighted_mse_fwd",
                             dict(pred_ptr=_F32, target_ptr=_F32, weight_ptr=_F32, grad_ptr=_F32, partial_ptr=_F64,
                                  n=_I32, d=_I32),
                             dict(NEED_GRAD=False, INT64=False, BLOCK=4096), dict(num_warps=8)),
    "wmse_fwd_fp64": ("weighted_mse", "_weighted_mse_fwd",
                      dict(pred_ptr=_F64, target_ptr=_F64, weight_ptr=_F64, grad_ptr=_F64, partial_ptr=_F64,
                           n=_I32, d=_I32),
                      dict(NEED_GRAD=True, INT64=False, BLOCK=4096), dict(num_warps=8)),
    "wmse_sum_fp32": ("weighted_mse", "_weighted_mse_sum", dict(partial_ptr=_F64, loss_ptr=_F32, m=_I32, n=_I32),
                      dict(BLOCK=1024), dict(num_warps=4)),
    "wmse_sum_fp64_int64": ("weighted_mse", "_weighted_mse_sum",
                            dict(partial_ptr=_F64, loss_ptr=_F64, m=_I32, n=_I64), dict(BLOCK=1024),
                            dict(num_warps=4)),
    # --- sampler steps (kernels/sampler_steps.py): fp32 coefficients, bf16 and fp32 states
    "affine_bf16_v": ("sampler_steps", "_affine_kernel",
                      dict(x_ptr=_BF16, u_ptr=_BF16, v_ptr=_BF16, out_ptr=_BF16, n=_I32, a="fp32", b="fp32",
                           c="fp32"),
                      dict(HAS_V=True, BLOCK=1024), dict()),
    "affine_fp32": ("sampler_steps", "_affine_kernel",
                    dict(x_ptr=_F32, u_ptr=_F32, v_ptr=_F32, out_ptr=_F32, n=_I64, a="fp32", b="fp32", c="fp32"),
                    dict(HAS_V=False, BLOCK=1024), dict()),
    "heun_fp16": ("sampler_steps", "_heun_kernel",
                  dict(x_ptr=_F16, d_ptr=_F16, x1_ptr=_F16, d1_ptr=_F16, out_ptr=_F16, n=_I32, p="fp32", q="fp32"),
                  dict(BLOCK=1024), dict()),
}


def _compile(name, **sig_overrides):
    """Compiles _AOT[name] for sm_90; sig_overrides replace argument types of its signature."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"no ahead-of-time compile API in this triton ({exc})")
    import importlib
    module, kernel, sig, const, opts = _AOT[name]
    sig = dict(sig, **sig_overrides)
    mod = importlib.import_module(f"fastdiff.kernels.{module}")
    fn = getattr(mod, kernel)
    const = {k: getattr(mod, v) if isinstance(v, _Launch) else v for k, v in const.items()}
    while not isinstance(fn, triton.JITFunction):  # autotuned kernels wrap the JITFunction
        fn = fn.fn
    missing = set(fn.arg_names) - set(sig) - set(const)
    assert not missing, f"{kernel}: no signature for {sorted(missing)}"
    signature = {a: ("constexpr" if a in const else sig[a]) for a in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                          target=GPUTarget("cuda", 90, 32), options=opts)


def _ptxas_usage(compiled) -> dict:
    """Registers, spill stores/loads (bytes per thread) and shared memory of a compiled kernel,
    from `ptxas -v` on its PTX with the ptxas Triton itself uses."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert regs and spill, log
    return dict(registers=int(regs.group(1)), spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
                shared=compiled.metadata.shared)


@pytest.mark.parametrize("name", sorted(_AOT))
def test_kernel_compiles_for_sm90(name):
    compiled = _compile(name)
    assert compiled.asm.get("cubin")
    if "tf32x3" in name:
        assert "wgmma" in compiled.asm["ptx"] or "mma.sync" in compiled.asm["ptx"], "tf32x3 dot not on tensor cores"


@pytest.mark.parametrize("name", ["stf_logits_tf32x3", "stf_pv_tf32x3"])
def test_tf32x3_k_tiles_summed_apart_then_added_round_to_nearest(name):
    """Tensor cores truncate in their fp32 accumulation (Fasi et al. 2021): chained over all of
    D, a one-sided error past gemm_gamma, the round-to-nearest bound the flags rely on.
    Triton's tf32x3 lowering sums each k-tile's three products from zero and adds the running
    accumulator with an ordinary fp32 add (what csrc/cuda/stf.cu does by hand); a Triton that
    folds the accumulator into the products would fail here."""
    import re
    ir = _compile(name).asm["ttgir"]
    loop = re.search(r"scf\.for [^\n]*iter_args\((%[\w#]+) = ", ir)
    assert loop, "no k loop with a loop-carried accumulator"
    acc = loop.group(1)
    body = ir[loop.end():]
    body = body[:body.index("scf.yield")]
    dots = [ln for ln in body.splitlines() if re.search(r"(warp_group_dot|tt\.dot) ", ln)]
    assert len(dots) == 3, dots                                   # hi*hi, hi*lo, lo*hi
    assert not [d for d in dots if re.search(rf"{re.escape(acc)}\b", d)], "a dot accumulates into the k loop's sum"
    adds = [ln for ln in body.splitlines() if "arith.addf" in ln and re.search(rf"{re.escape(acc)}\b", ln)]
    assert len(adds) == 1, adds


@pytest.mark.parametrize("data", [_F32, _BF16, _F64])
def test_exact_row_kernel_fits_in_registers(data):
    """The row kernel has one fixed config (no autotuning to route around a slow one). With
    the former 128 x 64 float64 tile it used 255 registers and spilled ~1.2 KB per thread;
    now at most a few registers' worth may spill (ptxas versions differ by a few bytes), and
    it leaves room for several programs per SM."""
    usage = _ptxas_usage(_compile("stf_row_exact", X=data, R=data))
    assert usage["spill_stores"] <= 64 and usage["spill_loads"] <= 64 and usage["registers"] <= 128, usage


if __name__ == "__main__":
    import triton
    print(f"sm_90 resource usage, triton {triton.__version__} (ptxas -v); the launch configs of _AOT")
    for entry in sorted(_AOT):
        print(f"{entry:24s} {_ptxas_usage(_compile(entry))}")
