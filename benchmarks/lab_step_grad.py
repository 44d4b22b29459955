"""Kernel lab: ``step``'s backward pass 2 in ONE token-major pass through TMA (not wired into the ops).

``triton_fused.step_backward`` makes three stream passes after coeffs_backward (8n+5 = 37 elements of C a token
at n = 4, against the 21 of cost.FUSED's two-pass floor): K2 writes the recomputed X, proj_pre_backward reads it
and writes G (X's whole gradient), post_res_backward reads G. This lab times the pass that would replace the
last two, reading X_prev, y, dx_in and dX and writing dX_prev and dy (3n+3 = 15 elements):

    program = BT tokens, walking all of C in chunks of BC; per chunk and stream i:
      X_i  = h_post[i] y + sum_j h_res[i, j] x_j        recomputed, rounded to the stream dtype as stored
      G_i  = dp @ phi_i^T (tf32) + dX_i + h_pre[i] dx_in + 2 dsq X_i          (fp32, never stored)
      dX_prev_j += h_res[i, j] G_i,  dy += h_post[i] G_i,  dH_res[i, j] += <G_i, x_j>,  dH_post[i] += <G_i, y>
    dphi = X^T dp, a reduction over tokens, is left to another pass (not here).

Session 13 timed this design with pointer loads: 5.7 ms at 32768 x 4096 (255 registers, spills, 59 layout
conversions a chunk: the dot's MMA layout met the loaded tiles' blocked layout). Here every stream tile arrives
by TMA in shared memory, so the compiler reads it straight into the dot's layout (as in proj's one-pass
backward), and the per-token sums stay in that layout.

Result (session 15, H200, benchmarks/results/lab-step-grad-2026-12-03-h200-s15-call3.md): correct, and the sm_90a
build has no layout conversion left in its loop with TMA stores (5 with pointer stores, one a store), but it
still needs 255 registers and spills 88-720 bytes at every tile (n = 4: the n dX_prev accumulators, the n input
tiles, and 20 per-token coefficient vectors and 20 per-token sums, each two registers a thread in the MMA
layout), so two 4-warp programs an SM. 4945 us at 32768 x 4096 (19 % of its 3n+3 floor) against 1846 us for
the two passes it would replace, dphi included; 2713 against 862 us at 8192 x 7168. Not pursued in Triton: the
per-token state of the n x n mixing does not fit beside the tiles. A design that keeps G in shared memory and
splits the mixing across warps needs explicit layouts and buffers (Gluon).

    python benchmarks/lab_step_grad.py --ptxas        # no GPU: sm_90a registers, spills, conversions a chunk
    TRITON_INTERPRET=1 python benchmarks/lab_step_grad.py --smoke    # CPU: values against the reference
    PYTHONPATH=. OUT=DIR python benchmarks/lab_step_grad.py           # GPU: checks, then times against the passes
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import sm90_build  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402
from mhc_compile.kernels import triton_ops as tk  # noqa: E402
from mhc_compile.kernels import triton_common as tcom  # noqa: E402
from mhc_compile.kernels.tma import descriptor  # noqa: E402


@triton.jit(do_not_specialize=["T"])
def _step_grad_kernel(xp_d, y_d, g_d, dx_d, phi_d, dp_ptr, dsq_ptr, hpre_ptr, hres_ptr, hpost_ptr,
                      dxp_ptr, dy_ptr, dhres_ptr, dhpost_ptr, T, C, M, N: tl.constexpr, BT: tl.constexpr,
                      BC: tl.constexpr, MP: tl.constexpr, RNE: tl.constexpr, TMA_STORE: tl.constexpr,
                      XS16: tl.constexpr):
    """TMA_STORE: dxp_ptr / dy_ptr are descriptors like xp_d / y_d (stores from the dot's layout through shared
    memory, no register layout change); XS16: the x_j tiles are kept in bf16 and widened where used."""
    t0 = tl.program_id(0) * BT
    rows = t0 + tl.arange(0, BT)
    rmask = rows < T
    r64 = rows.to(tl.int64)
    ms = tl.arange(0, MP)
    dp = tl.load(dp_ptr + r64[:, None] * M + ms[None, :], mask=rmask[:, None] & (ms < M)[None, :], other=0.0)
    dsq2 = 2.0 * tl.load(dsq_ptr + r64, mask=rmask, other=0.0)
    hpre = ()
    hpost = ()
    hres = ()
    dhp = ()
    dhr = ()
    for i in tl.static_range(N):
        hpre = hpre + (tl.load(hpre_ptr + r64 * N + i, mask=rmask, other=0.0),)
        hpost = hpost + (tl.load(hpost_ptr + r64 * N + i, mask=rmask, other=0.0),)
        dhp = dhp + (tl.zeros([BT], dtype=tl.float32),)
        for j in tl.static_range(N):
            hres = hres + (tl.load(hres_ptr + r64 * (N * N) + i * N + j, mask=rmask, other=0.0),)
            dhr = dhr + (tl.zeros([BT], dtype=tl.float32),)
    for c0 in range(0, C, BC):
        cols = c0 + tl.arange(0, BC)
        m2 = rmask[:, None] & (cols < C)[None, :]
        y = y_d.load([t0, c0]).to(tl.float32)
        g = g_d.load([t0, c0]).to(tl.float32)
        xs = ()
        for j in tl.static_range(N):
            if XS16:
                xs = xs + (xp_d.load([t0, j * C + c0]),)
            else:
                xs = xs + (xp_d.load([t0, j * C + c0]).to(tl.float32),)
        dy = tl.zeros([BT, BC], dtype=tl.float32)
        dxp = ()
        for j in tl.static_range(N):
            dxp = dxp + (tl.zeros([BT, BC], dtype=tl.float32),)
        new_dhp = ()
        new_dhr = ()
        for i in tl.static_range(N):
            xi = hpost[i][:, None] * y
            for j in tl.static_range(N):
                xi += hres[i * N + j][:, None] * xs[j].to(tl.float32)
            xi = tcom.round_to(xi, tl.bfloat16, RNE).to(tl.float32)
            ph = phi_d.load([i * C + c0, 0])
            gi = tl.dot(dp, tl.trans(ph), input_precision="tf32", out_dtype=tl.float32)
            gi += dx_d.load([t0, i * C + c0]).to(tl.float32) + hpre[i][:, None] * g + dsq2[:, None] * xi
            dy += hpost[i][:, None] * gi
            new_dhp = new_dhp + (dhp[i] + tl.sum(gi * y, axis=1),)
            nd = ()
            for j in tl.static_range(N):
                nd = nd + (dxp[j] + hres[i * N + j][:, None] * gi,)
                new_dhr = new_dhr + (dhr[i * N + j] + tl.sum(gi * xs[j].to(tl.float32), axis=1),)
            dxp = nd
        dhp = new_dhp
        dhr = new_dhr
        for j in tl.static_range(N):
            if TMA_STORE:
                dxp_ptr.store([t0, j * C + c0], tcom.round_to(dxp[j], tl.bfloat16, RNE))
            else:
                tl.store(dxp_ptr + (r64 * N + j)[:, None] * C + cols[None, :],
                         tcom.round_to(dxp[j], tl.bfloat16, RNE), mask=m2)
        if TMA_STORE:
            dy_ptr.store([t0, c0], tcom.round_to(dy, tl.bfloat16, RNE))
        else:
            tl.store(dy_ptr + r64[:, None] * C + cols[None, :], tcom.round_to(dy, tl.bfloat16, RNE), mask=m2)
    for i in tl.static_range(N):
        tl.store(dhpost_ptr + r64 * N + i, dhp[i], mask=rmask)
        for j in tl.static_range(N):
            tl.store(dhres_ptr + r64 * (N * N) + i * N + j, dhr[i * N + j], mask=rmask)


def step_grad(x_prev, h_res, h_post, y, phi, dp, dsq, h_pre, dx_in, dx, bt=64, bc=16, num_warps=4, num_stages=3,
              tma_store=False, xs16=False):
    """(dx_prev, dh_res, dh_post, dy) of step's backward given coeffs_backward's dp, dsq: bf16 streams, C a
    multiple of bc."""
    t, n, c = x_prev.shape
    m = phi.shape[1]
    mp = max(16, tcom.pow2(m))
    dxp, dy = torch.empty_like(x_prev), torch.empty_like(y)
    dhr = torch.empty((t, n, n), dtype=torch.float32, device=x_prev.device)
    dhp = torch.empty((t, n), dtype=torch.float32, device=x_prev.device)
    blk = (bt, bc)
    args = (descriptor(x_prev, t, n * c, blk), descriptor(y, t, c, blk), descriptor(dx_in, t, c, blk),
            descriptor(dx, t, n * c, blk), _phi_descriptor(phi, bc, mp), dp, dsq, h_pre, h_res, h_post,
            descriptor(dxp, t, n * c, blk) if tma_store else dxp, descriptor(dy, t, c, blk) if tma_store else dy,
            dhr, dhp, t, c, m)
    _step_grad_kernel[(tcom.cdiv(t, bt),)](*args, N=n, BT=bt, BC=bc, MP=mp, RNE=tcom.INTERPRETED,
                                          TMA_STORE=tma_store, XS16=xs16, num_warps=num_warps,
                                          num_stages=num_stages)
    return dxp, dhr, dhp, dy


def _phi_descriptor(phi, bc, mp):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(phi, [bc, mp])  # columns m .. mp read as zeros


def reference(x_prev, h_res, h_post, y, phi, dp, dsq, h_pre, dx_in, dx):
    """The same outputs in float64 from reference.py's pieces."""
    f = torch.float64
    x = ref.post_res(x_prev, h_res, h_post, y)  # rounded to the stream dtype, as the forward stored it
    t, n, c = x.shape
    g = (dp.to(f) @ phi.to(f).t()).reshape(t, n, c) + 2 * dsq.to(f)[:, None, None] * x.to(f)
    g = g + h_pre.to(f)[:, :, None] * dx_in.to(f)[:, None, :] + dx.to(f)
    dxp = torch.einsum("tij,tic->tjc", h_res.to(f), g)
    dy = torch.einsum("ti,tic->tc", h_post.to(f), g)
    return dxp, torch.einsum("tic,tjc->tij", g, x_prev.to(f)), torch.einsum("tic,tc->ti", g, y.to(f)), dy


