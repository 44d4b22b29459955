"""One validated config object for every option of the ``mhc`` backend.

Options arrive as ``torch.compile(model, backend="mhc", options={...})`` or as keyword arguments of
``mhc_compile.prepare``. Everything is checked here, once, so that a typo or a bad value fails at the
call site with a message that names it instead of surfacing later as a wrong model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

MODES = ("mhc", "hc", "residual")
COLLAPSES = ("mean", "sum")
KERNELS = ("auto", "reference", "triton")
RES_CONVENTIONS = ("paper", "transpose")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class MHCConfig:
    """Options of the mHC rewrite.

    n:               number of parallel residual streams (1..16).
    mode:            "mhc" (Sinkhorn-projected H_res, sigmoid-bounded H_pre / H_post; the paper),
                     "hc" (unconstrained Hyper-Connections: tanh dynamics, no bounds, no Sinkhorn),
                     "residual" (detection runs and is reported, the graph is left as it was: the A/B
                     baseline).
    sinkhorn_iters:  Sinkhorn-Knopp iterations t_max (paper: 20).
    alpha_init:      initial value of the three gate scales alpha_pre / alpha_post / alpha_res.
    eps:             epsilon of the RMS normalisation of the projection, r = rsqrt(mean(x^2) + eps).
    collapse:        how the n streams become one at the tail of a chain: "mean" keeps the function
                     at init (all streams are equal then); "sum" is the paper's convention and scales
                     the tail by n.
    res_convention:  "paper" applies X'[i] = sum_j H_res[i, j] X[j]; "transpose" applies H_res^T
                     (DeepSeek-V4 code).
    kernels:         "auto" (Triton on CUDA, reference elsewhere), "reference", "triton".
    recompute:       "auto" (block sizes minimising the modelled backward peak, large early in a chain and
                     small late: ``cost.block_schedule``), an int (uniform blocks of that many sites), a list
                     of block sizes, first block first (each chain's sites must add up to it: for experiments
                     with the plan), or "none".
    fuse:            fuse each sublayer boundary (post_res of site l-1 with proj / coeffs / pre of site l)
                     into one op with one backward (``passes/fuse.py``). Off by default: ``step``'s forward
                     is the faster (H200, 32768 x 4096: 1.07 against 1.19 ms) but its backward is not
                     (2.62 against 2.20 ms), and the backward recomputes ``step`` whole where the default
                     recomputes post_res and pre. A training step with it (H200, session 18): +15.1 % / +9.5 %
                     time and +23.7 % / +19.3 % activation memory at d = 4096 / 7168, against the default's
                     +12.6 % / +6.9 % and +17.7 % / +16.8 % (benchmarks/results/session18-2026-12-03-h200.md).
                     With the Gluon kernels of ``step`` (sm_90: ``triton_ops`` DotCfg.ws, the default since
                     session 27, and ``triton_fused`` StepBwdCfg.ws, the default since session 37), session
                     24: +14.7 % / +8.7 % against +12.4 % / +7.3 %.
                     True opts in.
    fold_stream_grads: in Inductor's backward graph, let each site's proj/pre backward write the stream
                     gradient once with the residual path's part added in (``passes/fold_stream_grads.py``)
                     instead of three partial gradients and a sum. False keeps the separate backward ops.
    fold_pre_recompute: in Inductor's backward graph, let each site's post_res backward also write the
                     sublayer input that recompute would otherwise rebuild with a separate pre (one read of
                     the n streams less per site; ``passes/fold_pre_recompute.py``). It keeps one C-wide tensor
                     alive longer, +1.4-1.5 points of activation memory, which ``inplace_stream_grads`` made room
                     for. On an H200 (session 16): activation memory +17.7 / +17.1 / +19.1 % at d = 4096 / 2048 /
                     7168; the d = 7168 step's overhead moved by -1.0, -1.1 and +0.7 points in three runs (session
                     11: -1.3), within the rounds' spread. False turns it off.
    fold_post_res_proj: in Inductor's forward graph, compute each site's projection in the kernel that writes
                     its stream (post_res of the site before, ``passes/fold_post_res_proj.py``): n C elements a
                     token less to read. Off by default: the fused kernel is faster alone (H200, 8192 x 7168: 349.7
                     against 266.6 + 138.0 us), but in the power-capped training step it did not win reliably
                     (session 24, six interleaved rounds: +7.4 / +11.0 / +29.9 % against the default's +7.1 /
                     +11.7 / +25.7 % at d = 7168 / 4096 / 2048; session 15: +8.6 against +7.5 % at d = 7168), nor
                     on an H100 (session 47, six rounds: +9.1 against +8.9 % at d = 7168). True opts in.
    fold_recompute_chain: in Inductor's backward graph, rebuild a recompute block's streams with one
                     ``post_res_chain`` from one read of the block's input stream, each X' kept in registers as the
                     next site's X, instead of one post_res a site reading back the stream the one before wrote
                     (``passes/fold_recompute_chain.py``): n C elements a token fewer per chained site, the same
                     streams bit for bit (an H100, session 50). The chain saves 87-443 us a run at 8192 tokens, but
                     the d = 7168 training step was not faster with it (+7.6 against +7.1 %, +7.3 against +7.3 %;
                     +8.6 against +8.5 % in session 49). Off by default; True opts in.
    inplace_stream_grads: in Inductor's backward graph, let each site's post_res and proj/pre backward write
                     the stream gradient over the one it reads where nothing else reads that buffer
                     (``passes/inplace_stream_grads.py``): the backward then holds one n-stream gradient at a
                     time instead of two. Same arithmetic; False keeps a new buffer per op.
    broadcast_collapse_grad: in Inductor's backward graph, keep the stream gradient a mean collapse hands back
                     as a broadcast view of one C-wide row instead of n written copies
                     (``passes/broadcast_collapse_grad.py``): the last site's post_res backward reads one row a
                     token. Same values; False keeps the n-wide buffer.
    collapse_head_grad: in Inductor's backward graph, write each chain head's stream gradient (its embedding's,
                     broadcast over the n streams) summed over the streams by the head's proj backward, instead of
                     n rows that the expand's backward reads back to sum, and its residual-path part summed by the
                     op that writes it (the head's post_res backward; under ``fuse`` the next step's backward)
                     (``passes/collapse_head_grad.py``). The same sum, rounded once; False keeps the n-wide rows.
    collapse_tail:   in Inductor's forward graph, collapse each chain's tail in the kernel that mixes its last
                     site (``post_res_collapse``) instead of writing the n streams for the collapse to read back
                     (``passes/collapse_tail.py``). The same mean (or sum), rounded once; False keeps both kernels.
    fold_boundary_grads: in Inductor's backward graph, run each boundary's proj/pre backward (site l+1) and the
                     post_res backward it feeds (site l) as one op, ``boundary_backward``
                     (``passes/fold_boundary_grads.py``): on an sm_90 GPU one pass, 2n C elements a token and
                     boundary less to move (the stream gradient between the two is neither written nor read back),
                     the gradient kept in fp32 between them. Elsewhere the op runs the two kernels. On by default
                     since session 41 (H100: the op 18-25 % faster than the two kernels at every measured shape;
                     the d = 7168 step +7.7 / +8.4 % against +8.2 / +8.6 % without it, activation memory +0.6-1.0
                     points, +17.5 / +18.7 % at d = 7168 / 4096). False keeps the two ops.
    ddp_buckets:     under DistributedDataParallel, split the rewritten graph at DDP's gradient buckets and
                     compile each piece apart, so that each bucket's all-reduce overlaps the backward of the pieces
                     before it (``passes/schedule.py``). False compiles one graph: DDP then reduces every gradient
                     after the backward.
    strict:          turn every conversion warning (graph break inside a chain, structure that
                     could not be converted, optimizer missing mHC parameters) into an error.
    inner_backend:   what compiles the rewritten graph: "inductor" (default), "aot_eager", "eager".
    verbose:         print a one-line summary per compiled graph.
    check_finite:    make the mHC ops raise a FloatingPointError naming the site when the streams entering
                     a site or its coefficients hold NaN/Inf (a debugging aid: one reduction per site and
                     step; nothing is added to the graph when off).
    dump_dir:        write graph_<i>_before.py / _after.py / _mhc.svg for every compiled graph there.
    inductor_options: Inductor config patches for the rest of the graph.
    compile_mode:    Inductor's mode ("default", "reduce-overhead", "max-autotune", ...) for when options are
                     given too: torch.compile refuses ``mode=`` together with ``options=``. ``mode=`` alone
                     works as usual; giving both (different) raises.
    """

    n: int = 4
    mode: str = "mhc"
    sinkhorn_iters: int = 20
    alpha_init: float = 0.01
    eps: float = 1e-6
    collapse: str = "mean"
    res_convention: str = "paper"
    kernels: str = "auto"
    recompute: Any = "auto"
    fuse: bool = False
    fold_stream_grads: bool = True
    fold_pre_recompute: bool = True
    fold_post_res_proj: bool = False
    fold_recompute_chain: bool = False
    inplace_stream_grads: bool = True
    broadcast_collapse_grad: bool = True
    collapse_head_grad: bool = True
    collapse_tail: bool = True
    fold_boundary_grads: bool = True
    ddp_buckets: bool = True
    strict: bool = False
    inner_backend: str = "inductor"
    verbose: bool = False
    check_finite: bool = False
    dump_dir: str | None = None
    inductor_options: Mapping[str, Any] = field(default_factory=dict)
    compile_mode: str | None = None

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1, 16)
        _check_choice("mode", self.mode, MODES)
        _check_int("sinkhorn_iters", self.sinkhorn_iters, 1, 1000)
        _check_float("alpha_init", self.alpha_init, lo=0.0)
        _check_float("eps", self.eps, lo=0.0, lo_open=True)
        _check_choice("collapse", self.collapse, COLLAPSES)
        _check_choice("res_convention", self.res_convention, RES_CONVENTIONS)
        _check_choice("kernels", self.kernels, KERNELS)
        _check_choice("inner_backend", self.inner_backend, INNER_BACKENDS)
        if not isinstance(self.strict, bool):
            raise ValueError(f"mhc option 'strict' must be a bool, got {self.strict!r}")
        for name in ("verbose", "check_finite", "fuse", "fold_stream_grads", "fold_pre_recompute",
                     "fold_post_res_proj", "fold_recompute_chain", "inplace_stream_grads", "broadcast_collapse_grad",
                     "collapse_head_grad",
                     "collapse_tail", "fold_boundary_grads", "ddp_buckets"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"mhc option {name!r} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.recompute, (list, tuple)):
            if not self.recompute:
                raise ValueError("mhc option 'recompute' as block sizes must name at least one block")
            for size in self.recompute:
                _check_int("recompute", size, 1, 1 << 20, hint="block size")
            object.__setattr__(self, "recompute", tuple(self.recompute))  # a frozen copy of the list
        elif self.recompute not in ("auto", "none"):
            _check_int("recompute", self.recompute, 1, 1 << 20, hint='or "auto" / "none" / a list of block sizes')
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise ValueError(f"mhc option 'dump_dir' must be a path, got {self.dump_dir!r}")
        if self.compile_mode is not None and not isinstance(self.compile_mode, str):
            raise ValueError(f"mhc option 'compile_mode' must be a torch.compile mode name, got {self.compile_mode!r}")
        if not isinstance(self.inductor_options, Mapping):
            raise ValueError("mhc option 'inductor_options' must be a dict of Inductor options")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "MHCConfig" | None = None, **kwargs: Any) -> "MHCConfig":
        """Build a config from a dict (``torch.compile(..., options=)``) and/or keywords.

        Unknown keys raise a ValueError naming them and listing the valid ones.
        """
        if isinstance(options, MHCConfig):
            return dataclasses.replace(options, **kwargs) if kwargs else options
        merged: dict[str, Any] = dict(options or {})
        merged.update(kwargs)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(
                f"unknown mhc option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**merged)

    def plan_key(self) -> tuple:
        """The options that change which parameters exist and how they are shaped or initialised."""
        return (self.n, self.mode)


def _check_int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"mhc option {name!r} must be an integer {hint}, got {value!r}".replace("  ", " "))
    if not lo <= value <= hi:
        raise ValueError(f"mhc option {name!r} must be in [{lo}, {hi}], got {value}")


def _check_float(name: str, value: Any, lo: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"mhc option {name!r} must be a number, got {value!r}")
    if value < lo or (lo_open and value == lo) or value != value:
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ValueError(f"mhc option {name!r} must be {bound}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"mhc option {name!r} must be one of {list(choices)}, got {value!r}")
