"""kernels/triton_fused.py (the fused boundary ops) against the reference, under TRITON_INTERPRET=1 (set by
conftest): every output of enter / step and of their backwards, odd T and C, n = 1..5 and 16, fp32 / fp64
tight, bf16 / fp16 loose (relative to the reference on the same rounded inputs), both modes, default tiles and
small K2 tiles (several chunks, ragged last chunk), C a multiple of the chunk and not, empty T, the stream that
K2 rebuilds, and the input checks."""

import pytest
import torch

from mhc_compile.kernels import reference as ref
from mhc_compile.kernels import triton_fused as tf

TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _inputs(T, n, C, dtype, seed):
    """Realistic coefficients: H_res from a Sinkhorn (doubly stochastic), H_post = 2 sigmoid, phi small
    enough that the sigmoids and the Sinkhorn of the next site are not saturated."""
    g = torch.Generator().manual_seed(seed)
    acc = ref.acc_dtype(dtype)
    m = ref.num_coeffs(n)
    return dict(
        x_prev=torch.randn(T, n, C, generator=g).to(dtype),
        h_res_prev=ref.sinkhorn(torch.randn(T, n, n, generator=g, dtype=acc), 20),
        h_post_prev=2 * torch.sigmoid(torch.randn(T, n, generator=g, dtype=acc)),
        y_prev=torch.randn(T, C, generator=g).to(dtype),
        phi=0.02 * torch.randn(n * C, m, generator=g, dtype=acc),
        bias=0.5 * torch.randn(m, generator=g, dtype=acc),
        alpha=torch.tensor([0.7, 0.9, 1.1], dtype=acc),
    )


def _grads(like, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g).to(t.dtype) for t in like]