def make(t, n, c, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def rn(*s, dt=torch.float32, scale=1.0):
        return (scale * torch.randn(*s, generator=gen, device=device)).to(dt)

    m = ref.num_coeffs(n)
    h_res = torch.softmax(rn(t, n, n), -1)
    return dict(x_prev=rn(t, n, c, dt=torch.bfloat16), h_res=h_res, h_post=2 * torch.sigmoid(rn(t, n)),
                y=rn(t, c, dt=torch.bfloat16), phi=rn(n * c, m, scale=(n * c) ** -0.5), dp=rn(t, m),
                dsq=rn(t, scale=1e-3), h_pre=torch.sigmoid(rn(t, n)), dx_in=rn(t, c, dt=torch.bfloat16),
                dx=rn(t, n, c, dt=torch.bfloat16))


def rel_errs(got, want):
    return [((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(got, want)]


def ptxas(tiles, n=4, c=4096, t=8192):
    """sm_90a builds without a GPU: registers, spilled bytes, shared memory, layout conversions in the loop."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m = ref.num_coeffs(n)
    bf, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    xp, y = torch.empty(t, n * c, **bf), torch.empty(t, c, **bf)
    phi, dp, dsq = torch.empty(n * c, m, **f32), torch.empty(t, m, **f32), torch.empty(t, **f32)
    hv, hr = torch.empty(t, n, **f32), torch.empty(t, n, n, **f32)
    with sm90_build.cpu_target(90):
        for bt, bc, w, s, *opt in tiles:
            opts = {"TMA_STORE": False, "XS16": False} | {k.upper(): v for k, v in (opt[0] if opt else {}).items()}
            d2, d1 = TensorDescriptor.from_tensor(xp, [bt, bc]), TensorDescriptor.from_tensor(y, [bt, bc])
            dphi = TensorDescriptor.from_tensor(phi, [bc, 32])
            outs = (d2, d1) if opts["TMA_STORE"] else (xp, y)
            try:
                ck = _step_grad_kernel.warmup(d2, d1, d1, d2, dphi, dp, dsq, hv, hr, hv, *outs, hr, hv, t, c, m,
                                              N=n, BT=bt, BC=bc, MP=32, RNE=False, **opts, num_warps=w,
                                              num_stages=s, grid=(1,))
            except Exception as exc:
                print(f"{bt}x{bc} w{w} s{s} {opts}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            regs, stack = sm90_build.resources(ck, 90)
            gir = ck.asm["ttgir"]
            loop = gir[gir.index("scf.for"):gir.index("scf.yield")]
            print(f"{bt}x{bc} w{w} s{s} {opt[0] if opt else ''}: regs {regs} stack {stack} "
                  f"smem {ck.metadata.shared // 1024} KB, loop: convert_layout {loop.count('convert_layout')}, "
                  f"local_load {loop.count('local_load')}, wgmma {loop.count('warp_group_dot ')}, "
                  f"tma loads {loop.count('async_tma_copy_global_to_local')}", flush=True)
            if os.environ.get("DUMP"):
                with open(f"{os.environ['DUMP']}_{bt}x{bc}w{w}s{s}{len(opt)}.ttgir", "w") as f:
                    f.write(gir)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ptxas", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    ts, x16 = dict(tma_store=True), dict(tma_store=True, xs16=True)
    tiles = [(64, 16, 4, 3), (64, 16, 4, 3, ts), (64, 16, 4, 3, x16), (64, 32, 4, 3, ts), (128, 16, 8, 3, ts),
             (64, 16, 4, 2, ts)]
    if args.ptxas:
        ptxas(tiles)
        return 0
    device = "cpu" if args.smoke else "cuda"
    shapes = [(37, 4, 64)] if args.smoke else [(1000, 4, 512), (8192, 4, 4096)]
    ok = True
    for t, n, c in shapes:
        d = make(t, n, c, device, seed=1)
        want = reference(**d)
        for bt, bc, w, s, *opt in tiles[:3] if args.smoke else tiles:
            kw = opt[0] if opt else {}
            errs = rel_errs(step_grad(**d, bt=bt if not args.smoke else 16, bc=bc, num_warps=w, num_stages=s, **kw),
                            want)
            good = max(errs) < 1e-2
            ok &= good
            print(f"check {t}x{n}x{c} {bt}x{bc} w{w} s{s} {kw}: rel err dX_prev / dH_res / dH_post / dy "
                  + " / ".join(f"{e:.1e}" for e in errs) + ("" if good else "  FAIL"), flush=True)
    if args.smoke:
        return 0 if ok else 1
    from benchmarks import bench_kernels as bkm
    bw = bkm.copy_bandwidth("cuda")
    lines = [f"- device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"copy bandwidth {bw / 1e9:.0f} GB/s", "", "| T x C | design | us | eff (3n+3 floor) |",
             "|---|---|---|---|"]
    for t, c in [(32768, 4096), (8192, 7168)]:
        n = 4
        d = make(t, n, c, "cuda")
        nbytes = (3 * n + 3) * t * c * 2
        x = ref.post_res(d["x_prev"], d["h_res"], d["h_post"], d["y"])

        def passes():  # what the lab kernel replaces: proj_pre_backward (acc = dX) then post_res_backward
            gg, _ = tk.proj_pre_backward(x, d["phi"], d["dp"], d["dsq"], d["h_pre"], d["dx_in"], d["dx"])
            return tk.post_res_backward(d["x_prev"], d["h_res"], d["h_post"], d["y"], gg)

        us = bkm.bench_us(passes, rep=30)
        lines.append(f"| {t} x {c} | proj_pre_backward + post_res_backward (dphi included) | {us:.1f} | "
                     f"{nbytes / (us * 1e-6) / bw:.0%} |")
        print(lines[-1], flush=True)
        for bt, bc, w, s, *opt in tiles:
            kw = opt[0] if opt else {}
            try:
                us = bkm.bench_us(lambda: step_grad(**d, bt=bt, bc=bc, num_warps=w, num_stages=s, **kw), rep=30)
            except Exception as exc:
                lines.append(f"| {t} x {c} | lab {bt}x{bc} w{w} s{s} {kw} | {type(exc).__name__} | |")
                continue
            lines.append(f"| {t} x {c} | lab {bt}x{bc} w{w} s{s} {kw} (no dphi) | {us:.1f} | "
                         f"{nbytes / (us * 1e-6) / bw:.0%} |")
            print(lines[-1], flush=True)
        del d, x
        torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "lab_step_grad.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
