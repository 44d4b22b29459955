"""A stream broadcast over its n streams (a chain's head: the embedding expanded, passes/rewrite.py) is read by the
Triton kernels as its one row a token (X_BCAST), never copied dense; what they compute must be what the dense
path computes on the same values, bit for bit (proj: to the precision of its dots, see test_proj). Run on CPU tensors under the Triton interpreter, which also runs
the TMA descriptors of proj's one-pass backward.

TRITON_INTERPRET must be set before anything imports triton (see test_triton_kernels.py); if another module
imported it first without the interpreter, this module reruns itself in a fresh subprocess instead.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language.standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from mhc_compile.kernels import reference as ref  # noqa: E402

_INTERPRETED = isinstance(triton.language.standard.sum, InterpretedFunction)

if _INTERPRETED:
    from interpreter_rerun import interpreted_kernels
    from launch_spy import patch_launches, real_launch

    _modules = interpreted_kernels()
    tk, tcom, pb, tf = (_modules[m] for m in ("triton_ops", "triton_common", "triton_proj_bwd", "triton_fused"))

# (leading token dims, n, C, dtype): odd token counts leave ragged tiles; C = 40 puts proj's K blocks across
# streams (the gather path), C = 48 with 16-wide blocks keeps each in one stream (and bf16 takes TMA there)
CASES = [((37,), 4, 48, torch.bfloat16), ((37,), 4, 40, torch.float32), ((2, 3), 2, 40, torch.bfloat16),
         ((5,), 2, 48, torch.float32)]
IDS = [f"{'x'.join(map(str, lead))}-n{n}-C{c}-{str(d)[6:]}" for lead, n, c, d in CASES]


def _inputs(lead, n, c, dtype, seed=0):
    """(the broadcast stream, its dense copy, the other operands by name)."""
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)
    s = torch.randn(*lead, c, generator=g).to(dtype)
    xb = s.unsqueeze(-2).expand(*lead, n, c)
    other = dict(
        h_pre=torch.rand(*lead, n, generator=g), h_post=2 * torch.rand(*lead, n, generator=g),
        h_res=torch.rand(*lead, n, n, generator=g), y=torch.randn(*lead, c, generator=g).to(dtype),
        phi=torch.randn(n * c, m, generator=g) / (n * c) ** 0.5, dp=torch.randn(*lead, m, generator=g),
        dsq=torch.randn(*lead, generator=g), g=torch.randn(*lead, c, generator=g).to(dtype),
        dout=torch.randn(*lead, n, c, generator=g).to(dtype), acc=torch.randn(*lead, n, c, generator=g).to(dtype),
    )
    return xb, xb.contiguous(), other


@pytest.fixture
def x_bcast_launches(monkeypatch):
    """{kernel name: [X_BCAST of each launch]} of triton_ops', triton_proj_bwd's and triton_fused's launches that read
    a stream."""
    seen = {}
    real = real_launch

    def spy(kernel, grid, args, meta, *rest, **options):
        if "X_BCAST" in meta:
            seen.setdefault(kernel.fn.__name__, []).append(meta["X_BCAST"])
        return real(kernel, grid, args, meta, *rest, **options)

    patch_launches(monkeypatch, spy, pb, tf)
    return seen


def _same(got, want):
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype and a.is_contiguous(), (a.shape, e.shape, a.stride())
        assert torch.equal(a, e), (a - e).abs().max()


def _into(fn, grad, x, *args):
    """fn(x, *args, grad) with the stream gradient written over a copy of grad (passes/inplace_stream_grads.py)."""
    mine = grad.clone()
    out = fn(x, *args, mine, out=mine)
    assert out[0].data_ptr() == mine.data_ptr()
    return out


def _check(fn, xb, xd, seen, kernels, dense=()):
    """fn(xb) is fn(xd) bit for bit, and every kernel that read the stream took it broadcast; ``dense``: kernels
    that read a dense stream the op made from it (the fused step's X)."""
    want = fn(xd)
    seen.clear()
    _same(fn(xb), want)
    assert seen == {**{k: [True] for k in kernels}, **{k: [False] for k in dense}}, seen


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_pre_and_its_backward(lead, n, c, dtype, x_bcast_launches):
    xb, xd, o = _inputs(lead, n, c, dtype)
    seen = x_bcast_launches
    _check(lambda x: tk.pre(x, o["h_pre"]), xb, xd, seen, ["_pre_fwd_kernel"])
    _check(lambda x: tk.pre_backward(x, o["h_pre"], o["g"]), xb, xd, seen, ["_pre_bwd_kernel"])
    _check(lambda x: tk.pre_backward_dh(x, o["h_pre"], o["g"]), xb, xd, seen, ["_pre_bwd_kernel"])


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_post_res_and_its_backward(lead, n, c, dtype, x_bcast_launches):
    xb, xd, o = _inputs(lead, n, c, dtype, seed=1)
    seen = x_bcast_launches
    args = (o["h_res"], o["h_post"], o["y"])
    _check(lambda x: tk.post_res(x, *args), xb, xd, seen, ["_post_res_fwd_kernel"])
    for two_d, kernel in ((True, "_post_res_bwd_2d_kernel"), (False, "_post_res_bwd_kernel")):
        with tk.tuning("post_res_backward", two_d=two_d):
            _check(lambda x: tk.post_res_backward(x, *args, o["dout"]), xb, xd, seen, [kernel])
            _check(lambda x: tk.post_res_backward_pre(x, *args, o["dout"], o["h_pre"]), xb, xd, seen, [kernel])
            _check(lambda x: _into(tk.post_res_backward, o["dout"], x, *args), xb, xd, seen, [kernel])


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_post_res_backward_reads_a_broadcast_stream_gradient_as_one_row(lead, n, c, dtype, monkeypatch):
    """dout broadcast over the streams (a mean collapse's gradient, passes/broadcast_collapse_grad.py): the same
    outputs as from its dense copy, bit for bit, with the kernel told G_BCAST and no copy made (dx is a new dense
    buffer, as the dense path's own)."""
    _, xd, o = _inputs(lead, n, c, dtype, seed=5)
    gb = o["g"].unsqueeze(-2).expand(*lead, n, c)
    seen = []
    real = real_launch

    def spy(kernel, grid, args, meta, *rest, **options):
        seen.append(meta.get("G_BCAST"))
        return real(kernel, grid, args, meta, *rest, **options)

    patch_launches(monkeypatch, spy)
    args = (o["h_res"], o["h_post"], o["y"])
    for two_d in (True, False):
        with tk.tuning("post_res_backward", two_d=two_d):
            for fn in (lambda g: tk.post_res_backward(xd, *args, g),
                       lambda g: tk.post_res_backward_pre(xd, *args, g, o["h_pre"])):
                want = fn(gb.contiguous())
                seen.clear()
                _same(fn(gb), want)
                assert seen == [True]


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_proj(lead, n, c, dtype, monkeypatch):
    """proj of a broadcast stream is its rows' projection on phi summed over the streams (one pass of K = C) and n
    times their sum of squares: equal to the dense copy's to the precision of the dots, not bit for bit (the sum
    over streams is rounded to fp32, then split into bf16 hi + lo halves: ~16 mantissa bits for bf16 streams)."""
    xb, xd, o = _inputs(lead, n, c, dtype, seed=2)
    depths = []
    real = real_launch

    def spy(kernel, grid, args, meta, *rest, **options):
        if kernel.fn.__name__ == "_proj_fwd_kernel":
            depths.append(args[5])  # K, the depth of the projection
        return real(kernel, grid, args, meta, *rest, **options)

    patch_launches(monkeypatch, spy)
    for bk in (16, 128):  # 16: K blocks inside one stream where 16 | C; 128: across streams
        with tk.tuning("proj", bt=16, bk=bk):
            want = tk.proj(xd, o["phi"])
            depths.clear()
            got = tk.proj(xb, o["phi"])
            assert depths == [c]
            for a, e in zip(got, want):
                assert a.shape == e.shape and a.dtype == e.dtype
                tol = 1e-4 if dtype == torch.bfloat16 else 2e-6
                torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item())


