"""The cost model: bytes moved and bytes kept by the mHC bookkeeping, as sympy expressions.

One source for these counts: the recompute planner takes its blocks from ``block_schedule`` (the
partition minimising ``block_peak``, the backward's modelled memory peak) or, without an activation
estimate, its uniform block size from ``memory`` (the minimiser is derived here, not hand-copied);
``explain`` prints ``site_traffic`` for the user's widths, and the benchmarks divide measured times by the
same byte counts.

Symbols: T tokens, n streams, C width, L sites in a chain, L_r recompute block size, s bytes per stream
element (2 for bf16). Counts are in elements of the stream, per token and per site, counting every tensor
a kernel reads or writes once (coefficients, a few fp32 values a token, are left out: under 1% of one
stream at C >= 1024). A plain residual add costs 3C forward and nothing extra backward.

Traffic per site (elements of C per token), fused design (``passes/fuse.py``):

    forward   step = mix + proj: read X_prev (n), y (1), write X (n);  pre: read X (n), write x_in (1)
    backward  pass 1 (dH_pre): read X_prev, y, dx_in;  pass 2: read X_prev, y, dx_in, dX, write dX_prev, dy
    recompute one forward of the step per site (x_in is recomputed, not kept)

unfused design (``fuse=False``, the paper's kernel split; autograd sums the stream gradient's parts):

    forward   proj n, pre n + 1, post_res 2n + 1
    backward  post_res 3n + 2, pre 3n + 1 (its dX added to the running sum), proj 3n (likewise)
    recompute post_res and pre of each site: 3n + 2

default path (``fuse=False`` with ``fold_pre_recompute`` and ``fold_stream_grads``): forward as unfused; backward
post_res 3n + 2, pre_backward_dh n + 1 (dH_pre alone), proj_pre_backward 3n + 1 (X, dx_in, the stream gradient so
far, dX written over it); recompute post_res 2n + 1 at the sites the schedule recomputes, and the sublayer input
that post_res's backward writes from its read of the stream (1; every site once recompute is on). ``DEFAULT``
holds these counts; with ``fold_boundary_grads`` (also a default, since session 41) each boundary's proj_pre_backward
and the post_res backward after it run as one pass, 2n fewer (``traffic``; the boundaries a chain's per-site count
takes but does not fold: ``chain_ends``)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

T, n, C, L, L_r, s = sympy.symbols("T n C L L_r s", positive=True)


@dataclass(frozen=True)
class Traffic:
    """Elements of C per token that one site's bookkeeping reads and writes."""

    forward: sympy.Expr
    backward: sympy.Expr
    recompute: sympy.Expr

    def total(self, recompute: bool = True) -> sympy.Expr:
        return self.forward + self.backward + (self.recompute if recompute else 0)


FUSED = Traffic(
    forward=(2 * n + 1) + (n + 1),
    backward=(n + 2) + (3 * n + 3),
    recompute=(2 * n + 1) + (n + 1),
)
UNFUSED = Traffic(
    forward=n + (n + 1) + (2 * n + 1),
    backward=(3 * n + 2) + (3 * n + 1) + 3 * n,
    recompute=(2 * n + 1) + (n + 1),
)
# Session 37's d = 7168 step (H100, 8 sites, 5 recomputed) moved 453 elements of C a token: 8 * (18 + 32 + 1) + 5 * 9
DEFAULT = Traffic(
    forward=n + (n + 1) + (2 * n + 1),
    backward=(3 * n + 2) + (n + 1) + (3 * n + 1),
    recompute=(2 * n + 1) + 1,
)
RESIDUAL_ADD = Traffic(forward=sympy.Integer(3), backward=sympy.Integer(0), recompute=sympy.Integer(0))


def chain_ends(collapse_head_grad: bool = True, collapse_tail: bool = True,
               fold_boundary_grads: bool = True) -> sympy.Expr:
    """What a chain's two ends move against ``traffic``'s uniform count for their sites, once a chain and step
    (elements of C a token; negative: fewer).

    The head's stream is its embedding broadcast over the n streams, which its ops read as one row a token
    (triton_common.stream_arg): forward proj 1, pre 2, post_res n + 2, backward pre_backward_dh 2. Its gradient,
    with ``collapse_head_grad`` (passes/collapse_head_grad.py), is written as one row: post_res's backward n + 4
    (collapse_dx), proj_pre_backward_collapsed 4; without, as n rows (2n + 3, 2n + 2) that the expand's backward sums
    (n + 1). The tail's post_res, with ``collapse_tail`` (passes/collapse_tail.py), writes the collapsed row (n + 2);
    without, its n rows and the mean that reads them back (2n + 1 + n + 1). With ``fold_boundary_grads`` the uniform
    count takes 2n off every site's backward (its post_res backward folded with the next site's proj_pre_backward),
    but two of a chain's post_res backwards run apart: the head's (collapsed, or on a broadcast X_prev that the one
    pass does not take; its kernels are counted above either way) and the last site's (no boundary after it)."""
    head_fwd = 1 + 2 + (n + 2)
    head_bwd = (n + 4) + 2 + 4 if collapse_head_grad else (2 * n + 3) + 2 + (2 * n + 2) + (n + 1)
    tail = (n + 2) if collapse_tail else (2 * n + 1) + (n + 1)
    site = traffic(False, fold_boundary_grads=fold_boundary_grads)
    uniform_head = site.forward + site.backward
    uniform_tail = 2 * n + 1  # DEFAULT's post_res forward at the tail site
    last_unfolded = 2 * n if fold_boundary_grads else 0
    return sympy.expand(head_fwd + head_bwd - uniform_head + tail - uniform_tail + last_unfolded)


