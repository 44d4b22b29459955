"""The reference ops and their custom-op wrappers: values, gradients (float64 gradcheck), fake impls."""

import pytest
import torch

from mhc_compile.kernels import reference as ref
from mhc_compile.runtime import ops

F64 = dict(dtype=torch.float64, requires_grad=True)


def _inputs(t=5, n=3, c=7):
    m = n * n + 2 * n
    x = torch.randn(t, n, c, **F64)
    phi = torch.randn(n * c, m, **F64)
    p, sq = ref.proj(x.detach(), phi.detach())
    return x, phi, p.requires_grad_(), sq.requires_grad_(), torch.randn(m, **F64), torch.rand(3, **F64)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_proj_gradcheck(n):
    x, phi, *_ = _inputs(n=n)
    assert torch.autograd.gradcheck(lambda x, phi: ops.proj(x, phi, "reference"), (x, phi))


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("n", [1, 3, 4])
def test_coeffs_gradcheck(mode, n):
    _, _, p, sq, b, a = _inputs(n=n)
    fn = lambda p, sq, b, a: ops.coeffs(p, sq, b, a, n, n * 7, 1e-6, 7, mode, "reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (p, sq, b, a))


def test_sinkhorn_backward_matches_autograd():
    logits = torch.randn(6, 4, 4, **F64)
    g = torch.randn(6, 4, 4, dtype=torch.float64)
    (auto,) = torch.autograd.grad(ref.sinkhorn(logits, 20), logits, g)
    torch.testing.assert_close(ref.sinkhorn_backward(logits.detach(), 20, g), auto)


def test_sinkhorn_is_doubly_stochastic():
    h = ref.sinkhorn(torch.randn(32, 4, 4, dtype=torch.float64), 20)
    assert (h > 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(32, 4, dtype=torch.float64))
    assert (h.sum(-2) - 1).abs().max() < 1e-3


def test_pre_and_post_res_gradcheck_with_leading_dims():
    n, c = 3, 5
    x = torch.randn(2, 3, n, c, **F64)
    h_pre, h_post = torch.rand(2, 3, n, **F64), torch.rand(2, 3, n, **F64)
    h_res, y = torch.rand(2, 3, n, n, **F64), torch.randn(2, 3, c, **F64)
    assert torch.autograd.gradcheck(lambda x, h: ops.pre(x, h, "reference"), (x, h_pre))
    assert torch.autograd.gradcheck(lambda *a: ops.post_res(*a, "reference"), (x, h_res, h_post, y))


def test_post_res_formula():
    """X'[i] = sum_j H_res[i, j] X[j] + H_post[i] y, written out by loops."""
    t, n, c = 3, 4, 6
    x, y = torch.randn(t, n, c), torch.randn(t, c)
    h_res, h_post = torch.rand(t, n, n), torch.rand(t, n)
    out = ops.post_res(x, h_res, h_post, y, "reference")
    for i in range(n):
        want = sum(h_res[:, i, j, None] * x[:, j] for j in range(n)) + h_post[:, i, None] * y
        torch.testing.assert_close(out[:, i], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    """Fake impls, schemas and autograd registration agree with the real kernels."""
    n, c, t = 2, 8, 3
    x = torch.randn(t, n, c, dtype=dtype, requires_grad=True)
    phi = torch.randn(n * c, n * n + 2 * n, requires_grad=True)
    torch.library.opcheck(ops.proj, (x, phi, "reference"))
    p, sq = ops.proj(x, phi, "reference")
    b, a = torch.randn(n * n + 2 * n, requires_grad=True), torch.rand(3, requires_grad=True)
    torch.library.opcheck(ops.coeffs, (p.detach().requires_grad_(), sq.detach(), b, a, n, n * c, 1e-6, 20, "mhc", "reference"))
    h_pre, h_post, h_res = (h.detach().requires_grad_() for h in ops.coeffs(p, sq, b, a, n, n * c, 1e-6, 20, "mhc", "reference"))
    torch.library.opcheck(ops.pre, (x, h_pre, "reference"))
    y = torch.randn(t, c, dtype=dtype, requires_grad=True)
    torch.library.opcheck(ops.post_res, (x, h_res, h_post, y, "reference"))
    # forward-only (passes/fold_post_res_proj.py puts it in Inductor's forward graphs): no gradient inputs
    torch.library.opcheck(ops.post_res_proj, (x.detach(), h_res.detach(), h_post.detach(), y.detach(),
                                              phi.detach(), "reference"))
    # forward-only too (passes/collapse_tail.py)
    for mean in (True, False):
        torch.library.opcheck(ops.post_res_collapse, (x.detach(), h_res.detach(), h_post.detach(), y.detach(), mean,
                                                      "reference"))
    # backward-only, writing the stream gradient over the one they read (passes/inplace_stream_grads.py)
    xd, hr, hp, hq, yd, ph = (v.detach() for v in (x, h_res, h_post, h_pre, y, phi))
    dout, dp, dsq = torch.randn_like(xd), torch.randn(t, n * n + 2 * n), torch.randn(t)
    torch.library.opcheck(ops.post_res_backward_into, (xd, hr, hp, yd, dout.clone(), "reference"))
    torch.library.opcheck(ops.post_res_backward_pre_into, (xd, hr, hp, yd, dout.clone(), hq, "reference"))
    torch.library.opcheck(ops.proj_pre_backward_into, (xd, ph, dp, dsq, hq, yd, dout.clone(), "reference"))
    bd, ad = b.detach(), a.detach()
    torch.library.opcheck(ops.step_backward_into, (xd, hr, hp, yd, ph, bd, ad, hq, dp, dsq.abs() + 1, dout.clone(), yd,
                                                   hp, hr, n, n * c, 1e-6, 20, "mhc", "reference"))


def test_bf16_stream_keeps_dtype_and_fp32_coefficients():
    x = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    phi = torch.randn(16, 8)
    p, sq = ops.proj(x, phi, "reference")
    assert p.dtype == sq.dtype == torch.float32
    h_pre, h_post, h_res = ops.coeffs(p, sq, torch.zeros(8), torch.ones(3), 2, 16, 1e-6, 20, "mhc", "reference")
    assert h_res.dtype == torch.float32
    assert ops.pre(x, h_pre, "reference").dtype == torch.bfloat16
    assert ops.post_res(x, h_res, h_post, x[:, 0], "reference").dtype == torch.bfloat16


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="cuda_magic"):
        ops.pre(torch.randn(2, 2, 3), torch.rand(2, 2), "cuda_magic")


def _permuted(*shape):
    """A [B, H, W, ...] tensor that is a channel-last view of a channel-first one (as a conv branch
    moved to the stream layout arrives): same values, strides that are not contiguous."""
    b, h, w, *rest = shape
    return torch.randn(b, *rest, h, w).movedim((-2, -1), (1, 2))


def _all_op_calls(impl: str):
    """(name, op, args) for every mHC op, forward and backward, with permuted (non-contiguous) inputs."""
    b, h, w, n, c = 2, 3, 2, 3, 5
    m = ref.num_coeffs(n)
    x, y, dout_x = _permuted(b, h, w, n, c), _permuted(b, h, w, c), _permuted(b, h, w, n, c)
    phi, bias, alpha = torch.randn(n * c, m) * 0.1, torch.randn(m), torch.rand(3)
    p, sq = _permuted(b, h, w, m), _permuted(b, h, w).abs() + 1
    h_pre, h_post, h_res = _permuted(b, h, w, n).abs(), _permuted(b, h, w, n).abs(), _permuted(b, h, w, n, n).abs()
    coeff = (n, n * c, 1e-6, 5, "mhc", impl)
    return [
        ("proj", ops.proj, (x, phi, impl)),
        ("proj_backward", ops.proj_backward, (x, phi, p, sq, impl)),
        ("coeffs", ops.coeffs, (p, sq, bias, alpha, *coeff)),
        ("coeffs_backward", ops.coeffs_backward, (p, sq, bias, alpha, h_pre, h_post, h_res, *coeff)),
        ("pre", ops.pre, (x, h_pre, impl)),
        ("pre_backward", ops.pre_backward, (x, h_pre, y, impl)),
        ("post_res", ops.post_res, (x, h_res, h_post, y, impl)),
        ("post_res_backward", ops.post_res_backward, (x, h_res, h_post, y, dout_x, impl)),
        ("enter", ops.enter, (x, phi, bias, alpha, *coeff)),
        ("enter_backward", ops.enter_backward, (x, phi, bias, alpha, h_pre, p, sq, y, h_post, h_res, *coeff)),
        ("enter_backward_collapsed", ops.enter_backward_collapsed,
         (y.contiguous().unsqueeze(-2).expand(x.shape), phi, bias, alpha, h_pre, p, sq, y, h_post, h_res, *coeff)),
        ("step", ops.step, (x, h_res, h_post, y, phi, bias, alpha, *coeff)),
        ("step_backward", ops.step_backward,
         (x, h_res, h_post, y, phi, bias, alpha, h_pre, p, sq, dout_x, y, h_post, h_res, *coeff)),
        # under fuse=True a chain head's: the step's dx_prev summed over the streams, taken by the head's op as acc
        ("step_backward", ops.step_backward,
         (x, h_res, h_post, y, phi, bias, alpha, h_pre, p, sq, dout_x, y, h_post, h_res, *coeff, True)),
        ("enter_backward_collapsed", ops.enter_backward_collapsed,
         (y.contiguous().unsqueeze(-2).expand(x.shape), phi, bias, alpha, h_pre, p, sq, y, h_post, h_res, *coeff,
          y.unsqueeze(-2))),
        ("pre_backward_dh", ops.pre_backward_dh, (x, h_pre, y, impl)),
        ("proj_pre_backward", ops.proj_pre_backward, (x, phi, p, sq, h_pre, y, dout_x, impl)),
        ("post_res_backward_pre", ops.post_res_backward_pre, (x, h_res, h_post, y, dout_x, h_pre, impl)),
        ("post_res_proj", ops.post_res_proj, (x, h_res, h_post, y, phi, impl)),
        ("post_res_collapse", ops.post_res_collapse, (x, h_res, h_post, y, True, impl)),
        ("post_res_chain", ops.post_res_chain, (x, [h_res, h_res.flip(-1)], [h_post, h_post], [y, y], impl)),
        # a chain head's stream: one dense row a token, broadcast over the n streams (passes/collapse_head_grad.py)
        ("proj_pre_backward_collapsed", ops.proj_pre_backward_collapsed,
         (y.contiguous().unsqueeze(-2).expand(x.shape), phi, p, sq, h_pre, y, dout_x, impl)),
        # the gradient they write over must be dense (passes/inplace_stream_grads.py only picks such): each call
        # gets its own copy (_fresh)
        ("post_res_backward_into", ops.post_res_backward_into, (x, h_res, h_post, y, dout_x.contiguous(), impl)),
        ("post_res_backward_pre_into", ops.post_res_backward_pre_into,
         (x, h_res, h_post, y, dout_x.contiguous(), h_pre, impl)),
        ("proj_pre_backward_into", ops.proj_pre_backward_into, (x, phi, p, sq, h_pre, y, dout_x.contiguous(), impl)),
        ("step_backward_into", ops.step_backward_into,
         (x, h_res, h_post, y, phi, bias, alpha, h_pre, p, sq, dout_x.contiguous(), y, h_post, h_res, *coeff)),
        # passes/fold_boundary_grads.py: site l+1's proj/pre backward (x, phi, dp, dsq, h_pre, dx_in, acc) and site
        # l's post_res backward (x_prev, h_res, h_post, y) with the sublayer input recompute's (h_pre_prev)
        ("boundary_backward", ops.boundary_backward,
         (x, phi, p, sq, h_pre, y, dout_x, x, h_res, h_post, y, h_pre, impl)),
        ("boundary_backward_into", ops.boundary_backward_into,
         (x, phi, p, sq, h_pre, y, dout_x.contiguous(), x, h_res, h_post, y, h_pre, impl)),
    ]


def _fresh(args):
    """``args`` with every tensor copied (as it is: a permuted view stays one), so that an op that writes over an
    argument leaves the next call's inputs alone. A broadcast view (a stride 0) stays as it is: no op writes over
    one, and a copy would be dense."""
    return tuple(a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) and 0 not in a.stride()
                 else a for a in args)