def _proj_backward_kernels(dtype, one_pass):
    if dtype == torch.bfloat16 and one_pass:
        return ["_proj_dx_dphi_kernel"]
    return ["_proj_dx_kernel", "_proj_dphi_kernel"]


@pytest.mark.parametrize("one_pass", [True, False], ids=["one_pass", "pair"])
@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_proj_backward(lead, n, c, dtype, one_pass, x_bcast_launches):
    """bf16 streams: the one-pass kernel (its TMA build where the 16-wide K blocks lie in one stream) or the pair;
    fp32 streams: the pair. With acc, without, and dx written over acc (``out=``)."""
    xb, xd, o = _inputs(lead, n, c, dtype, seed=3)
    seen = x_bcast_launches
    kernels = _proj_backward_kernels(dtype, one_pass)
    site = (o["phi"], o["dp"], o["dsq"])
    with tk.tuning("proj_dx_dphi", enabled=one_pass, bt=16, bk=16), tk.tuning("proj_dx", bt=16, bk=16), \
            tk.tuning("proj_dphi", bt=16, bk=16):
        _check(lambda x: tk.proj_backward(x, *site), xb, xd, seen, kernels)
        for acc in (None, o["acc"]):
            _check(lambda x: tk.proj_pre_backward(x, *site, o["h_pre"], o["g"], acc), xb, xd, seen, kernels)
        _check(lambda x: _into(tk.proj_pre_backward, o["acc"], x, *site, o["h_pre"], o["g"]), xb, xd, seen,
               kernels)


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_fused_enter_and_its_backward(lead, n, c, dtype, x_bcast_launches):
    """``fuse=True``'s ``enter`` at a chain's head: the kernels read the broadcast stream as its rows (no dense copy
    first). The forward matches the dense copy's to the precision of proj (see test_proj); the backward, given the
    same saved coefficients, bit for bit."""
    xb, xd, o = _inputs(lead, n, c, dtype, seed=6)
    t = xd.shape[:-2].numel()
    xb, xd = xb.reshape(t, n, c), xd.reshape(t, n, c)  # the custom op hands the kernels [T, n, C] (a view of xb)
    assert xb.stride(-2) == 0
    m, acc = ref.num_coeffs(n), torch.float32
    g = torch.Generator().manual_seed(7)
    params = (o["phi"], 0.5 * torch.randn(m, generator=g, dtype=acc), torch.tensor([0.7, 0.9, 1.1], dtype=acc))
    static = (n, n * c, 1e-6, 20, "mhc")
    want = tf.enter(xd, *params, *static)
    x_bcast_launches.clear()
    got = tf.enter(xb, *params, *static)
    assert x_bcast_launches == {"_pre_fwd_kernel": [True]}, x_bcast_launches  # proj: one [T, C] pass, no X_BCAST
    for a, e in zip(got, want):
        assert a.shape == e.shape and a.dtype == e.dtype and a.is_contiguous()
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-5  # x_in: bf16 rounding of a slightly different h_pre
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item())

    _, h_pre, h_post, h_res, p, sq = want
    dx_in = torch.randn(t, c, generator=g).to(dtype)
    dh_post, dh_res = torch.randn(t, n, generator=g), torch.randn(t, n, n, generator=g)
    kernels = _proj_backward_kernels(dtype, one_pass=True)
    with tk.tuning("proj_dx_dphi", bt=16, bk=16), tk.tuning("proj_dx", bt=16, bk=16), \
            tk.tuning("proj_dphi", bt=16, bk=16):
        _check(lambda x: tf.enter_backward(x, *params, h_pre, p, sq, dx_in, dh_post, dh_res, *static), xb, xd,
               x_bcast_launches, ["_pre_bwd_kernel", *kernels])


