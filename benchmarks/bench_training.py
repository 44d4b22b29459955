"""Whole training step: plain residual vs backend="mhc" vs naive mHC (eager, Inductor) vs LigerMHC.

GPT-style pre-norm stack (LayerNorm -> attention, LayerNorm -> 4d MLP), seq 2048 x batch 4, bf16, n = 4.
One step = forward + backward of a scalar loss (no optimizer: every variant would add the same Adam
cost on nearly the same parameters). Each variant is checked first (backend="mhc" against the naive
eager mHC on the same weights), then timed with CUDA events (median of --iters steps after warm-up);
peak memory is torch.cuda.max_memory_allocated during a step, reported in total and above the memory
held before the step (parameters, inputs).

    PYTHONPATH=. python benchmarks/bench_training.py --d 2048 4096 7168 --layers 4

--rounds R times every variant R - 1 more times round-robin (every other round in reverse order) and adds rows with
the median and the same-round overhead range. --paired P then runs P passes of --lead-in untimed steps and one timed
step of every variant back to back, and adds rows with the median per-pass overhead and its quartiles
(``paired_steps``: the clock's drift cancelled). --variants adds rows beside residual and backend=mhc: naive (eager and
Inductor), liger, norecompute, recompute<k> (uniform blocks of k sites), blocks<a>-<b>-... (these recompute blocks),
nofold, noprp, fused, fusedbcast / fusedcopy (the fuse=True model with the Gluon kernels' broadcast X_prev reads
on / off, ``triton_common.GLUON_BCAST``: the step after a chain head reads the embedding's one row, or its Gluon
kernels a dense copy; on is the default since session 50, so fusedbcast times what fused does), prpws (fold_post_res_proj=True with the Gluon post_res_proj, DotCfg.ws), fusedws (fuse=True with
step's Gluon forward and two-pass backward, DotCfg.ws and StepBwdCfg.ws; both sm_90 only, elsewhere they run the
Triton kernels; DotCfg.ws is the default since session 27, so fused and noprp's counterpart already run the Gluon
post_res_proj, and tune:post_res_proj:ws=0 gives the Triton one), headrecompute (the head's collapse recomputed in the
backward, as before session 17), oldhead (a chain's head and tail as before session 17: collapse recomputed, its
gradient n-wide, the head's expand made dense), opt:<option>=<v>,... (backend=mhc with these options, bools as 1 / 0:
opt:fold_pre_recompute=0), cudagraphs, tritonlaunch (the same compiled model with every mHC launch through Triton's
kernel[grid] instead of kernels/launch.py's cached launchers), gluonlaunch (the same compiled model with the Gluon
kernels' launches on Triton's path, ``launch.enable_gluon(False)``; cached, the default since session 49), tune:<kernel>:<field>=<v>,... (the same compiled model
with one kernel's config changed: the fields of its config in triton_config.DEFAULTS, e.g. tune:proj_dx_dphi:enabled=0
for proj's backward as the dx + dphi kernel pair, tune:proj_dx_dphi:pipeline_all=0, tune:post_res_backward:two_d=0 for
the older post_res backward kernel, or tune:proj:bt=64,num_warps=4).

Writes a markdown table to $OUT (or ./bench_out) and prints it. Rows are written as they finish, so a
run cut short by its time budget still leaves what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import time
import traceback
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mhc_compile  # noqa: E402
from benchmarks.gpu_clocks import ClockLog  # noqa: E402
from benchmarks.gpu_clocks import describe as describe_clocks  # noqa: E402
from mhc_compile.kernels import reference as ref  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int, head_dim: int = 128):
        super().__init__()
        self.heads = max(1, d // head_dim)
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def attn(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

    def mlp(self, x):
        return self.out(F.gelu(self.fc(x), approximate="tanh"))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Stack(nn.Module):
    def __init__(self, d: int, layers: int):
        super().__init__()
        self.h = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class NaiveMHC(nn.Module):
    """The same stack with mHC written in plain PyTorch (reads the sites prepared on ``stack``)."""

    def __init__(self, stack: Stack, n: int):
        super().__init__()
        self.stack, self.n = stack, n

    def site(self, X, site, f):
        n, c = X.shape[-2], X.shape[-1]
        lead = X.shape[:-2]
        x2 = X.reshape(-1, n, c)
        p, sq = ref.proj(x2, site.phi)
        h_pre, h_post, h_res = ref.coeffs(p, sq, site.bias, site.alpha, n, n * c, 1e-6, 20, "mhc")
        y = f(ref.pre(x2, h_pre).reshape(*lead, c))
        return ref.post_res(x2, h_res, h_post, y.reshape(-1, c)).reshape(X.shape)

    def forward(self, x):
        X = x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1])
        for b in self.stack.h:
            attn_site, mlp_site = [m for m in b.children() if isinstance(m, mhc_compile.MHCSite)]
            X = self.site(X, attn_site, lambda v: b.attn(b.ln_1(v)))
            X = self.site(X, mlp_site, lambda v: b.mlp(b.ln_2(v)))
        return self.stack.ln_f(X.mean(-2))


class LigerStack(nn.Module):
    """The same stack with every sublayer wrapped in Liger-Kernel's LigerMHC."""

    def __init__(self, stack: Stack, n: int, d: int, dtype):
        super().__init__()
        from liger_kernel.transformers.mhc import LigerMHC

        self.n, self.stack = n, stack
        self.sites = nn.ModuleList()
        for b in stack.h:
            for f in (_Sub(b.ln_1, b.attn), _Sub(b.ln_2, b.mlp)):
                self.sites.append(LigerMHC(f, hc=n, c=d, phi_dtype=dtype))

    def forward(self, x):
        X = x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1]).contiguous()
        for site in self.sites:
            X = site(X)
        return self.stack.ln_f(X.mean(-2))