def _close(got, want, tol, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.isfinite(a).all(), (what, i)
        if b.numel() == 0:
            continue
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{what} output {i}: relative error {err:.2e} > {tol:.0e}"


@pytest.fixture
def tiles(request):
    """'small': K2 walks C in chunks of 8 channels, 4 tokens a program (several chunks and a ragged last one at
    these C); 'default': the shipped tile (one chunk at these C)."""
    if request.param == "small":
        tf.configure("dh_pre", bt=4, bc=8)
    yield request.param
    tf.configure("dh_pre")


# (T, n, C, dtype, mode, tiles)
CASES = [
    (5, 1, 7, torch.float32, "mhc", "default"),
    (37, 2, 33, torch.float32, "hc", "small"),
    (1, 3, 33, torch.float64, "mhc", "small"),
    (37, 4, 7, torch.float64, "hc", "default"),
    (19, 4, 33, torch.float32, "mhc", "small"),
    (37, 4, 33, torch.bfloat16, "mhc", "small"),
    (21, 4, 32, torch.bfloat16, "mhc", "small"),  # C a multiple of the chunk
    (5, 3, 20, torch.bfloat16, "hc", "default"),
    (6, 5, 12, torch.float16, "hc", "small"),
    (3, 16, 5, torch.float32, "mhc", "default"),  # m = 288: phi walked in m-chunks
    (3, 16, 5, torch.bfloat16, "mhc", "default"),  # and proj's phi hi / lo columns: 5 blocks of 64
    (4, 12, 6, torch.bfloat16, "hc", "small"),  # 3 blocks of 64
]


@pytest.mark.parametrize("T, n, C, dtype, mode, tiles", CASES, indirect=["tiles"])
def test_matches_reference(T, n, C, dtype, mode, tiles):
    tol = TOL[dtype]
    i = _inputs(T, n, C, dtype, seed=1000 * T + 10 * n + C)
    static = (n, n * C, 1e-6, 20, mode)

    want = ref.step(*i.values(), *static)
    got = tf.step(*i.values(), *static)
    _close(got, want, tol, "step")
    if dtype in (torch.bfloat16, torch.float16):
        # the stored half stream is rounded to nearest like the reference, so it agrees bit for bit but for
        # rare fp32 summation-order ties (a truncating cast would change about half of the values)
        assert (got[0] != want[0]).double().mean().item() <= 0.01

    x, x_in, h_pre, h_post, h_res, p, sq = want
    dx, dx_in, dh_post, dh_res = _grads((x, x_in, h_post, h_res), seed=T + n)
    bargs = (*i.values(), h_pre, p, sq, dx, dx_in, dh_post, dh_res, *static)
    _close(tf.step_backward(*bargs), ref.step_backward(*bargs), tol, "step_backward")

    params = (i["phi"], i["bias"], i["alpha"])
    want = ref.enter(i["x_prev"], *params, *static)
    _close(tf.enter(i["x_prev"], *params, *static), want, tol, "enter")
    _, h_pre, _, _, p, sq = want
    eargs = (i["x_prev"], *params, h_pre, p, sq, dx_in, dh_post, dh_res, *static)
    _close(tf.enter_backward(*eargs), ref.enter_backward(*eargs), tol, "enter_backward")


def test_incoming_stream_gradient_joins_g_before_post_res_backward():
    """dX = minus the reference's in-kernel part of G: every post_res gradient must vanish, which holds
    only if dX is added to G (with its sign, for every stream) before H_res^T G, H_post G, G X_prev^T."""
    T, n, C = 4, 2, 16
    i = _inputs(T, n, C, torch.float64, seed=3)
    static = (n, n * C, 1e-6, 20, "mhc")
    x, x_in, h_pre, h_post, h_res, p, sq = ref.step(*i.values(), *static)
    dx_in, dh_post, dh_res = _grads((x_in, h_post, h_res), seed=4)
    g, *_ = ref._boundary_grad(x, i["phi"], i["bias"], i["alpha"], h_pre, p, sq, dx_in, dh_post, dh_res, *static)
    args = (*i.values(), h_pre, p, sq, -g, dx_in, dh_post, dh_res, *static)
    dx_prev, dh_res_prev, dh_post_prev, dy_prev, *_ = tf.step_backward(*args)
    for t in (dx_prev, dh_res_prev, dh_post_prev, dy_prev):
        assert t.abs().max().item() < 1e-12


def test_sublayer_output_in_another_dtype():
    """Autocast: an fp32 stream with a bf16 sublayer output y (and bf16 dy comes back)."""
    T, n, C = 7, 3, 9
    i = _inputs(T, n, C, torch.float32, seed=11)
    i["y_prev"] = i["y_prev"].to(torch.bfloat16)
    static = (n, n * C, 1e-6, 20, "mhc")
    want = ref.step(*i.values(), *static)
    _close(tf.step(*i.values(), *static), want, 2e-5, "step")
    x, x_in, h_pre, h_post, h_res, p, sq = want
    dx, dx_in, dh_post, dh_res = _grads((x, x_in, h_post, h_res), seed=12)
    bargs = (*i.values(), h_pre, p, sq, dx, dx_in, dh_post, dh_res, *static)
    got, want = tf.step_backward(*bargs), ref.step_backward(*bargs)
    _close(got[:3] + got[4:], want[:3] + want[4:], 2e-5, "step_backward")
    _close(got[3:4], want[3:4], 1e-2, "step_backward dy (bf16)")


def test_empty_token_count():
    n, C = 3, 8
    i = _inputs(0, n, C, torch.bfloat16, seed=0)
    static = (n, n * C, 1e-6, 20, "mhc")
    out = tf.step(*i.values(), *static)
    assert [tuple(t.shape) for t in out] == [(0, n, C), (0, C), (0, n), (0, n), (0, n, n), (0, 15), (0,)]
    x, x_in, h_pre, h_post, h_res, p, sq = out
    bargs = (*i.values(), h_pre, p, sq, x, x_in, h_post, h_res, *static)
    _close(tf.step_backward(*bargs), ref.step_backward(*bargs), 0.0, "step_backward")
    params = (i["phi"], i["bias"], i["alpha"])
    _close(tf.enter(i["x_prev"], *params, *static), ref.enter(i["x_prev"], *params, *static), 0.0, "enter")
    eargs = (i["x_prev"], *params, h_pre, p, sq, x_in, h_post, h_res, *static)
    _close(tf.enter_backward(*eargs), ref.enter_backward(*eargs), 0.0, "enter_backward")


@pytest.mark.parametrize("change, error, match", [
    (dict(x_prev=torch.zeros(4, 2, 8, dtype=torch.int32)), TypeError, "mhc triton step: unsupported dtype torch.int32"),
    (dict(y_prev=torch.zeros(4, 9)), ValueError, r"y_prev has shape \(4, 9\), expected \(4, 8\)"),
    (dict(y_prev=torch.zeros(4, 8, dtype=torch.int64)), TypeError, "mhc triton step: unsupported dtype torch.int64"),
    (dict(h_res_prev=torch.zeros(4, 3, 3)), ValueError, r"h_res_prev has shape \(4, 3, 3\), expected \(4, 2, 2\)"),
    (dict(h_post_prev=torch.zeros(3, 2)), ValueError, "h_post_prev has shape"),
    (dict(phi=torch.zeros(16, 7)), ValueError, r"phi has shape \(16, 7\), expected"),
    (dict(x_prev=torch.zeros(4, 3, 8)), ValueError, r"stream has shape \(4, 3, 8\), expected \[T, n=2, C\]"),
])
def test_inputs_are_checked(change, error, match):
    i = {**_inputs(4, 2, 8, torch.float32, seed=0), **change}
    with pytest.raises(error, match=match):
        tf.step(*i.values(), 2, 16, 1e-6, 20, "mhc")


def test_configure_rejects_unknown_kernel_and_resets():
    with pytest.raises(ValueError, match="unknown kernel 'proj'"):
        tf.configure("proj", bt=16)
    tf.configure("dh_pre", bc=16)
    assert tf._cfg("dh_pre").bc == 16
    tf.configure("dh_pre")
    assert tf._cfg("dh_pre") == tf._CFG["dh_pre"]


def test_gradcheck_through_the_custom_ops_float64():
    """step then enter through the custom ops with impl="triton": autograd's formulas and the kernels agree."""
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



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_rebuilds_the_forward_stream_bit_for_bit(dtype):
    """K2 writes X for the backward's later passes: it must be the very stream ``step`` stored (same sums in the
    same order, same rounding), and dH_pre its inner product with dx_in."""
    T, n, C = 9, 4, 40
    i = _inputs(T, n, C, dtype, seed=21)
    x = tf.step(*i.values(), n, n * C, 1e-6, 20, "mhc")[0]
    dx_in = _grads((i["y_prev"],), seed=22)[0]
    acc = ref.acc_dtype(dtype)
    tf.configure("dh_pre", bt=4, bc=16)
    try:
        x2, dh_pre = tf._recompute_dh_pre(i["x_prev"], i["h_res_prev"], i["h_post_prev"], i["y_prev"], dx_in, acc)
    finally:
        tf.configure("dh_pre")
    assert torch.equal(x2, x)
    want = torch.einsum("tic,tc->ti", x.double(), dx_in.double())
    torch.testing.assert_close(dh_pre.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_backward_writes_g_and_dx_prev_over_dx(dtype):
    """``out=dx`` (passes/inplace_stream_grads.py's step_backward_into): dx_prev comes back in dx's buffer, bit for
    bit what a new buffer would hold (both passes that write there read each tile before storing it)."""
    T, n, C = 37, 4, 33
    i = _inputs(T, n, C, dtype, seed=21)
    static = (n, n * C, 1e-6, 20, "mhc")
    x, x_in, h_pre, h_post, h_res, p, sq = ref.step(*i.values(), *static)
    dx, dx_in, dh_post, dh_res = _grads((x, x_in, h_post, h_res), seed=22)
    args = lambda d: (*i.values(), h_pre, p, sq, d, dx_in, dh_post, dh_res, *static)  # noqa: E731
    want = tf.step_backward(*args(dx))
    buf = dx.clone()
    got = tf.step_backward(*args(buf), out=buf)
    assert got[0].data_ptr() == buf.data_ptr()
    for a, e in zip(got, want):
        assert torch.equal(a, e)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        tf.step_backward(*args(dx), out=dx.transpose(0, 1).contiguous().transpose(0, 1))