def test_every_op_returns_the_strides_its_fake_promises():
    """Inductor lays buffers out from the fake impls and asserts real strides against them: every output,
    forward and backward, must be contiguous on both sides even when the inputs are permuted views."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls = _all_op_calls("reference")
    assert {name for name, *_ in calls} == set(ops.OP_NAMES)
    for name, op, args in calls:
        real = op(*_fresh(args))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        real, fake = (tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in (real, fake))
        for i, (r, f) in enumerate(zip(real, fake)):
            assert r.shape == f.shape and r.stride() == f.stride() and r.is_contiguous(), (name, i, r.stride(), f.stride())


def test_direct_twins_match_the_custom_ops():
    """The twins Inductor's generated code calls (runtime/ops.py) return what the custom ops return, real and
    fake, and carry no autograd kernel of their own."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    twins = ops.direct_ops()
    assert set(twins) == set(ops.all_ops())
    for name, op, args in _all_op_calls("reference"):
        twin = getattr(torch.ops.mhc_compile_direct, name).default
        schemas = (str(o._schema).split("::")[1] for o in (twin, getattr(torch.ops.mhc_compile, name).default))
        assert len(set(schemas)) == 1, name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(twin.name(), "Autograd"), name
        want, got = op(*_fresh(args)), twin(*_fresh(args))
        want, got = (tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in (want, got))
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = twin(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        fake = tuple(fake) if isinstance(fake, (tuple, list)) else (fake,)
        assert [(f.shape, f.dtype, f.stride()) for f in fake] == [(w.shape, w.dtype, w.stride()) for w in want], name


_UNFUSED = ("proj", "proj_backward", "coeffs", "coeffs_backward", "pre", "pre_backward", "post_res",
            "post_res_backward", "pre_backward_dh", "proj_pre_backward", "post_res_backward_pre", "post_res_proj",
            "post_res_backward_into", "post_res_backward_pre_into", "proj_pre_backward_into",
            "proj_pre_backward_collapsed", "post_res_collapse", "post_res_chain")


@pytest.mark.parametrize("lead", ["three_dims_permuted", "none"])
def test_triton_ops_take_leading_dims_as_they_are(lead):
    """The Triton wrappers get the streams with their leading dims (no token view is made on that path) and
    allocate outputs with the same dims; the reference goes through ops._ReferenceOps, which flattens. Every
    unfused op, forward and backward: values against the reference, shapes and strides against the fake.
    Inputs: permuted views with three leading dims ([B, H, W, ...], not contiguous), or no leading dim at
    all (a single token: [n, C])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.manual_seed(3)
    calls = {name: (op, args) for name, op, args in _all_op_calls("triton") if name in _UNFUSED}
    assert set(calls) == set(_UNFUSED)
    for name, (op, args) in calls.items():
        if lead == "none":  # the first token of every per-token input; phi, bias, alpha unchanged
            lead3 = args[0].shape[:3]
            def first(a):
                if isinstance(a, list):  # post_res_chain's per-step tensors
                    return [first(v) for v in a]
                return a[0, 0, 0] if isinstance(a, torch.Tensor) and a.shape[:3] == lead3 else a

            args = tuple(first(a) for a in args)
        ref_args = tuple("reference" if a == "triton" else a for a in args)
        got, expect = op(*_fresh(args)), op(*_fresh(ref_args))
        got, expect = (tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in (got, expect))
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        fake = tuple(fake) if isinstance(fake, (tuple, list)) else (fake,)
        for i, (g, e, f) in enumerate(zip(got, expect, fake, strict=True)):
            assert g.shape == e.shape == f.shape and g.stride() == f.stride() and g.is_contiguous(), (name, i)
            torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name} output {i}: {m}")