class _Sub(nn.Module):
    def __init__(self, norm, fn):
        super().__init__()
        self.norm, self.fn = norm, fn

    def forward(self, x):
        return self.fn(self.norm(x))


_PROBES: dict = {}


def loss_of(out):
    """<out, P> for a fixed random P. (Not mean(out^2): after the final LayerNorm with unit weight that
    loss is constant in the hidden states, so its gradient is pure rounding noise.)"""
    key = (tuple(out.shape), out.device)
    if key not in _PROBES:
        gen = torch.Generator(device=out.device).manual_seed(1234)
        _PROBES[key] = torch.randn(out.shape, device=out.device, generator=gen) / out.numel() ** 0.5
    return (out.float() * _PROBES[key]).sum()


def _grad_params(fn):
    """The parameters whose .grad a step of ``fn`` (a module or torch.compile's wrapper of one) writes."""
    return list(getattr(fn, "_orig_mod", fn).parameters()) if isinstance(fn, nn.Module) else []


def _step(fn, x, params=()):
    # CUDA-graph variants replay into the same output buffers: mark each step's start (a no-op otherwise)
    torch.compiler.cudagraph_mark_step_begin()
    # CUDA-graph variants get their gradients set to None before each step, as optimizer.zero_grad() does:
    # autograd stores a step's first gradient as .grad itself, there a graph output the next replay
    # overwrites, so accumulating into it fails ("accessing tensor output of CUDAGraphs that has been
    # overwritten by a subsequent run", runs 3 and 4). The others accumulate, as in the earlier runs, so that
    # their peak-memory columns keep meaning activations (gradients already allocated before the step).
    x.grad = None
    for p in params:
        p.grad = None
    loss_of(fn(x)).backward()


