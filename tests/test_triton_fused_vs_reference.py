"""Triton kernels of the fused boundary ops (kernels/triton_fused.py) against the reference, under
TRITON_INTERPRET=1: every output of enter / step and of their backwards, odd shapes, every stream dtype,
both modes; then gradcheck in float64 through the custom ops with impl="triton"."""

import pytest
import torch

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_fused as tb

# (T, n, C, dtype, mode, relative tolerance of each output to its largest entry)
CASES = [
    (5, 3, 7, torch.float64, "mhc", 1e-12),
    (37, 4, 33, torch.float32, "mhc", 1e-5),
    (3, 1, 9, torch.float32, "hc", 1e-5),
    (1, 2, 20, torch.float32, "mhc", 1e-5),
    (19, 4, 24, torch.float16, "mhc", 5e-3),
    (17, 2, 40, torch.bfloat16, "hc", 3e-2),
    (4, 16, 8, torch.float32, "mhc", 1e-5),
    (6, 5, 12, torch.float32, "hc", 1e-5),
]


def _inputs(T, n, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    acc = ref.acc_dtype(dtype)
    m = n * n + 2 * n
    h_res = torch.rand(T, n, n, generator=g, dtype=acc)
    return dict(
        x_prev=torch.randn(T, n, C, generator=g).to(dtype),
        h_res_prev=h_res / h_res.sum(-1, keepdim=True),
        h_post_prev=2 * torch.rand(T, n, generator=g, dtype=acc),
        y_prev=torch.randn(T, C, generator=g).to(dtype),
        phi=0.1 * torch.randn(n * C, m, generator=g, dtype=acc),
        bias=0.5 * torch.randn(m, generator=g, dtype=acc),
        alpha=torch.tensor([0.7, 0.9, 1.1], dtype=acc),
    )


def _close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i, a.dtype, b.dtype, a.shape, b.shape)
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{what} output {i}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("T, n, C, dtype, mode, tol", CASES)
def test_step_and_enter_match_reference(T, n, C, dtype, mode, tol):
    inp = _inputs(T, n, C, dtype, seed=T * 100 + n * 10 + C)
    static = (n, n * C, 1e-6, 5, mode)
    i = inp
    want = ref.step(*i.values(), *static)
    _close(tb.step(*i.values(), *static), want, tol, "step")
    x, x_in, h_pre, h_post, h_res, p, sq = want
    g = torch.Generator().manual_seed(1)
    dx, dx_in = torch.randn(x.shape, generator=g).to(dtype), torch.randn(x_in.shape, generator=g).to(dtype)
    dh_post, dh_res = torch.randn(h_post.shape, generator=g).to(h_post.dtype), torch.randn(h_res.shape, generator=g).to(h_res.dtype)
    bargs = (*i.values(), h_pre, p, sq, dx, dx_in, dh_post, dh_res, *static)
    _close(tb.step_backward(*bargs), ref.step_backward(*bargs), tol, "step_backward")

    params = (i["phi"], i["bias"], i["alpha"])
    want = ref.enter(i["x_prev"], *params, *static)
    _close(tb.enter(i["x_prev"], *params, *static), want, tol, "enter")
    _, h_pre, _, _, p, sq = want
    eargs = (i["x_prev"], *params, h_pre, p, sq, dx_in, dh_post, dh_res, *static)
    _close(tb.enter_backward(*eargs), ref.enter_backward(*eargs), tol, "enter_backward")


def test_empty_token_count():
    i = _inputs(0, 3, 8, torch.float32, seed=0)
    out = tb.step(*i.values(), 3, 24, 1e-6, 5, "mhc")
    assert [tuple(t.shape) for t in out] == [(0, 3, 8), (0, 8), (0, 3), (0, 3), (0, 3, 3), (0, 15), (0,)]


def test_unsupported_dtype_is_named():
    i = _inputs(4, 2, 8, torch.float32, seed=0)
    i["x_prev"] = i["x_prev"].to(torch.int32)
    with pytest.raises(TypeError, match="mhc triton step: unsupported dtype torch.int32"):
        tb.step(*i.values(), 2, 16, 1e-6, 5, "mhc")


def test_gradcheck_through_the_custom_ops_float64():
    import mhc_compile.runtime.ops  # noqa: F401  (registers the ops)

    ops = torch.ops.mhc_compile
    n, C = 2, 5
    i = {k: v.requires_grad_() for k, v in _inputs(3, n, C, torch.float64, seed=7).items()}
    static = (n, n * C, 1e-6, 4, "mhc", "triton")

    def f(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha):
        x, x_in, _, h_post, h_res, _, _ = ops.step(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, *static)
        x_in2, _, h_post2, h_res2, _, _ = ops.enter(x, phi, bias, alpha, *static)
        return x, x_in, h_post, h_res, x_in2, h_post2, h_res2

    assert torch.autograd.gradcheck(f, tuple(i.values()), fast_mode=True)