def traffic(fused: bool = True, fold_stream_grads: bool = True, fold_pre_recompute: bool = True,
            fold_boundary_grads: bool = True) -> Traffic:
    """A configuration's traffic: FUSED with ``fuse``, else the unfused kernels with the backward graph's folds as
    configured (``DEFAULT`` with both, the paper's split ``UNFUSED`` with neither): fold_stream_grads makes the
    backward DEFAULT's, fold_pre_recompute the recompute (post_res's, pre's output written by its backward), and
    fold_boundary_grads (on top of fold_stream_grads, whose proj_pre_backward it folds) takes 2n off the backward:
    the stream gradient between a boundary's proj_pre_backward and the post_res backward after it, neither written
    nor read back (passes/fold_boundary_grads.py; every boundary but a chain head's, counted here at every site, and
    the two a chain does not fold added back by ``chain_ends``)."""
    if fused:
        return FUSED
    backward = (DEFAULT if fold_stream_grads else UNFUSED).backward
    if fold_boundary_grads and fold_stream_grads:
        backward = backward - 2 * n
    return Traffic(forward=UNFUSED.forward, backward=backward,
                   recompute=(DEFAULT if fold_pre_recompute else UNFUSED).recompute)


def site_bytes(fused: bool = True, recompute: bool = True, fold_boundary_grads: bool = True) -> sympy.Expr:
    """Extra bytes per site over a plain residual add, for T tokens: a sympy expression (``fused`` False: the
    unfused kernels with the default folds, ``traffic``'s)."""
    extra = traffic(fused, fold_boundary_grads=fold_boundary_grads).total(recompute) - RESIDUAL_ADD.total()
    return sympy.expand(extra * C * T * s)


def evaluate(expr: sympy.Expr, **values) -> float:
    """``expr`` with symbols replaced by the given values (by name: T=8192, n=4, ...)."""
    return float(expr.subs({sympy.Symbol(k, positive=True): v for k, v in values.items()}))


# ---------------------------------------------------------------------------------------------
# Memory kept for backward by a chain of L sites with recompute blocks of L_r sites
# ---------------------------------------------------------------------------------------------
#: the stream saved at every block boundary (n C per block) plus, while one block is recomputed, its
#: widened streams and the inputs and outputs of its sublayers ((n + 2) C per site), per token.
memory = n * C * (L / L_r) + (n + 2) * C * L_r


@functools.cache
def _optimal_block() -> sympy.Expr:
    (root,) = sympy.solve(sympy.diff(memory, L_r), L_r)
    return root


def optimal_block_size(n_streams: int, sites: int) -> float:
    """The real L_r minimising ``memory``: sqrt(n L / (n + 2)), derived by sympy."""
    return float(_optimal_block().subs({n: n_streams, L: sites}))


def block_moments(blocks: list[int], n_streams: int, act: float, wgrad: float = 0.0) -> list[float]:
    """What is alive, in C-wide activations per token, while the backward processes each block (first block
    first); ``block_peak`` says what is counted."""
    sites = sum(blocks)
    out, start = [], 0
    for b, size in enumerate(blocks, 1):
        out.append(_block_units(b, start, start + size, sites, n_streams, act, wgrad))
        start += size
    return out


def _block_units(b: int, start: int, end: int, sites: int, n_streams: int, act: float, wgrad: float) -> float:
    """Block b (1-based) of sites [start, end); see ``block_peak``."""
    streams = b + (end - start - 1) + (b == 1)
    return act * end + wgrad * (sites - end) + n_streams * streams