def _timed_step(fn, x, params=()) -> float:
    """One step's GPU time in ms (CUDA events), waited for."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    _step(fn, x, params)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_step(fn, x, iters, warmup=3, cudagraphs=False):
    params = _grad_params(fn) if cudagraphs else ()
    for _ in range(warmup):
        _step(fn, x, params)
    torch.cuda.synchronize()
    times = []
    with ClockLog() as clocks:  # the SM clock drops under the power cap in a long step (gpu_clocks.py)
        for _ in range(iters):
            times.append(_timed_step(fn, x, params))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(fn, x, params)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return statistics.median(times), peak, peak - base, clocks.summary()


def paired_steps(variants, contexts, names, x, passes, deadline, lead_in: int = 1) -> dict[str, list[float]]:
    """Step ms of each variant over ``passes`` passes, every pass ``lead_in`` untimed steps and one timed step of every
    variant back to back (every other pass in reverse order). A round times one variant for its 10-odd steps (about
    3 s at d = 7168) before the next, so a drift of the power-capped SM clock over seconds lands on one variant of the
    round: same-round overheads have spread over 3-4 points (session 56: +6.0 .. +9.8 %). A pass's variants run
    seconds apart at most, so the per-pass ratios cancel that drift.

    The untimed lead-in is there so that a step does not pay for the one before: with none (session 57, H100, d = 7168,
    37 passes) the residual step took 195.2 ms against 193.4 in the rounds, as an mHC step before it had left the
    power-capped clock lower, and the overheads came out about a point under the rounds' (+6.9 against +7.9 %).
    Whether one lead-in step is enough has not run on a GPU yet (session 58's prepared call 3 compares the two)."""
    steps: dict[str, list[float]] = {name: [] for name in names}
    # pass -1 is not kept: it brings every variant's .grad back, so that each timed step accumulates into it as
    # time_step's steps after their warm-up do (the rounds zero the gradients between variants)
    for p in range(-1, passes):
        if time.time() > deadline:
            break
        for name in (names if p % 2 == 0 else list(reversed(names))):
            fn = variants[name]
            params = _grad_params(fn) if "CUDA graphs" in name else ()
            with contexts.get(name, contextlib.nullcontext)():
                for _ in range(lead_in):
                    _step(fn, x, params)
                ms = _timed_step(fn, x, params)
            if p >= 0:
                steps[name].append(ms)
    x.grad = None
    zero_grads(*{getattr(fn, "_orig_mod", fn) for fn in variants.values() if isinstance(fn, nn.Module)})
    torch.cuda.empty_cache()
    n_done = min(len(t) for t in steps.values())
    return {name: t[:n_done] for name, t in steps.items()}


def paired_rows(d, steps: dict[str, list[float]], lead_in: int = 1) -> list[str]:
    """Markdown rows of ``paired_steps``: each variant's median step time, and the median of its per-pass overheads
    against the first variant's step in the same pass, with their quartiles."""
    names = list(steps)
    base = steps[names[0]]
    rows = [f"<!-- d={d}: {len(base)} paired passes ({lead_in} untimed and one timed step of every variant a pass; "
            f"overhead: median of the per-pass ratios to the baseline, with their quartiles) -->"]
    for name in names:
        times = steps[name]
        if not times:
            continue
        ratios = sorted(100 * (t / b - 1) for t, b in zip(times, base))
        q1, q3 = (statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else (ratios[0],) * 2)
        rows.append(f"| {d} | {name} (paired steps: {len(times)}) | {statistics.median(times):.2f} | "
                    f"{statistics.median(ratios):+.1f}% (quartiles {q1:+.1f} .. {q3:+.1f}) | | | | |")
    return rows


def zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def round_rows(d, rounds: dict[str, list[float]], clocks: dict[str, list[dict | None]] | None = None) -> list[str]:
    """Markdown rows of the interleaved rounds: the median step time over rounds, its overhead against the first
    variant's median, and each variant's overhead in its worst and best round against the baseline's same round
    (rounds run one after another, so a round's variants saw the same state of the GPU); with ``clocks`` (each
    round's gpu_clocks summary), the median over rounds of the median SM clock."""
    names = list(rounds)
    base = rounds[names[0]]
    rows = [f"<!-- d={d}: {len(base)} interleaved rounds (median of each round's steps; overhead against the "
            f"baseline's median, and its range over same-round pairs) -->"]
    for name in names:
        times = rounds[name]
        med = statistics.median(times)
        paired = [100 * (t / b - 1) for t, b in zip(times, base)]
        mhz = [c["sm_mhz"] for c in (clocks or {}).get(name, []) if c]
        rows.append(f"| {d} | {name} (rounds: {len(times)}) | {med:.2f} | "
                    f"{100 * (med / statistics.median(base) - 1):+.1f}% ({min(paired):+.1f} .. {max(paired):+.1f}) "
                    f"| | | | {f'{statistics.median(mhz):.0f} MHz' if mhz else ''} |")
    return rows


@contextlib.contextmanager
def gluon_step():
    """step's Gluon kernels (sm_90) around a step: its forward's post_res_proj with DotCfg.ws (the default since
    session 27), its backward in two passes (StepBwdCfg.ws, the default since session 37: the variant now differs
    from fuse=True's only where a tune turned them off); profile_step.py --fusedws uses it too."""
    from mhc_compile.kernels import triton_fused, triton_ops

    with triton_ops.tuning("post_res_proj", ws=True), triton_fused.tuning("step_bwd", ws=True):
        yield


@contextlib.contextmanager
def _old_head():
    """In force while the variant compiles (its first step): the collapse left to the partitioner (which recomputed
    it from a rebuilt last stream) and the chain head's expand made dense, as before session 17; with
    broadcast_collapse_grad=False in its options, the three session-17 changes at a chain's ends are undone."""
    from unittest import mock

    from mhc_compile.passes import recompute, rewrite

    expand = rewrite._ChainRewriter.expand

    def dense_expand(self, head, site):
        e = expand(self, head, site)
        with self.graph.inserting_after(e):
            c = self.call("contiguous", (e,), head, site, "expand", kind="call_method")
        self.wide.discard(e)
        self.wide.add(c)
        self.channel_dim[c] = self.channel_dim.pop(e)
        return c

    with mock.patch.object(recompute, "_save_collapses", lambda graph, policy: None), \
            mock.patch.object(rewrite._ChainRewriter, "expand", dense_expand):
        yield


def run_size(d, args, emit):
    dtype = torch.bfloat16
    dev = "cuda"
    torch.manual_seed(0)
    torch._dynamo.reset()
    x = torch.randn(args.batch, args.seq, d, device=dev, dtype=dtype, requires_grad=True)
    stack = Stack(d, args.layers).to(dev, dtype)

    variants = {}
    variants["residual (Inductor)"] = torch.compile(stack)
    mhc_model = Stack(d, args.layers).to(dev, dtype)
    mhc_model.load_state_dict(stack.state_dict())
    mhc_compile.prepare(mhc_model, x.detach(), n=args.n)
    with torch.no_grad():  # off the init, so the check exercises every term
        for p in mhc_compile.mhc_parameters(mhc_model):
            p.add_(0.05 * torch.randn_like(p))
    variants["backend=mhc"] = torch.compile(mhc_model, backend="mhc", options={"n": args.n})
    naive = NaiveMHC(mhc_model, args.n)
    if "norecompute" in args.variants:
        variants["backend=mhc recompute=none"] = torch.compile(
            mhc_model, backend="mhc", options={"n": args.n, "recompute": "none"})
    for v in args.variants:  # "recompute4": keep the stream every 4 sublayers (the memory / time trade-off)
        if v.startswith("recompute") and v[len("recompute"):].isdigit():
            every = int(v[len("recompute"):])
            variants[f"backend=mhc recompute={every}"] = torch.compile(
                mhc_model, backend="mhc", options={"n": args.n, "recompute": every})
    for v in args.variants:  # "blocks4-3-1": these recompute blocks, first block first (plans side by side)
        if v.startswith("blocks"):
            sizes = [int(k) for k in v[len("blocks"):].split("-")]
            variants[f"backend=mhc recompute={sizes}"] = torch.compile(
                mhc_model, backend="mhc", options={"n": args.n, "recompute": sizes})
    contexts = {}  # variants that run the compiled model above with a kernel setting changed around the step
    from mhc_compile.kernels import triton_ops

    for v in args.variants:  # "tune:proj_dx_dphi:enabled=0": the same compiled model, one kernel's config changed
        if v.startswith("tune:"):
            kernel, fields = tune_fields(v)
            label = f"backend=mhc, {kernel} {v.split(':', 2)[2]}"
            variants[label] = variants["backend=mhc"]
            contexts[label] = lambda kernel=kernel, fields=fields: triton_ops.tuning(kernel, **fields)
    if "tritonlaunch" in args.variants:  # the same compiled model, every launch through Triton's kernel[grid]
        from mhc_compile.kernels import launch

        label = "backend=mhc, Triton's launch path"
        variants[label] = variants["backend=mhc"]

        @contextlib.contextmanager
        def triton_launch_path():
            launch.enable(False)
            try:
                yield
            finally:
                launch.enable(True)

        contexts[label] = triton_launch_path
    if "gluonlaunch" in args.variants:  # the same compiled model, the Gluon kernels' launches on Triton's path
        from mhc_compile.kernels import launch

        label = "backend=mhc, Gluon launches on Triton's path"
        variants[label] = variants["backend=mhc"]
        was = launch._gluon_enabled

        @contextlib.contextmanager
        def gluon_launch_path():
            launch.enable_gluon(False)
            try:
                yield
            finally:
                launch.enable_gluon(was)

        contexts[label] = gluon_launch_path
    if "headrecompute" in args.variants:  # session 17's A/B: the head's collapse recomputed, as before it
        from unittest import mock

        from mhc_compile.passes import recompute

        label = "backend=mhc, head collapse recomputed"
        variants[label] = torch.compile(mhc_model, backend="mhc", options={"n": args.n})
        # in force while it compiles (its first step); a separate torch.compile, so its own graphs
        contexts[label] = lambda: mock.patch.object(recompute, "_save_collapses", lambda graph, policy: None)
    if "oldhead" in args.variants:  # session 17's A/B: a chain's head and tail as before it (see _old_head)
        label = "backend=mhc, head and tail as before session 17"
        variants[label] = torch.compile(mhc_model, backend="mhc",
                                        options={"n": args.n, "broadcast_collapse_grad": False})
        contexts[label] = _old_head
    if "nofold" in args.variants:  # passes/fold_stream_grads.py off: three partial stream gradients and a sum
        variants["backend=mhc fold_stream_grads=False"] = torch.compile(
            mhc_model, backend="mhc", options={"n": args.n, "fold_stream_grads": False})
    if "noprp" in args.variants:  # passes/fold_post_res_proj.py off: each site's post_res and proj apart
        variants["backend=mhc fold_post_res_proj=False"] = torch.compile(
            mhc_model, backend="mhc", options={"n": args.n, "fold_post_res_proj": False})
    for v in (v for v in args.variants if v.startswith("opt:")):  # any options beside the default's
        options = _parse_options(v[len("opt:"):])
        variants[f"backend=mhc {', '.join(f'{k}={o!r}' for k, o in options.items())}"] = torch.compile(
            mhc_model, backend="mhc", options={"n": args.n, **options})
    if {"fused", "fusedws", "fusedbcast", "fusedcopy"} & set(args.variants):  # the opt-in cross-layer boundary ops
        variants["backend=mhc fuse=True"] = torch.compile(
            mhc_model, backend="mhc", options={"n": args.n, "fuse": True})
    # the cross-layer ops with the warp-specialized Gluon kernels (sm_90, bf16; post_res_proj's is the default since
    # session 27, step's two-pass backward opt-in): the same compiled models, the kernel configs changed around the step
    if "prpws" in args.variants:  # the forward's post_res + proj as one Gluon kernel (DotCfg.ws)
        prp = variants.get("backend=mhc fold_post_res_proj=True")  # the opt: variant's model, where it runs
        if prp is None:
            prp = torch.compile(mhc_model, backend="mhc", options={"n": args.n, "fold_post_res_proj": True})
        label = "backend=mhc fold_post_res_proj=True, post_res_proj ws"
        variants[label] = prp
        contexts[label] = lambda: triton_ops.tuning("post_res_proj", ws=True)
    if "fusedws" in args.variants:  # fuse=True with step's forward (DotCfg.ws) and two-pass backward (StepBwdCfg.ws)
        label = "backend=mhc fuse=True, step ws forward and backward"
        variants[label] = variants["backend=mhc fuse=True"]
        contexts[label] = gluon_step
    for v, on in (("fusedbcast", True), ("fusedcopy", False)):  # the Gluon kernels' broadcast X_prev reads on / off
        if v in args.variants:
            from unittest import mock

            from mhc_compile.kernels import triton_common

            label = f"backend=mhc fuse=True, Gluon {'broadcast reads' if on else 'dense copy'}"
            variants[label] = variants["backend=mhc fuse=True"]
            contexts[label] = lambda on=on: mock.patch.object(triton_common, "GLUON_BCAST", on)
    if "fused" not in args.variants and "backend=mhc fuse=True" in variants:
        del variants["backend=mhc fuse=True"]
    if "cudagraphs" in args.variants:  # host launch overhead out of the picture, for both sides
        cg = {"triton.cudagraphs": True}
        variants["residual (Inductor, CUDA graphs)"] = torch.compile(stack, options=cg)
        variants["backend=mhc CUDA graphs"] = torch.compile(
            mhc_model, backend="mhc", options={"n": args.n, "inductor_options": cg})
    if "naive" in args.variants:
        variants["naive mHC eager"] = naive
        variants["naive mHC Inductor"] = torch.compile(naive)
    if "liger" in args.variants:
        try:
            variants["LigerMHC"] = LigerStack(Stack(d, args.layers).to(dev, dtype), args.n, d, dtype).to(dev)
        except Exception as e:  # liger-kernel missing
            emit(f"| {d} | LigerMHC | unavailable: {type(e).__name__}: {e} | | | | | |")

    # correctness of the backend (and of each opt: variant: other passes, other kernels) against the naive eager mHC
    # on the same weights
    want = naive(x)
    loss_of(want).backward()
    g_want = {k: p.grad.float().clone() for k, p in mhc_model.named_parameters() if p.grad is not None}
    gx_want = x.grad.float().clone()
    zero_grads(mhc_model)
    x.grad = None
    for label in [k for k in variants if k == "backend=mhc" or k.startswith("backend=mhc") and "=" in k[12:]
                  and k not in contexts]:
        out = variants[label](x)
        loss_of(out).backward()
        err = ((out.float() - want.float()).norm() / want.float().norm()).item()
        gerr = max(((p.grad.float() - g_want[k]).norm() / g_want[k].norm().clamp_min(1e-30)).item()
                   for k, p in mhc_model.named_parameters() if k in g_want and p.grad is not None)
        gxerr = ((x.grad.float() - gx_want).norm() / gx_want.norm()).item()
        emit(f"<!-- d={d}: {label} vs naive eager: out rel err {err:.2e}, x.grad {gxerr:.2e}, max param grad rel err "
             f"{gerr:.2e} -->")
        print(f"d={d} check {label}: out {err:.2e} x.grad {gxerr:.2e} param grads {gerr:.2e}", flush=True)
        zero_grads(mhc_model, stack)
        x.grad = None

    def measure(name, fn):
        try:
            with contexts.get(name, contextlib.nullcontext)():
                return time_step(fn, x, args.iters, cudagraphs="CUDA graphs" in name)
        finally:
            x.grad = None
            for m in (stack, mhc_model):
                zero_grads(m)
            torch.cuda.empty_cache()

    base_ms = None
    rounds: dict[str, list[float]] = {}  # step ms of every round, per variant that ran
    round_clocks: dict[str, list[dict | None]] = {}  # and the SM clock while it ran
    for name, fn in variants.items():
        if time.time() > args.deadline:
            emit(f"| {d} | {name} | skipped: time budget | | | | | |")
            continue
        try:
            t0 = time.time()
            ms, peak, act, clocks = measure(name, fn)
            if base_ms is None:
                base_ms, base_act = ms, act
            rounds[name], round_clocks[name] = [ms], [clocks]
            emit(f"| {d} | {name} | {ms:.2f} | {100 * (ms / base_ms - 1):+.1f}% | {peak / 2**30:.2f} | "
                 f"{act / 2**30:.2f} | {100 * (act / base_act - 1):+.1f}% | {describe_clocks(clocks)} |")
            print(f"  {name}: {ms:.2f} ms ({time.time() - t0:.0f} s incl. compile)", flush=True)
        except Exception as e:
            emit(f"| {d} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | | | | |")
            traceback.print_exc()
    # --rounds R > 1: time every compiled variant R - 1 more times, round-robin, so that a drift of the GPU's
    # clocks or temperature over the run falls on every variant alike (one variant after another, the residual
    # baseline moved 1-2 ms between processes: results/session6-2026-12-02-h200.md); every other round in reverse
    # order, so that no variant always runs right after the same one (on a power-capped GPU a step's clock depends
    # on what ran before it: session 39's runs put the same two variants 0.5-0.7 points apart either way)
    for r in range(1, args.rounds):
        for name in (list(rounds) if r % 2 == 0 else list(reversed(rounds))):
            if time.time() > args.deadline:
                break
            try:
                ms, _, _, clocks = measure(name, variants[name])
                rounds[name].append(ms)
                round_clocks[name].append(clocks)
            except Exception:  # reported; the variant keeps the rounds it finished
                traceback.print_exc()
    if args.rounds > 1 and rounds:
        for line in round_rows(d, rounds, round_clocks):
            emit(line)
    if args.paired and len(rounds) > 1:
        steps = paired_steps(variants, contexts, list(rounds), x, args.paired, args.deadline, args.lead_in)
        for line in paired_rows(d, steps, args.lead_in):
            emit(line)


def tune_fields(spec: str) -> tuple[str, dict]:
    """'tune:proj_dx_dphi:bk=64,maxnreg=none,waves=8' -> ('proj_dx_dphi', fields of its config dataclass in
    triton_config: ints, floats, 'none' -> None, 0 / 1 for the flags)."""
    from dataclasses import fields

    from mhc_compile.kernels.triton_config import DEFAULTS

    _, kernel, items = (spec.split(":", 2) + ["", ""])[:3]
    if kernel not in DEFAULTS:
        raise SystemExit(f"{spec}: unknown kernel {kernel!r} (triton_config has {sorted(DEFAULTS)})")
    kinds = {f.name: str(f.type) for f in fields(DEFAULTS[kernel])}
    out = {}
    for item in filter(None, items.split(",")):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"{spec}: {kernel}'s config has no field {key!r} (it has {sorted(kinds)})")
        if value.lower() == "none":
            out[key] = None
        elif "bool" in kinds[key]:
            out[key] = value not in ("0", "false", "False")
        elif "float" in kinds[key]:
            out[key] = float(value)
        else:
            out[key] = int(value)
    return kernel, out