def test_fused_enter_custom_ops_pass_the_broadcast_stream_through(x_bcast_launches):
    """The ``enter`` / ``enter_backward`` custom ops flatten a [B, S, n, C] head stream to tokens without copying
    it: the kernels still see it broadcast, and the gradient of x is a dense [B, S, n, C] tensor."""
    from mhc_compile.runtime import ops

    xb, xd, o = _inputs((2, 3), 4, 48, torch.bfloat16, seed=8)
    n, m = 4, ref.num_coeffs(4)
    params = (o["phi"], torch.zeros(m), torch.tensor([0.7, 0.9, 1.1]))
    static = (n, n * 48, 1e-6, 20, "mhc", "triton")
    x_bcast_launches.clear()
    x_in, h_pre, h_post, h_res, p, sq = ops.enter(xb, *params, *static)
    assert x_bcast_launches == {"_pre_fwd_kernel": [True]}, x_bcast_launches
    dx_in = torch.randn_like(x_in)
    x_bcast_launches.clear()
    dx, *_ = ops.enter_backward(xb, *params, h_pre, p, sq, dx_in, torch.zeros_like(h_post), torch.zeros_like(h_res),
                                *static)
    assert all(all(v) for v in x_bcast_launches.values()) and "_pre_bwd_kernel" in x_bcast_launches
    assert dx.shape == xb.shape and dx.is_contiguous()
    want, *_ = ops.enter_backward(xd, *params, h_pre, p, sq, dx_in, torch.zeros_like(h_post),
                                  torch.zeros_like(h_res), *static)
    assert torch.equal(dx, want)


