"""Session 26 A/B: proj's Gluon backward with session 25's dphi epilogue (partials [2 MP, K] summed and transposed
on the host, per-token packing in four launches) against this session's (pack_tokens, hi + lo summed in the
kernel), interleaved in one process: the op as called and the kernel launch alone, beside the Triton kernel.

As run in session 26 call 5 (main at df7b6ee), from the repository root, with old/gluon_proj_bwd_s25.py =
`git show 1e09e59:mhc_compile/kernels/gluon_proj_bwd.py` and this file at old/epilogue_ab.py:
    PYTHONPATH=. python old/epilogue_ab.py"""
import importlib.util
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.getcwd())
from mhc_compile.kernels import gluon_proj_bwd as new  # noqa: E402

spec = importlib.util.spec_from_file_location("old_gp", os.path.join(os.path.dirname(__file__), "gluon_proj_bwd_s25.py"))
old = importlib.util.module_from_spec(spec)
sys.modules["old_gp"] = old
spec.loader.exec_module(old)
from benchmarks.bench_kernels import copy_bandwidth  # noqa: E402
from benchmarks.gluon_proj_bwd_check import _inputs, _triton  # noqa: E402


def launches(v, t, n, c, has_acc):
    m = v["dp"].shape[1]
    dp32 = v["dp"].float().contiguous()
    dx = torch.empty_like(v["x"])
    kblocks = n * c // new.BK
    splits, t_split = new.plan_splits(t, kblocks, dx.device)
    st = new.stages_for(True, has_acc)
    meta = dict(N=n, HAS_PRE=True, HAS_ACC=has_acc, X_BCAST=False, BT=new.BT, BK=new.BK, XB=new.XB, MP=new.MP,
                CW=new.CW, DSQ=new.DSQ, STAGES=st, MIXERS=2, MIX_REGS=192, DPHI_REGS=104, num_warps=4)
    hl, coefs = new.pack_tokens(dp32, v["dsq"], v["h_pre"])
    descs = new.descriptors(v["x"], False, v["dout"], v["acc"], new.pad_cols(dp32, new.MP), hl, coefs,
                            new.pad_cols(v["phi"], new.MP), dx, t, n, c)
    scratch = torch.empty((splits, 2 * new.MP, n * c), dtype=torch.float32, device="cuda")
    dphi = torch.empty((splits, n * c, m), dtype=torch.float32, device="cuda")
    dphi_t = torch.empty((splits, 2 * new.MP, n * c), dtype=torch.float32, device="cuda")

    def new_alone():
        new._proj_bwd_ws_kernel[(kblocks, splits)](*descs, scratch, dphi, t, c, m, t_split, **meta)

    def old_alone():
        old._proj_bwd_ws_kernel[(kblocks, splits)](*descs, dphi_t, t, c, t_split, **meta)
    return new_alone, old_alone


def main():
    bw = copy_bandwidth("cuda")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| T x C | acc | round | Triton | new op | old op | new alone | old alone |")
    print("|---|---|---|---|---|---|---|---|")
    for t, n, c in ((32768, 4, 4096), (8192, 4, 4096)):
        for has_acc in (True, False):
            v = _inputs(t, n, c, True, has_acc, False, seed=1)
            args = (v["x"], v["phi"], v["dp"], v["dsq"], v["h_pre"], v["dout"], v["acc"])
            a, b = new.proj_grads(*args), old.proj_grads(*args)
            same_dx = torch.equal(a[0], b[0])
            dphi_err = ((a[1] - b[1]).abs().max() / b[1].abs().max()).item()
            print(f"<!-- {t}x{c} acc={has_acc}: dx bit-equal {same_dx}, dphi rel diff {dphi_err:.1e} -->", flush=True)
            nb = ((2 + has_acc) * n * c + c) * t * 2
            new_alone, old_alone = launches(v, t, n, c, has_acc)
            fns = (lambda: _triton(v), lambda: new.proj_grads(*args), lambda: old.proj_grads(*args), new_alone,
                   old_alone)
            for rnd in range(3):
                us = [triton.testing.do_bench_cudagraph(f, rep=150) * 1e3 for f in fns]
                cells = " | ".join(f"{u:.1f} ({100 * nb / (u * 1e-6) / bw:.1f} %)" for u in us)
                print(f"| {t}x{c} | {has_acc} | {rnd} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