def _parse_options(text: str) -> dict:
    """"a=1,b=0,c=x" -> {"a": True, "b": False, "c": "x"} (MHCConfig's bool fields take 1 / 0; other ints stay
    ints where the field is not a bool: recompute=3)."""
    from mhc_compile.config import MHCConfig

    bools = {f for f, v in vars(MHCConfig()).items() if isinstance(v, bool)}
    options = {}
    for item in text.split(","):
        key, value = item.split("=", 1)
        if key in bools:
            options[key] = value in ("1", "True", "true")
        else:
            options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every variant this many times, round-robin after the first pass (median reported)")
    ap.add_argument("--paired", type=int, default=0,
                    help="then this many passes of one step of every variant back to back (paired_steps)")
    ap.add_argument("--lead-in", type=int, default=1,
                    help="untimed steps of a variant before its timed step in a --paired pass (paired_steps)")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--variants", nargs="*", default=["naive", "liger", "norecompute", "nofold", "fused", "cudagraphs"],
                    help="optional variants besides residual and backend=mhc")
    args = ap.parse_args()
    args.deadline = time.time() + args.budget_s
    warnings.filterwarnings("ignore")
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "training.md")
    import triton

    header = [
        f"# Training step, GPT-style pre-norm stack — {datetime.date.today()}",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}",
        f"- {args.layers} layers, seq {args.seq} x batch {args.batch}, bf16, n = {args.n}; step = fwd + bwd of "
        "<out, P> for a fixed random P, no optimizer; median of {} steps (CUDA events)".format(args.iters),
        "- overhead is against the first row (plain residual under Inductor); 'act' = peak memory above what "
        "was allocated before the step",
        "",
        "- SM clock: median (10th percentile) over the timed steps, and median power, by nvidia-smi every 100 ms; "
        "under the power cap it falls well below the boost clock (gpu_clocks.py)",
        "",
        "| d | variant | step ms | time overhead | peak GiB | act GiB | act overhead | SM clock |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines = list(header)

    def emit(line):
        lines.append(line)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    emit("")
    lines.pop()
    for d in args.d:
        if time.time() > args.deadline:
            emit(f"| {d} | all | skipped: time budget | | | | | |")
            continue
        run_size(d, args, emit)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