def test_tma_reads_the_broadcast_rows(monkeypatch):
    """bf16, C = 48 in 16-wide K blocks: the one-pass backward reads X through a descriptor of the [T, C] rows."""
    xb, xd, o = _inputs((37,), 4, 48, torch.bfloat16, seed=4)
    built = []
    real = pb.descriptor
    monkeypatch.setattr(pb, "descriptor", lambda v, *a: built.append((v.shape, v.stride())) or real(v, *a))
    kw = dict(bt=16, bk=16, tma=True)
    want = pb.proj_pre_backward_fused(xd, o["phi"], o["dp"], o["dsq"], o["h_pre"], o["g"], o["acc"], **kw)
    built.clear()
    _same(pb.proj_pre_backward_fused(xb, o["phi"], o["dp"], o["dsq"], o["h_pre"], o["g"], o["acc"], **kw), want)
    assert built[0] == ((37, 48), (48, 1)), built  # X: the rows, not the [T, n, C] expand


def test_stream_arg_takes_only_dense_rows_broadcast_over_several_streams(x_bcast_launches):
    """Broadcast: stride 0 over n > 1 streams of dense rows. A stride-0 stream dim over rows that are not dense (a
    slice of wider rows, permuted token dims), or n = 1, is copied dense, and the ops still compute the same."""
    s = torch.randn(6, 5, 40)
    xb = s.unsqueeze(-2).expand(6, 5, 3, 40)
    assert tcom.stream_arg(xb) == (xb, True)
    dense = xb.contiguous()
    assert tcom.stream_arg(dense)[0] is dense and not tcom.stream_arg(dense)[1]
    wide = torch.randn(6, 5, 56)
    for x in (wide[..., :40].unsqueeze(-2).expand(6, 5, 3, 40),  # rows 56 apart
              s.transpose(0, 1).unsqueeze(-2).expand(5, 6, 3, 40),  # token dims permuted
              s.unsqueeze(-2)):  # n = 1
        got, bcast = tcom.stream_arg(x)
        assert not bcast and got.is_contiguous() and torch.equal(got, x)
        *lead, n, c = x.shape
        h_pre, phi = torch.rand(*lead, n), torch.randn(n * c, ref.num_coeffs(n))
        x_bcast_launches.clear()
        _same(tk.pre(x, h_pre), tk.pre(got, h_pre))
        _same(tk.proj(x, phi), tk.proj(got, phi))
        assert x_bcast_launches == {"_pre_fwd_kernel": [False] * 2}, x_bcast_launches


if not _INTERPRETED:
    # triton was imported before this module without the interpreter: run every test above in a subprocess
    for _name in [k for k in list(globals()) if k.startswith("test_")]:
        del globals()[_name]

    from interpreter_rerun import rerun_in_subprocess

    test_in_interpreter_subprocess = rerun_in_subprocess(__file__)


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_post_res_proj(lead, n, c, dtype, x_bcast_launches):
    """``fuse=True``'s forward boundary after a chain head: post_res_proj reads the broadcast stream as its rows, on
    the pointer build and (bf16, C a multiple of BC) the TMA one; X', p and sq bit for bit the dense copy's."""
    xb, xd, o = _inputs(lead, n, c, dtype, seed=9)
    args = (o["h_res"], o["h_post"], o["y"], o["phi"])
    for tma in (False, True):
        with tk.tuning("post_res_proj", ws=False, tma=tma):
            _check(lambda x: tk.post_res_proj(x, *args), xb, xd, x_bcast_launches, ["_post_res_proj_kernel"])


