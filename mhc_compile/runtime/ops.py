"""The mHC custom ops: the boundary between the graph rewrite and the kernels.

Each op is a ``torch.library.custom_op`` with a fake (meta) implementation, so graphs stay traceable
and shape-generic, and an autograd formula whose backward is itself a custom op, so AOTAutograd puts
an opaque, kernel-backed node into the backward graph too. The ``impl`` argument picks the kernels
("reference" = plain PyTorch from ``kernels/reference.py``, "triton" = ``kernels/triton_ops.py``); the
rewrite pass chooses it once per graph from the config and the device, and it is visible in the graph.

Streams may have any leading dims ([B, S, n, C], [T, n, C] ...). The Triton wrappers take them as they are
(the kernels need only the token count and contiguous memory; a view costs host time on every call), and the
reference kernels through ``_ReferenceOps``, which flattens them to tokens and restores them. The fused boundary
ops (enter / step) flatten in this module.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import Tensor

from mhc_compile.kernels import reference as ref

IMPLS = ("reference", "triton")
OP_NAMES = ("proj", "proj_backward", "coeffs", "coeffs_backward", "pre", "pre_backward", "post_res",
            "post_res_backward", "enter", "enter_backward", "step", "step_backward", "pre_backward_dh",
            "proj_pre_backward", "post_res_backward_pre", "post_res_proj", "post_res_backward_into",
            "post_res_backward_pre_into", "proj_pre_backward_into", "step_backward_into",
            "proj_pre_backward_collapsed", "enter_backward_collapsed", "post_res_collapse", "boundary_backward",
            "boundary_backward_into", "post_res_chain")


def all_ops() -> list:
    """Every mHC custom op overload (for Inductor's fallback table)."""
    return [getattr(torch.ops.mhc_compile, name).default for name in OP_NAMES]


def direct_ops() -> dict:
    """Each mHC custom op overload -> its direct twin (``torch.ops.mhc_compile_direct``), which Inductor's
    generated code calls instead (see the end of this module)."""
    return {getattr(torch.ops.mhc_compile, name).default: getattr(torch.ops.mhc_compile_direct, name).default
            for name in OP_NAMES}


_PLAIN: dict = {}  # op name -> the Python function behind the custom op


def _custom_op(name: str, mutates_args: tuple[str, ...] = ()):
    """``torch.library.custom_op("mhc_compile::<name>")``, keeping the plain function for the direct twin."""

    def wrap(fn):
        _PLAIN[name] = fn
        return torch.library.custom_op(f"mhc_compile::{name}", mutates_args=mutates_args)(fn)

    return wrap


# Diagnostics: while a capture is active, coeffs and pre record what they computed, per site.
_CAPTURES: list[list[dict]] = []


@contextlib.contextmanager
def capture_coefficients():
    """Record, for every executed site, its H_pre / H_post / H_res and input streams X.

    Yields a list that fills with dicts {"site", "h_pre", "h_post", "h_res"} (from ``coeffs``) and
    {"site", "x"} (from ``pre``), in execution order, detached. Works for eager, aot_eager and Inductor
    graphs alike, since the compiled graph calls the op's Python implementation.
    """
    records: list[dict] = []
    _CAPTURES.append(records)
    try:
        yield records
    finally:
        _CAPTURES.remove(records)


def _record(**entry) -> None:
    for records in _CAPTURES:
        records.append({k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in entry.items()})


def _check_finite(site: str, what: str, *tensors: Tensor) -> None:
    """``check_finite=True``: raise, naming the site, if a tensor holds NaN/Inf (one reduction each)."""
    for t in tensors:
        if not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            raise FloatingPointError(
                f"mhc: non-finite values at residual site {site!r}: {what} hold {nan} NaN and {inf} Inf "
                f"of {t.numel()} elements (shape {tuple(t.shape)}, dtype {t.dtype}) (check_finite=True)"
            )


_KERNEL_MODULES: dict = {}  # (impl, fused) -> module; Triton's imported on first use (every launch asks)


def _kernels(impl: str, fused: bool = False):
    """The kernel module for ``impl``; ``fused`` picks the boundary ops (enter / step) of the Triton path."""
    module = _KERNEL_MODULES.get((impl, fused))
    if module is not None:
        return module
    if impl == "reference":
        module = ref if fused else _REFERENCE_OPS
    elif impl == "triton":
        module = importlib.import_module("mhc_compile.kernels.triton_fused" if fused
                                         else "mhc_compile.kernels.triton_ops")
    else:
        raise ValueError(f"mhc op: unknown kernel implementation {impl!r}; expected one of {IMPLS}")
    _KERNEL_MODULES[(impl, fused)] = module
    return module


def _dense_like(t: Tensor) -> Tensor:
    """A fake output shaped like ``t`` with contiguous strides, as every real implementation returns
    (kernel outputs reshaped from [T, ...]). ``empty_like`` would copy the strides of an input that is a
    permuted view (a conv branch moved channel-last), and Inductor asserts the real strides against
    these: seen as an assert_size_stride failure on torchvision's ResNet-18 on the H100, 2026-11-23."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


class _ReferenceOps:
    """kernels/reference.py's unfused ops with the Triton wrappers' convention: inputs with any leading (token)
    dims, outputs with the same ones. The reference math is written on [T, ...]: each token tensor is
    flattened to it and each token-shaped output restored.

    _SPECS: op -> (the trailing dims of each positional tensor argument after its token dims, None for an
    argument that is not per token; whether each output is per token). The first argument's leading dims are
    the op's."""

    _SPECS = {
        "proj": ((2, None), (True, True)),
        "proj_backward": ((2, None, 1, 0), (True, False)),
        "coeffs": ((1, 0), (True, True, True)),
        "coeffs_backward": ((1, 0, None, None, 1, 1, 2), (True, True, False, False)),
        "pre": ((2, 1), (True,)),
        "pre_backward": ((2, 1, 1), (True, True)),
        "pre_backward_dh": ((2, 1, 1), (True,)),
        "proj_pre_backward": ((2, None, 1, 0, 1, 1, 2), (True, False)),
        "proj_pre_backward_collapsed": ((2, None, 1, 0, 1, 1, 2), (True, False)),
        "post_res": ((2, 2, 1, 1), (True,)),
        "post_res_backward": ((2, 2, 1, 1, 2), (True,) * 4),
        "post_res_backward_pre": ((2, 2, 1, 1, 2, 1), (True,) * 5),
        "post_res_proj": ((2, 2, 1, 1, None), (True,) * 3),
        "post_res_collapse": ((2, 2, 1, 1), (True,)),
        "boundary_backward": ((2, None, 1, 0, 1, 1, 2, 2, 2, 1, 1, 1), (True,) * 5 + (False,)),
    }

    def post_res_chain(self, x, h_res, h_post, y):
        """post_res applied len(y) times (its tensor lists are not in _SPECS' terms)."""
        outs = []
        for hr, hp, yk in zip(h_res, h_post, y, strict=True):
            x = self.post_res(x, hr, hp, yk)
            outs.append(x)
        return outs

    def __getattr__(self, name: str):
        if name not in self._SPECS:
            raise AttributeError(f"mhc reference ops: no unfused op {name!r}")
        trailing, per_token = self._SPECS[name]
        fn = getattr(ref, name)

        def run(*args, **options):
            lead = args[0].shape[: args[0].dim() - trailing[0]]
            flat = [a if k is None or a is None else _tokens(a, k) for a, k in zip(args, trailing)]
            out = fn(*flat, *args[len(trailing):], **options)
            outs = out if isinstance(out, tuple) else (out,)
            outs = tuple(o.reshape(lead + o.shape[1:]) if tok else o for o, tok in zip(outs, per_token))
            return outs if isinstance(out, tuple) else outs[0]

        return run


_REFERENCE_OPS = _ReferenceOps()


def _tokens(x: Tensor, trailing: int) -> Tensor:
    """View leading dims as one token dim, keeping ``trailing`` dims (the reference ops, the fused boundary ops,
    export). flatten, and nothing for a tensor already [T, ...], cost less host time than building a reshape's
    shape; the unfused Triton path makes no view at all."""
    lead = x.dim() - trailing
    if lead == 1:
        return x
    return x.flatten(0, lead - 1) if lead > 1 else x.reshape((-1,) + tuple(x.shape))


# ---------------------------------------------------------------------------------------------
# proj
# ---------------------------------------------------------------------------------------------
@_custom_op("proj")
def proj(x: Tensor, phi: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    return _kernels(impl).proj(x, phi)


@proj.register_fake
def _(x, phi, impl):
    lead = x.shape[:-2]
    acc = ref.acc_dtype(x.dtype)
    return x.new_empty(lead + (phi.shape[1],), dtype=acc), x.new_empty(lead, dtype=acc)


@_custom_op("proj_backward")
def proj_backward(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    return _kernels(impl).proj_backward(x, phi, dp, dsq)


@proj_backward.register_fake
def _(x, phi, dp, dsq, impl):
    return _dense_like(x), _dense_like(phi)


def _proj_setup(ctx, inputs, output):
    x, phi, impl = inputs
    ctx.save_for_backward(x, phi)
    ctx.impl = impl


def _proj_bwd(ctx, dp, dsq):
    x, phi = ctx.saved_tensors
    dx, dphi = proj_backward(x, phi, dp, dsq, ctx.impl)
    return dx, dphi, None


proj.register_autograd(_proj_bwd, setup_context=_proj_setup)


# ---------------------------------------------------------------------------------------------
# coeffs
# ---------------------------------------------------------------------------------------------
@_custom_op("coeffs")
def coeffs(
    p: Tensor, sq: Tensor, bias: Tensor, alpha: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str, impl: str, site: str = "", check_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    if check_finite:
        _check_finite(site, "the projections phi x / |x|^2 of the n streams entering the site (NaN/Inf in the "
                         "streams or in phi)", p, sq)
    h_pre, h_post, h_res = _kernels(impl).coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode)
    if check_finite:
        _check_finite(site, "the coefficients H_pre / H_post / H_res (NaN/Inf in bias or alpha, or "
                      "overflow)", h_pre, h_post, h_res)
    if _CAPTURES:
        _record(site=site, h_pre=h_pre, h_post=h_post, h_res=h_res)
    return h_pre, h_post, h_res


@coeffs.register_fake
def _(p, sq, bias, alpha, n, nc, eps, iters, mode, impl, site="", check_finite=False):
    lead = p.shape[:-1]
    acc = ref.acc_dtype(p.dtype)
    return p.new_empty(lead + (n,), dtype=acc), p.new_empty(lead + (n,), dtype=acc), p.new_empty(lead + (n, n), dtype=acc)


@_custom_op("coeffs_backward")
def coeffs_backward(
    p: Tensor, sq: Tensor, bias: Tensor, alpha: Tensor,
    dh_pre: Tensor, dh_post: Tensor, dh_res: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _kernels(impl).coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode)


@coeffs_backward.register_fake
def _(p, sq, bias, alpha, dh_pre, dh_post, dh_res, n, nc, eps, iters, mode, impl):
    return _dense_like(p), _dense_like(sq), _dense_like(bias), _dense_like(alpha)


def _coeffs_setup(ctx, inputs, output):
    p, sq, bias, alpha, n, nc, eps, iters, mode, impl, *_labels = inputs
    ctx.save_for_backward(p, sq, bias, alpha)
    ctx.static = (n, nc, eps, iters, mode, impl)


def _coeffs_bwd(ctx, dh_pre, dh_post, dh_res):
    p, sq, bias, alpha = ctx.saved_tensors
    grads = coeffs_backward(p, sq, bias, alpha, dh_pre, dh_post, dh_res, *ctx.static)
    return (*grads, None, None, None, None, None, None, None, None)


coeffs.register_autograd(_coeffs_bwd, setup_context=_coeffs_setup)


# ---------------------------------------------------------------------------------------------
# pre
# ---------------------------------------------------------------------------------------------
@_custom_op("pre")
def pre(x: Tensor, h_pre: Tensor, impl: str, site: str = "", check_finite: bool = False) -> Tensor:
    if check_finite:
        _check_finite(site, "the n streams entering the site", x)
    out = _kernels(impl).pre(x, h_pre)
    if _CAPTURES:
        _record(site=site, x=x)
    return out


@pre.register_fake
def _(x, h_pre, impl, site="", check_finite=False):
    return x.new_empty(x.shape[:-2] + x.shape[-1:])


@_custom_op("pre_backward")
def pre_backward(x: Tensor, h_pre: Tensor, dout: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    return _kernels(impl).pre_backward(x, h_pre, dout)


@pre_backward.register_fake
def _(x, h_pre, dout, impl):
    return _dense_like(x), _dense_like(h_pre)


def _pre_setup(ctx, inputs, output):
    x, h_pre, impl, *_labels = inputs
    ctx.save_for_backward(x, h_pre)
    ctx.impl = impl


def _pre_bwd(ctx, dout):
    x, h_pre = ctx.saved_tensors
    dx, dh = pre_backward(x, h_pre, dout, ctx.impl)
    return dx, dh, None, None, None


pre.register_autograd(_pre_bwd, setup_context=_pre_setup)


# ---------------------------------------------------------------------------------------------
# Backward-only ops, put into backward graphs by passes/fold_stream_grads.py: a site's pre_backward
# and proj_backward become pre_backward_dh (the [.., n] reduction, needed before coeffs_backward) and
# proj_pre_backward, which writes the stream gradient once with the residual path's part added in.
# ---------------------------------------------------------------------------------------------
@_custom_op("pre_backward_dh")
def pre_backward_dh(x: Tensor, h_pre: Tensor, dout: Tensor, impl: str) -> Tensor:
    return _kernels(impl).pre_backward_dh(x, h_pre, dout)


@pre_backward_dh.register_fake
def _(x, h_pre, dout, impl):
    return _dense_like(h_pre)


@_custom_op("proj_pre_backward")
def proj_pre_backward(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor,
                      acc: Tensor | None, impl: str) -> tuple[Tensor, Tensor]:
    return _kernels(impl).proj_pre_backward(x, phi, dp, dsq, h_pre, dout, acc)


@proj_pre_backward.register_fake
def _(x, phi, dp, dsq, h_pre, dout, acc, impl):
    return _dense_like(x), _dense_like(phi)


@_custom_op("proj_pre_backward_collapsed")
def proj_pre_backward_collapsed(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor,
                                acc: Tensor | None, impl: str) -> tuple[Tensor, Tensor]:
    """proj_pre_backward with its dx summed over the n streams ([.., 1, C]): a chain head's gradient, put into
    backward graphs by passes/collapse_head_grad.py."""
    return _kernels(impl).proj_pre_backward_collapsed(x, phi, dp, dsq, h_pre, dout, acc)


@proj_pre_backward_collapsed.register_fake
def _(x, phi, dp, dsq, h_pre, dout, acc, impl):
    return x.new_empty(_summed_shape(x)), _dense_like(phi)


# ---------------------------------------------------------------------------------------------
# Backward ops that write the stream gradient over the stream-sized gradient they read, put into backward graphs by
# passes/inplace_stream_grads.py where nothing else reads that buffer: each site's backward then holds one
# stream-sized gradient instead of two at a time. The reference kernels compute it apart and copy it in.
# ---------------------------------------------------------------------------------------------
def _into(impl: str, name: str, dst: Tensor, *args: Tensor) -> tuple:
    """Op ``name``'s outputs but the first, its stream gradient, which is written into ``dst``."""
    if impl == "triton":
        return getattr(_kernels(impl), name)(*args, out=dst)[1:]
    grad, *rest = getattr(_kernels(impl), name)(*args)
    dst.copy_(grad)
    return tuple(rest)


@_custom_op("proj_pre_backward_into", mutates_args=("acc",))
def proj_pre_backward_into(x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor,
                           acc: Tensor, impl: str) -> Tensor:
    """proj_pre_backward's dphi; its dx is written over ``acc``."""
    return _into(impl, "proj_pre_backward", acc, x, phi, dp, dsq, h_pre, dout, acc)[0]


@proj_pre_backward_into.register_fake
def _(x, phi, dp, dsq, h_pre, dout, acc, impl):
    return _dense_like(phi)


# ---------------------------------------------------------------------------------------------
# post_res
# ---------------------------------------------------------------------------------------------
@_custom_op("post_res")
def post_res(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, impl: str) -> Tensor:
    return _kernels(impl).post_res(x, h_res, h_post, y)


@post_res.register_fake
def _(x, h_res, h_post, y, impl):
    return _dense_like(x)


@_custom_op("post_res_proj")
def post_res_proj(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, phi: Tensor,
                  impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(post_res(x, ...), *proj(that, phi)) from one pass over the streams. Only Inductor's forward graphs hold
    it (``passes/fold_post_res_proj.py`` puts it there after the partition), so it has no autograd formula: the
    backward graph was built from post_res and proj apart."""
    return _kernels(impl).post_res_proj(x, h_res, h_post, y, phi)


@post_res_proj.register_fake
def _(x, h_res, h_post, y, phi, impl):
    lead = x.shape[:-2]
    acc = ref.acc_dtype(x.dtype)
    return _dense_like(x), x.new_empty(lead + (phi.shape[1],), dtype=acc), x.new_empty(lead, dtype=acc)


@_custom_op("post_res_chain")
def post_res_chain(x: Tensor, h_res: list[Tensor], h_post: list[Tensor], y: list[Tensor], impl: str) -> list[Tensor]:
    """[X_1, ..., X_k]: post_res applied k times, each output the next step's stream, from one read of x. Only
    Inductor's backward graphs hold it (``passes/fold_recompute_chain.py`` puts a recompute block's post_res calls
    there together after the partition), so it has no autograd formula."""
    if not (len(h_res) == len(h_post) == len(y)) or not y:
        raise ValueError(f"mhc post_res_chain: {len(h_res)} h_res, {len(h_post)} h_post and {len(y)} y: one of each "
                         "a step, at least one step")
    return list(_kernels(impl).post_res_chain(x, list(h_res), list(h_post), list(y)))


@post_res_chain.register_fake
def _(x, h_res, h_post, y, impl):
    return [_dense_like(x) for _ in y]


@_custom_op("post_res_collapse")
def post_res_collapse(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, mean: bool, impl: str) -> Tensor:
    """post_res(x, ...)'s mean (or sum) over its n streams, the streams never written. Only Inductor's forward
    graphs hold it (``passes/collapse_tail.py`` puts it there after the partition, at a chain's tail), so it has no
    autograd formula: the backward graph was built from post_res and the collapse apart."""
    return _kernels(impl).post_res_collapse(x, h_res, h_post, y, mean)


@post_res_collapse.register_fake
def _(x, h_res, h_post, y, mean, impl):
    return x.new_empty(x.shape[:-2] + x.shape[-1:])


@_custom_op("post_res_backward")
def post_res_backward(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, impl: str, collapse_dx: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``collapse_dx``: dx summed over the n streams, [.., 1, C]: a chain head's stream gradient, set by
    passes/collapse_head_grad.py in backward graphs."""
    if collapse_dx:
        return _kernels(impl).post_res_backward(x, h_res, h_post, y, dout, collapse_dx=True)
    return _kernels(impl).post_res_backward(x, h_res, h_post, y, dout)


def _summed_shape(x: Tensor) -> torch.Size:
    """A stream's shape summed over its n streams: one row a token, [.., 1, C]."""
    return x.shape[:-2] + (1, x.shape[-1])


def _dx_like(x: Tensor, collapse_dx: bool) -> Tensor:
    """A stream gradient's fake: x's shape, or one row a token where it is summed over the streams."""
    return x.new_empty(_summed_shape(x)) if collapse_dx else _dense_like(x)


@post_res_backward.register_fake
def _(x, h_res, h_post, y, dout, impl, collapse_dx=False):
    return _dx_like(x, collapse_dx), _dense_like(h_res), _dense_like(h_post), _dense_like(y)


def _post_res_setup(ctx, inputs, output):
    x, h_res, h_post, y, impl = inputs
    ctx.save_for_backward(x, h_res, h_post, y)
    ctx.impl = impl


def _post_res_bwd(ctx, dout):
    x, h_res, h_post, y = ctx.saved_tensors
    dx, dh_res, dh_post, dy = post_res_backward(x, h_res, h_post, y, dout, ctx.impl)
    return dx, dh_res, dh_post, dy, None


post_res.register_autograd(_post_res_bwd, setup_context=_post_res_setup)


# Backward-only, put into backward graphs by passes/fold_pre_recompute.py: a site's post_res_backward and
# its recomputed pre (both read the same stream) as one op, one pass over the stream.
@_custom_op("post_res_backward_pre")
def post_res_backward_pre(
    x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, h_pre: Tensor, impl: str,
    collapse_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if collapse_dx:  # as post_res_backward's
        return _kernels(impl).post_res_backward_pre(x, h_res, h_post, y, dout, h_pre, collapse_dx=True)
    return _kernels(impl).post_res_backward_pre(x, h_res, h_post, y, dout, h_pre)


@post_res_backward_pre.register_fake
def _(x, h_res, h_post, y, dout, h_pre, impl, collapse_dx=False):
    return (_dx_like(x, collapse_dx), _dense_like(h_res), _dense_like(h_post), _dense_like(y),
            x.new_empty(x.shape[:-2] + x.shape[-1:]))


@_custom_op("post_res_backward_into", mutates_args=("dout",))
def post_res_backward_into(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor,
                           impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """post_res_backward's (dh_res, dh_post, dy); its dx is written over ``dout``."""
    return _into(impl, "post_res_backward", dout, x, h_res, h_post, y, dout)


@post_res_backward_into.register_fake
def _(x, h_res, h_post, y, dout, impl):
    return _dense_like(h_res), _dense_like(h_post), _dense_like(y)


@_custom_op("post_res_backward_pre_into", mutates_args=("dout",))
def post_res_backward_pre_into(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, dout: Tensor, h_pre: Tensor,
                               impl: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """post_res_backward_pre's (dh_res, dh_post, dy, x_in); its dx is written over ``dout``."""
    return _into(impl, "post_res_backward_pre", dout, x, h_res, h_post, y, dout, h_pre)


@post_res_backward_pre_into.register_fake
def _(x, h_res, h_post, y, dout, h_pre, impl):
    return _dense_like(h_res), _dense_like(h_post), _dense_like(y), x.new_empty(x.shape[:-2] + x.shape[-1:])


# Backward-only, put into backward graphs by passes/fold_boundary_grads.py: a site's proj_pre_backward and the
# post_res backward of the site before it, whose dout is the former's dx, as one op (one pass on sm_90).
@_custom_op("boundary_backward")
def boundary_backward(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor | None, x_prev: Tensor,
    h_res: Tensor, h_post: Tensor, y: Tensor, h_pre_prev: Tensor | None, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx_prev, dh_res, dh_post, dy, x_in, dphi): x_in = pre(x_prev, h_pre_prev) (post_res_backward_pre's), a
    [.., 0] tensor without h_pre_prev."""
    return _kernels(impl).boundary_backward(x, phi, dp, dsq, h_pre, dout, acc, x_prev, h_res, h_post, y, h_pre_prev)


def _boundary_fakes(x_prev, h_res, h_post, y, h_pre_prev) -> tuple[Tensor, ...]:
    """(dh_res, dh_post, dy, x_in) of a boundary_backward."""
    x_in = x_prev.new_empty(x_prev.shape[:-2] + ((x_prev.shape[-1],) if h_pre_prev is not None else (0,)))
    return _dense_like(h_res), _dense_like(h_post), _dense_like(y), x_in


@boundary_backward.register_fake
def _(x, phi, dp, dsq, h_pre, dout, acc, x_prev, h_res, h_post, y, h_pre_prev, impl):
    return (_dense_like(x_prev),) + _boundary_fakes(x_prev, h_res, h_post, y, h_pre_prev) + (_dense_like(phi),)


@_custom_op("boundary_backward_into", mutates_args=("acc",))
def boundary_backward_into(
    x: Tensor, phi: Tensor, dp: Tensor, dsq: Tensor, h_pre: Tensor, dout: Tensor, acc: Tensor, x_prev: Tensor,
    h_res: Tensor, h_post: Tensor, y: Tensor, h_pre_prev: Tensor | None, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """boundary_backward's (dh_res, dh_post, dy, x_in, dphi); its dx_prev is written over ``acc``."""
    return _into(impl, "boundary_backward", acc, x, phi, dp, dsq, h_pre, dout, acc, x_prev, h_res, h_post, y,
                 h_pre_prev)


@boundary_backward_into.register_fake
def _(x, phi, dp, dsq, h_pre, dout, acc, x_prev, h_res, h_post, y, h_pre_prev, impl):
    return _boundary_fakes(x_prev, h_res, h_post, y, h_pre_prev) + (_dense_like(phi),)


# ---------------------------------------------------------------------------------------------
# Fused boundary ops (the default): enter = proj -> coeffs -> pre at a chain's first site,
# step = post_res of site l-1 -> proj -> coeffs -> pre of site l. See kernels/reference.py.
#
# h_pre, p and sq are outputs only so that the backward can have them (a custom op's setup_context
# saves inputs and outputs, nothing in between); nothing in the graph reads them and they get no
# gradient.
# ---------------------------------------------------------------------------------------------
def _coeff_shapes(lead, n: int, m: int, like: Tensor, acc: torch.dtype) -> tuple[Tensor, ...]:
    """Empty (h_pre, h_post, h_res, p, sq) with leading dims ``lead``."""
    return (like.new_empty(lead + (n,), dtype=acc), like.new_empty(lead + (n,), dtype=acc),
            like.new_empty(lead + (n, n), dtype=acc), like.new_empty(lead + (m,), dtype=acc),
            like.new_empty(lead, dtype=acc))


def _restore_coeffs(lead, n: int, h_pre, h_post, h_res, p, sq) -> tuple[Tensor, ...]:
    return (h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,)), h_res.reshape(lead + (n, n)),
            p.reshape(lead + p.shape[-1:]), sq.reshape(lead))


def _after_coeffs(site: str, check_finite: bool, x: Tensor, h_pre: Tensor, h_post: Tensor, h_res: Tensor) -> None:
    if check_finite:
        _check_finite(site, "the coefficients H_pre / H_post / H_res (NaN/Inf in phi, bias or alpha, or "
                      "overflow)", h_pre, h_post, h_res)
    if _CAPTURES:
        _record(site=site, h_pre=h_pre, h_post=h_post, h_res=h_res)
        _record(site=site, x=x)


@_custom_op("enter")
def enter(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str, impl: str, site: str = "", check_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if check_finite:
        _check_finite(site, "the n streams entering the site", x)
    lead = x.shape[:-2]
    # x as it is: a chain's head stream is a stride-0 expand, which the kernels read as its one row a token
    x_in, *rest = _kernels(impl, fused=True).enter(_tokens(x, 2), phi, bias, alpha, n, nc, eps, iters, mode)
    h_pre, h_post, h_res, p, sq = _restore_coeffs(lead, n, *rest)
    _after_coeffs(site, check_finite, x, h_pre, h_post, h_res)
    return (x_in.reshape(x.shape[:-2] + x.shape[-1:]), h_pre, h_post, h_res, p, sq)


@enter.register_fake
def _(x, phi, bias, alpha, n, nc, eps, iters, mode, impl, site="", check_finite=False):
    lead = x.shape[:-2]
    acc = ref.acc_dtype(x.dtype)
    return (x.new_empty(lead + x.shape[-1:]), *_coeff_shapes(lead, n, phi.shape[1], x, acc))


@_custom_op("enter_backward")
def enter_backward(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, p: Tensor, sq: Tensor,
    dx_in: Tensor, dh_post: Tensor, dh_res: Tensor, n: int, nc: int, eps: float, iters: int, mode: str, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dphi, dbias, dalpha = _enter_grads("enter_backward", x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post,
                                           dh_res, n, nc, eps, iters, mode, impl)
    return dx.reshape(x.shape), dphi, dbias, dalpha


def _enter_grads(name, x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode, impl,
                 *extra):
    """The fused module's ``name`` (enter_backward or its collapsed twin) on the arguments flattened to tokens."""
    return getattr(_kernels(impl, fused=True), name)(
        _tokens(x, 2), phi, bias, alpha, _tokens(h_pre, 1).contiguous(), _tokens(p, 1).contiguous(),
        sq.reshape(-1).contiguous(), _tokens(dx_in, 1).contiguous(), _tokens(dh_post, 1).contiguous(),
        _tokens(dh_res, 2).contiguous(), n, nc, eps, iters, mode, *extra,
    )


@enter_backward.register_fake
def _(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode, impl):
    return _dense_like(x), _dense_like(phi), _dense_like(bias), _dense_like(alpha)


@_custom_op("enter_backward_collapsed")
def enter_backward_collapsed(
    x: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor, h_pre: Tensor, p: Tensor, sq: Tensor,
    dx_in: Tensor, dh_post: Tensor, dh_res: Tensor, n: int, nc: int, eps: float, iters: int, mode: str, impl: str,
    acc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """enter_backward with dx (+ acc, the stream's other gradient: the next step's dx_prev) summed over the n streams
    ([.., 1, C]): a chain head's embedding gradient under fuse=True, put into backward graphs by
    passes/collapse_head_grad.py."""
    ds, dphi, dbias, dalpha = _enter_grads("enter_backward_collapsed", x, phi, bias, alpha, h_pre, p, sq, dx_in,
                                           dh_post, dh_res, n, nc, eps, iters, mode, impl,
                                           None if acc is None else _tokens(acc, 2))
    return ds.reshape(_summed_shape(x)), dphi, dbias, dalpha


@enter_backward_collapsed.register_fake
def _(x, phi, bias, alpha, h_pre, p, sq, dx_in, dh_post, dh_res, n, nc, eps, iters, mode, impl, acc=None):
    return (x.new_empty(_summed_shape(x)), _dense_like(phi), _dense_like(bias),
            _dense_like(alpha))


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    """An output nobody differentiated through arrives as None: its gradient is zero."""
    return torch.zeros_like(like) if g is None else g


def _enter_setup(ctx, inputs, output):
    x, phi, bias, alpha, n, nc, eps, iters, mode, impl, *_labels = inputs
    _x_in, h_pre, h_post, h_res, p, sq = output
    ctx.save_for_backward(x, phi, bias, alpha, h_pre, p, sq, h_post, h_res)
    ctx.static = (n, nc, eps, iters, mode, impl)
    ctx.mark_non_differentiable(h_pre, p, sq)


def _enter_bwd(ctx, dx_in, _dh_pre, dh_post, dh_res, _dp, _dsq):
    x, phi, bias, alpha, h_pre, p, sq, h_post, h_res = ctx.saved_tensors
    grads = enter_backward(
        x, phi, bias, alpha, h_pre, p, sq, _zeros_if_none(dx_in, x[..., 0, :]), _zeros_if_none(dh_post, h_post),
        _zeros_if_none(dh_res, h_res), *ctx.static,
    )
    return (*grads, None, None, None, None, None, None, None, None)


enter.register_autograd(_enter_bwd, setup_context=_enter_setup)


@_custom_op("step")
def step(
    x_prev: Tensor, h_res_prev: Tensor, h_post_prev: Tensor, y_prev: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str, impl: str, site: str = "", check_finite: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    lead = x_prev.shape[:-2]
    # x_prev as it is: under fuse=True the step after a chain head gets the embedding expanded over the n streams
    # (stride 0), which the kernels read as its one row a token
    x, x_in, *rest = _kernels(impl, fused=True).step(
        _tokens(x_prev, 2), _tokens(h_res_prev, 2).contiguous(), _tokens(h_post_prev, 1).contiguous(),
        _tokens(y_prev, 1).contiguous(), phi, bias, alpha, n, nc, eps, iters, mode,
    )
    x = x.reshape(x_prev.shape)
    if check_finite:
        _check_finite(site, "the n streams entering the site", x)
    h_pre, h_post, h_res, p, sq = _restore_coeffs(lead, n, *rest)
    _after_coeffs(site, check_finite, x, h_pre, h_post, h_res)
    return (x, x_in.reshape(lead + x_prev.shape[-1:]), h_pre, h_post, h_res, p, sq)


@step.register_fake
def _(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode, impl, site="",
      check_finite=False):
    lead = x_prev.shape[:-2]
    acc = ref.acc_dtype(x_prev.dtype)
    return (_dense_like(x_prev), x_prev.new_empty(lead + x_prev.shape[-1:]),
            *_coeff_shapes(lead, n, phi.shape[1], x_prev, acc))


def _step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post,
                   dh_res, n, nc, eps, iters, mode, impl, into: bool, collapse_dx: bool = False) -> tuple:
    """step_backward's seven outputs; ``into``: dx_prev is written over dx (a dense buffer, step_backward_into);
    ``collapse_dx``: dx_prev summed over the streams, one row a token."""
    dx_tokens = _tokens(dx, 2).contiguous()  # with ``into``: a view of dx (checked dense), so writes land in dx
    args = (_tokens(x_prev, 2), _tokens(h_res_prev, 2).contiguous(), _tokens(h_post_prev, 1).contiguous(),
            _tokens(y_prev, 1).contiguous(), phi, bias, alpha, _tokens(h_pre, 1).contiguous(),
            _tokens(p, 1).contiguous(), sq.reshape(-1).contiguous(), dx_tokens, _tokens(dx_in, 1).contiguous(),
            _tokens(dh_post, 1).contiguous(), _tokens(dh_res, 2).contiguous(), n, nc, eps, iters, mode)
    kernels = _kernels(impl, fused=True)
    if collapse_dx:
        dx_prev, *rest = kernels.step_backward(*args, collapse_dx=True)
    elif not into:
        dx_prev, *rest = kernels.step_backward(*args)
    elif impl == "triton":
        dx_prev, *rest = kernels.step_backward(*args, out=dx_tokens)
    else:
        dx_prev, *rest = kernels.step_backward(*args)
        dx_prev = dx_tokens.copy_(dx_prev)
    dh_res_prev, dh_post_prev, dy_prev, dphi, dbias, dalpha = rest
    dx_shape = _summed_shape(x_prev) if collapse_dx else x_prev.shape
    return (dx_prev.reshape(dx_shape), dh_res_prev.reshape(h_res_prev.shape),
            dh_post_prev.reshape(h_post_prev.shape), dy_prev.reshape(y_prev.shape), dphi, dbias, dalpha)


@_custom_op("step_backward")
def step_backward(
    x_prev: Tensor, h_res_prev: Tensor, h_post_prev: Tensor, y_prev: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    h_pre: Tensor, p: Tensor, sq: Tensor, dx: Tensor, dx_in: Tensor, dh_post: Tensor, dh_res: Tensor,
    n: int, nc: int, eps: float, iters: int, mode: str, impl: str, collapse_dx: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``collapse_dx``: dx_prev summed over the n streams, [.., 1, C]: under fuse=True a chain head's part of its
    embedding gradient, set by passes/collapse_head_grad.py in backward graphs (as post_res_backward's)."""
    return _step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in,
                          dh_post, dh_res, n, nc, eps, iters, mode, impl, into=False, collapse_dx=collapse_dx)


@step_backward.register_fake
def _(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post, dh_res,
      n, nc, eps, iters, mode, impl, collapse_dx=False):
    return (_dx_like(x_prev, collapse_dx), *(_dense_like(t) for t in (h_res_prev, h_post_prev, y_prev, phi, bias,
                                                                       alpha)))


@_custom_op("step_backward_into", mutates_args=("dx",))
def step_backward_into(
    x_prev: Tensor, h_res_prev: Tensor, h_post_prev: Tensor, y_prev: Tensor, phi: Tensor, bias: Tensor, alpha: Tensor,
    h_pre: Tensor, p: Tensor, sq: Tensor, dx: Tensor, dx_in: Tensor, dh_post: Tensor, dh_res: Tensor,
    n: int, nc: int, eps: float, iters: int, coeff_mode: str, impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """step_backward's outputs but dx_prev, which is written over ``dx`` (passes/inplace_stream_grads.py). Its
    arguments are step_backward's, by position; ``mode`` is spelled ``coeff_mode`` because a mutating custom op's
    functionalization wrapper takes a keyword ``mode`` of its own."""
    if not dx.is_contiguous() or dx.shape != x_prev.shape or dx.dtype != x_prev.dtype:
        raise ValueError(f"mhc step_backward_into: dx must be a contiguous {x_prev.dtype} tensor of the stream's "
                         f"shape {tuple(x_prev.shape)}, got {dx.dtype} {tuple(dx.shape)} strides {dx.stride()}")
    return _step_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in,
                          dh_post, dh_res, n, nc, eps, iters, coeff_mode, impl, into=True)[1:]


@step_backward_into.register_fake
def _(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, dx, dx_in, dh_post, dh_res,
      n, nc, eps, iters, coeff_mode, impl):
    return tuple(_dense_like(t) for t in (h_res_prev, h_post_prev, y_prev, phi, bias, alpha))


def _step_setup(ctx, inputs, output):
    x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode, impl, *_labels = inputs
    _x, _x_in, h_pre, h_post, h_res, p, sq = output
    # The output stream x is not saved: the backward recomputes it from x_prev and y_prev. Saving it (session 18)
    # kept x alive through the next sublayer's backward beside x_prev, the step's memory peak: its backward ran 12 %
    # faster, the d = 7168 training step took 6.7 points more activation memory.
    ctx.save_for_backward(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, h_post, h_res)
    ctx.static = (n, nc, eps, iters, mode, impl)
    ctx.mark_non_differentiable(h_pre, p, sq)


def _step_bwd(ctx, dx, dx_in, _dh_pre, dh_post, dh_res, _dp, _dsq):
    x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq, h_post, h_res = ctx.saved_tensors
    grads = step_backward(
        x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, h_pre, p, sq,
        _zeros_if_none(dx, x_prev), _zeros_if_none(dx_in, y_prev), _zeros_if_none(dh_post, h_post),
        _zeros_if_none(dh_res, h_res), *ctx.static,
    )
    return (*grads, None, None, None, None, None, None, None, None)


step.register_autograd(_step_bwd, setup_context=_step_setup)


# ---------------------------------------------------------------------------------------------
# Direct twins for compiled graphs. Inductor's generated code calls each op through the dispatcher once a
# launch; a custom_op's call passes its Python autograd layer (autograd_impl -> redispatch -> backend_impl ->
# a dynamo-disable wrapper) even under no_grad, ~8 us a call on a 2-core CPU against ~1 us for a kernel
# registered directly (d = 2048's step on an H200 waited ~8 ms a step on the host, profile-2026-12-02-h200-s9).
# The twin has the same schema, fake and Python function, and no autograd kernel: compiled graphs never
# differentiate through an op (AOTAutograd has already built the backward graph), so ``_compat``'s Inductor
# lowering of each mhc_compile op emits a call of its twin. Traced graphs, eager mode and export keep the
# custom ops.
# ---------------------------------------------------------------------------------------------
_DIRECT = torch.library.Library("mhc_compile_direct", "DEF")


def _define_direct(name: str) -> None:
    op = getattr(torch.ops.mhc_compile, name).default
    _DIRECT.define(str(op._schema).split("::", 1)[1])
    _DIRECT.impl(name, _PLAIN[name], "CompositeExplicitAutograd")
    # The fake: the custom op's own, reached by calling it on the fake tensors.
    torch.library.register_fake(f"mhc_compile_direct::{name}", lambda *args, **kwargs: op(*args, **kwargs),
                                lib=_DIRECT)


for _name in OP_NAMES:
    _define_direct(_name)