def block_peak(blocks: list[int], n_streams: int, act: float, wgrad: float = 0.0) -> float:
    """Modelled peak of the backward, in C-wide activations per token, for recompute blocks of these sizes.

    The backward walks the blocks last to first. While block b (1-based, sites [i, j)) is processed, alive are:
    - the activations of the sites before j (``act`` each: what the sublayers keep for their own backward,
      freed as the backward passes them);
    - the weight gradients of the sites after j (``wgrad`` each: a compiled backward returns its weight
      gradients when it ends, so they pile up through it; a GPT layer's 12 d^2 weights over its two sites
      and over T d: 6 d / T);
    - the stored input streams of blocks 2..b (n each);
    - the streams recomputed for block b: the j - i - 1 inside it, and one more when b = 1. That term stood for
      the chain head's expand, recomputed as a dense copy; since session 17 the head is a stride-0 view of the
      embedding, yet the term still predicts the measured order of plans, and dropping it would not: on an H200
      (session 18, results/training-2026-12-03-h200-s18-call2-*.md) the plans it would then pick used more
      activation memory than [4, 3, 1], [6, 2] +22.5 % against +16.7 % at d = 2048 and [5, 2, 1] +18.9 % against
      +16.8 % at d = 7168. Which n-wide tensor it now stands for was not identified. The backward recomputes a
      block's streams in forward order and frees them in reverse, so they are alive together at its start;
    - one more stream: the gradient entering the block from the block after it; for the last block (the start
      of the backward) the last stream's gradient that the head's backward writes. (Until session 17 the backward
      also rebuilt the last stream to recompute its collapse; the collapse is saved now, ``recompute.py``.)

    Fitted on the 4-layer stack (8 sites, act ~ 8.1) at d = 4096 and 7168 on an H200
    (benchmarks/results/session6-2026-12-02-h200.md): four plans a width; each plan's measured peak above the
    best plan's is within 2.6 units (64 / 112 MiB) of this model's difference. The previous model (no weight
    gradients, no incoming gradient stream) tied [5, 2, 1] with [4, 3, 1] at d = 7168 and picked the former,
    which measured 3.9 units higher.
    """
    return max(block_moments(blocks, n_streams, act, wgrad), default=0.0)


def block_schedule(sites: int, n_streams: int, act: float, wgrad: float = 0.0) -> list[int]:
    """Recompute block sizes, first block first, minimising ``block_peak``; among plans within 1e-9 of that
    peak, the one with the least summed block moments (the model is approximate: a plan whose other blocks also
    stay low is the safer one), then the most blocks. Two dynamic programmes over (blocks, end site): the
    minimal peak, then the least sum under it.

    Blocks come out large early in the chain and small late: the peak is usually at the start of the backward,
    when every site's activations are still alive, so the last blocks must recompute little; the first blocks
    are processed after most activations are freed and can recompute many streams.
    """
    if sites <= 0:
        return []
    inf = float("inf")
    max_blocks = min(sites, 4 * int(sites ** 0.5) + 2)

    def solve(combine, allowed):
        # best[b][j]: (cost, split) for sites [0, j) in b blocks, block b ending at j
        best = [[(inf, 0)] * (sites + 1) for _ in range(max_blocks + 1)]
        best[0][0] = (0.0, 0)
        for b in range(1, max_blocks + 1):
            for j in range(b, sites + 1):
                for i in range(b - 1, j):
                    prev = best[b - 1][i][0]
                    units = _block_units(b, i, j, sites, n_streams, act, wgrad)
                    if prev == inf or not allowed(units):
                        continue
                    total = combine(prev, units)
                    if total < best[b][j][0]:
                        best[b][j] = (total, i)
        return best

    peak_dp = solve(max, lambda units: True)
    top = min(peak_dp[b][sites][0] for b in range(1, max_blocks + 1))
    bound = top * (1 + 1e-9)
    sum_dp = solve(lambda prev, units: prev + units, lambda units: units <= bound)
    least = min(sum_dp[b][sites][0] for b in range(1, max_blocks + 1))
    b = max(b for b in range(1, max_blocks + 1) if sum_dp[b][sites][0] <= least * (1 + 1e-9))
    sizes, j = [], sites
    while b > 0:
        i = sum_dp[b][j][1]
        sizes.append(j - i)
        j, b = i, b - 1
    return sizes[::-1]


def summary(n_streams: int, width: int, stream_bytes: int = 2, fused: bool = True, fold_stream_grads: bool = True,
            fold_pre_recompute: bool = True, fold_boundary_grads: bool = True) -> str:
    """Per-token traffic of one site under a configuration (``traffic``'s arguments), for ``explain``."""
    t = traffic(fused, fold_stream_grads, fold_pre_recompute, fold_boundary_grads)
    vals = {n: n_streams}
    fwd, bwd, rec = (int(e.subs(vals)) for e in (t.forward, t.backward, t.recompute))
    per_token = (fwd + bwd + rec - 3) * width * stream_bytes
    design = "fused" if fused else ", ".join(["unfused"] + [name for name, on in (
        ("fold_stream_grads", fold_stream_grads), ("fold_pre_recompute", fold_pre_recompute),
        ("fold_boundary_grads", fold_boundary_grads and fold_stream_grads)) if on])
    return (f"bookkeeping traffic per site and token ({design}, n={n_streams}, C={width}, {stream_bytes}-byte "
            f"stream): forward {fwd}C, backward {bwd}C, recompute {rec}C; {per_token / 1024:.1f} KiB over a plain "
            "residual add at a site its recompute schedule recomputes")