def _step_inputs(lead, n, c, dtype, seed):
    """``step``'s operands at [T, n, C] (as the custom op hands them to the kernels), its static arguments, and the
    saved coefficients and gradients of its backward, from the dense stream's forward."""
    xb, xd, o = _inputs(lead, n, c, dtype, seed=seed)
    t = xd.shape[:-2].numel()
    xb, xd = xb.reshape(t, n, c), xd.reshape(t, n, c)
    assert xb.stride(-2) == 0
    g = torch.Generator().manual_seed(seed + 1)
    m, acc = ref.num_coeffs(n), torch.float32
    prev = (o["h_res"].reshape(t, n, n), o["h_post"].reshape(t, n), o["y"].reshape(t, c))
    params = (o["phi"], 0.5 * torch.randn(m, generator=g, dtype=acc), torch.tensor([0.7, 0.9, 1.1], dtype=acc))
    static = (n, n * c, 1e-6, 20, "mhc")
    _, _, h_pre, _, _, p, sq = tf.step(xd, *prev, *params, *static)
    grads = (torch.randn(t, n, c, generator=g).to(dtype), torch.randn(t, c, generator=g).to(dtype),
             torch.randn(t, n, generator=g), torch.randn(t, n, n, generator=g))
    return xb, xd, prev, params, static, (h_pre, p, sq), grads


@pytest.mark.parametrize("lead,n,c,dtype", CASES, ids=IDS)
def test_fused_step_and_its_backward(lead, n, c, dtype, x_bcast_launches):
    """``fuse=True``'s ``step`` after a chain head, whose X_prev is the embedding broadcast over the streams: its
    forward (post_res_proj) and its backward's passes that read X_prev (K2, post_res_backward; the Gluon pass on
    an sm_90 GPU, benchmarks/gluon_step_bwd_check.py) take it as its rows, and give the dense copy's outputs bit
    for bit: dX_prev dense, summed over the streams (``collapse_dx``, the head's call), or written over dX."""
    xb, xd, prev, params, static, saved, (dx, dx_in, dh_post, dh_res) = _step_inputs(lead, n, c, dtype, seed=10)
    _check(lambda x: tf.step(x, *prev, *params, *static), xb, xd, x_bcast_launches, ["_post_res_proj_kernel"],
           dense=["_pre_fwd_kernel"])
    kernels = ["_dh_pre_kernel", "_post_res_bwd_2d_kernel"]
    rebuilt = _proj_backward_kernels(dtype, one_pass=True)  # proj_pre_backward reads the rebuilt X, dense
    with tk.tuning("post_res_backward", two_d=True):
        for kw in (dict(), dict(collapse_dx=True)):
            _check(lambda x: tf.step_backward(x, *prev, *params, *saved, dx, dx_in, dh_post, dh_res, *static, **kw),
                   xb, xd, x_bcast_launches, kernels, rebuilt)
        _check(lambda x: _into(lambda xx, d, out: tf.step_backward(xx, *prev, *params, *saved, d, dx_in, dh_post,
                                                                   dh_res, *static, out=out), dx, x),
               xb, xd, x_bcast_launches, kernels, rebuilt)


def test_fused_step_custom_ops_pass_the_broadcast_stream_through(x_bcast_launches):
    """The ``step`` / ``step_backward`` custom ops flatten a [B, S, n, C] X_prev to tokens without making it dense
    (session 49 found them copying it: n C a token written and read again, forward and backward, at each chain head
    under fuse=True): the kernels see it broadcast, and the outputs are the dense copy's."""
    from mhc_compile.runtime import ops

    xb, xd, o = _inputs((2, 3), 4, 48, torch.bfloat16, seed=11)
    n, m = 4, ref.num_coeffs(4)
    prev = (o["h_res"], o["h_post"], o["y"])
    params = (o["phi"], torch.zeros(m), torch.tensor([0.7, 0.9, 1.1]))
    static = (n, n * 48, 1e-6, 20, "mhc", "triton")
    want = ops.step(xd, *prev, *params, *static)
    x_bcast_launches.clear()
    got = ops.step(xb, *prev, *params, *static)
    assert x_bcast_launches == {"_post_res_proj_kernel": [True], "_pre_fwd_kernel": [False]}, x_bcast_launches
    _same(got, want)
    _, _, h_pre, _, _, p, sq = want
    grads = (o["dout"], o["g"], torch.randn(2, 3, n), torch.randn(2, 3, n, n))
    want = ops.step_backward(xd, *prev, *params, h_pre, p, sq, *grads, *static)
    x_bcast_launches.clear()
    got = ops.step_backward(xb, *prev, *params, h_pre, p, sq, *grads, *static)
    assert all(all(v) for k, v in x_bcast_launches.items() if k != "_proj_dx_dphi_kernel"), x_bcast_launches
    assert "_dh_pre_kernel" in x_bcast_launches
    _same(got, want)
