"""kernels/triton_proj_bwd.py's one-pass kernel (dx and dphi of proj's folded backward; its knobs are swept by
benchmarks/lab_dx_dphi.py) against the float64 reference, on CPU tensors under the Triton interpreter.

TRITON_INTERPRET must be set before anything imports triton (see test_triton_kernels.py); if another module
imported it first without the interpreter, this module reruns itself in a fresh subprocess instead.
Shapes are tiny and odd: T = 37 tokens leave a ragged tail tile after whole tiles of 16, C = 24 puts K blocks
across stream boundaries (the gather path) and a ragged last K block, C = 64 with BK | C takes ONE_STREAM.

Each output is held to a bound derived from how it was computed rather than to a flat tolerance:
* dx (stream dtype) = fp32 sum of the dot and three elementwise terms, rounded once. bf16: the rounding is
  <= 2^-8 relative with round-to-nearest (GPU) and < 2^-7 when the interpreter truncates, and the dot's
  products carry <= 2^-10 relative error (tf32; the hi/lo form's ~2^-14 is inside it). fp32: exact products,
  (M + 8) fp32 roundings of the absolute terms at most.
* dphi (fp32) = sum over tokens of x dp. bf16 streams multiply X by dp's bf16 hi + lo halves, which keep dp to
  2^-16 relative (2^-14 if the interpreter truncates both conversions); fp32 streams multiply exactly. Both
  add (T + 8) fp32 roundings of |x|^T |dp| for the accumulation and the sum over token splits.
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

    from mhc_compile.kernels import tma

    pb = interpreted_kernels()["triton_proj_bwd"]

T = 37  # tokens of every case (the dphi bound's accumulation length: an upper bound for shorter inputs)
EPS32 = 2.0 ** -24


def _inputs(n, c, dtype, seed, with_acc=True, with_pre=True):
    g = torch.Generator().manual_seed(seed)
    m = ref.num_coeffs(n)
    x = torch.randn(T, n, c, generator=g).to(dtype)
    phi = torch.randn(n * c, m, generator=g) / (n * c) ** 0.5
    dp = torch.randn(T, m, generator=g)
    dsq = torch.randn(T, generator=g)
    h_pre = torch.rand(T, n, generator=g) if with_pre else None
    dout = torch.randn(T, c, generator=g).to(dtype) if with_pre else None
    acc = torch.randn(T, n, c, generator=g).to(dtype) if with_acc else None
    return x, phi, dp, dsq, h_pre, dout, acc


def _d(t):
    return None if t is None else t.double()


def _expected(x, phi, dp, dsq, h_pre, dout, acc):
    """(dx, dphi) in float64 and the absolute sums their error bounds scale with: (|dot terms|, |all terms|,
    |x|^T |dp|)."""
    t, n, c = x.shape
    xd, phid, dpd, dsqd = x.double(), phi.double(), dp.double(), dsq.double()
    if h_pre is not None:
        dx, dphi = ref.proj_pre_backward(xd, phid, dpd, dsqd, _d(h_pre), _d(dout), _d(acc))
    else:
        dx, dphi = ref.proj_backward(xd, phid, dpd, dsqd)
        if acc is not None:
            dx = dx + acc.double()
    dot_abs = (dpd.abs() @ phid.abs().T).reshape(t, n, c)
    all_abs = dot_abs + 2 * dsqd.abs()[:, None, None] * xd.abs()
    if h_pre is not None:
        all_abs = all_abs + h_pre.double().abs()[:, :, None] * dout.double().abs()[:, None, :]
    if acc is not None:
        all_abs = all_abs + acc.double().abs()
    return dx, dphi, dot_abs, all_abs, xd.reshape(t, -1).abs().T @ dpd.abs()


def _within(name, got, want, bound):
    excess = (got.double() - want).abs() - bound
    assert excess.max() <= 0, f"{name}: error exceeds its bound by {excess.max().item():.3g}"


def _check(got, expected, dtype):
    dx, dphi = got
    dx_ref, dphi_ref, dot_abs, all_abs, xdp_abs = expected
    m = dphi_ref.shape[1]
    assert dx.dtype == dtype and dx.shape == dx_ref.shape
    assert dphi.dtype == torch.float32 and dphi.shape == dphi_ref.shape
    if dtype == torch.bfloat16:
        dx_bound = 2.0 ** -7 * dx_ref.abs() + 1.01 * (2.0 ** -10 * dot_abs + (m + 8) * EPS32 * all_abs)
        dphi_rel = 2.0 ** -14
    else:
        dx_bound = (m + 8) * EPS32 * all_abs
        dphi_rel = 0.0
    _within("dx", dx, dx_ref, dx_bound + 1e-30)
    _within("dphi", dphi, dphi_ref, (dphi_rel + (T + 8) * EPS32) * xdp_abs + 1e-30)


# (n, C, dtype, kernel options, with acc): BK | C takes ONE_STREAM; C = 24 or BK > C the gather path;
# splits = 2 sums dphi partials on the host; bt = 16 leaves a 5-token tail tile after two whole ones
CASES = [
    (4, 64, torch.bfloat16, dict(bt=16, bk=64), True),
    (4, 64, torch.bfloat16, dict(bt=16, bk=16, splits=2), False),
    (4, 64, torch.float32, dict(bt=16, bk=64, splits=2), True),
    (4, 64, torch.float32, dict(bt=32, bk=128), False),
    (3, 24, torch.bfloat16, dict(bt=16, bk=16, splits=2), True),
    (3, 24, torch.float32, dict(bt=16, bk=32), False),
    (1, 24, torch.float32, dict(bt=16, bk=16, splits=2), True),
    (1, 24, torch.bfloat16, dict(bt=64, bk=32), False),
    (1, 64, torch.bfloat16, dict(bt=16, bk=64), True),
    (1, 64, torch.float32, dict(bt=16, bk=16, splits=3), False),
    # pipeline_all: the token loop a tl.range with its own num_stages (same values; the GPU build differs)
    (4, 64, torch.bfloat16, dict(bt=16, bk=64, num_stages=2, pipeline_all=True), True),
    (3, 24, torch.bfloat16, dict(bt=16, bk=16, splits=2, pipeline_all=True), False),
    (1, 64, torch.float32, dict(bt=16, bk=32, pipeline_all=True), True),
    # tma: X, dout, acc and dX through tensor descriptors (rows past T: zero reads, dropped writes)
    (4, 64, torch.bfloat16, dict(bt=16, bk=64, tma=True), True),
    (4, 64, torch.bfloat16, dict(bt=16, bk=16, splits=2, num_stages=2, pipeline_all=True, tma=True), False),
]
IDS = [f"n{n}C{c}-{str(d)[6:]}-" + "-".join(f"{k}{v}" for k, v in o.items()) + ("-acc" if a else "")
       for n, c, d, o, a in CASES]


@pytest.mark.parametrize("n,c,dtype,opts,with_acc", CASES, ids=IDS)
def test_fused_matches_reference(n, c, dtype, opts, with_acc):
    inputs = _inputs(n, c, dtype, seed=n * 100 + c, with_acc=with_acc)
    _check(pb.proj_pre_backward_fused(*inputs, **opts), _expected(*inputs), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_acc", [False, True], ids=["no_acc", "acc"])
def test_fused_without_pre_term_is_proj_backward(dtype, with_acc):
    """h_pre and dout absent (HAS_PRE off): proj_backward's dx (+ acc) and dphi."""
    inputs = _inputs(3, 24, dtype, seed=7, with_acc=with_acc, with_pre=False)
    _check(pb.proj_pre_backward_fused(*inputs, bt=16, bk=32, splits=2), _expected(*inputs), dtype)


@pytest.mark.parametrize("with_pre", [True, False], ids=["pre", "no_pre"])
@pytest.mark.parametrize("with_acc", [True, False], ids=["acc", "no_acc"])
def test_tma_is_the_pointer_kernel(with_pre, with_acc):
    """The TMA build computes what the pointer loads do, bit for bit (same arithmetic, same order); the plan takes
    it only where it may: bf16, K blocks inside one stream, whole K blocks."""
    inputs = _inputs(4, 64, torch.bfloat16, seed=21, with_acc=with_acc, with_pre=with_pre)
    for opts in (dict(bt=16, bk=32), dict(bt=64, bk=64, splits=2, pipeline_all=True)):
        want = pb.proj_pre_backward_fused(*inputs, **opts)
        got = pb.proj_pre_backward_fused(*inputs, **opts, tma=True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
    plan = dict(bt=16, bk=32, num_warps=4, num_stages=2, maxnreg=None, tma=True)
    f32, bf16 = torch.float32, torch.bfloat16
    assert pb._launch_plan(T, 4, 64, 24, bf16, f32, True, True, **plan)[2]["TMA"]
    assert not pb._launch_plan(T, 4, 64, 24, f32, f32, True, True, **plan)[2]["TMA"]  # fp32 stream
    assert not pb._launch_plan(T, 3, 24, 15, bf16, f32, True, True, **plan)[2]["TMA"]  # block across streams
    assert not tma.tma_ok(torch.empty(T, 4, 60, dtype=bf16))  # rows not 16-byte multiples
    assert not tma.tma_ok(torch.empty(T * 4 * 64 + 1, dtype=bf16)[1:].view(T, 4, 64))  # base not 16-byte aligned
    assert tma.tma_ok(torch.empty(T, 4, 64, dtype=bf16))


def test_tma_only_where_the_gpu_has_it(monkeypatch):
    """Descriptors on Hopper (sm_90) and later; an Ampere GPU keeps the pointer loads."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    tma.has_tma.cache_clear()
    try:
        assert not tma.has_tma(torch.device("cuda", 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        tma.has_tma.cache_clear()
        assert tma.has_tma(torch.device("cuda", 0))
        assert tma.has_tma(torch.device("cpu"))  # the interpreter
    finally:
        tma.has_tma.cache_clear()


def test_fewer_tokens_than_a_tile_and_no_tokens():
    """T below BT (only the masked tail tile runs) and T = 0 (no launch)."""
    x, phi, dp, dsq, h_pre, dout, acc = _inputs(4, 64, torch.bfloat16, seed=3)
    few = (x[:5], phi, dp[:5], dsq[:5], h_pre[:5], dout[:5], acc[:5])
    _check(pb.proj_pre_backward_fused(*few, bt=64, bk=64), _expected(*few), torch.bfloat16)
    dx, dphi = pb.proj_pre_backward_fused(x[:0], phi, dp[:0], dsq[:0], h_pre[:0], dout[:0], acc[:0])
    assert dx.shape == (0, 4, 64) and torch.equal(dphi, torch.zeros_like(phi))


def test_plan_splits_fills_whole_waves():
    cpu = torch.device("cpu")  # the interpreter's 4 "SMs"
    # 7 K blocks, one program an SM: 1-3 splits leave 1/8 of the slots idle at the tail, 4 splits (28
    # programs = 7 waves) none
    assert pb.plan_splits(10_000, 64, 7, waves=8, occupancy=1, device=cpu) == (4, 2560)
    # ... unless a split's dphi partial costs more than the idle slots: 10 % of the kernel's bytes a split
    assert pb.plan_splits(10_000, 64, 7, waves=8, occupancy=1, device=cpu, split_cost=0.1)[0] == 1
    # ties go to fewer splits; never more splits than token tiles; an explicit count wins
    assert pb.plan_splits(10_000, 64, 4, waves=8, occupancy=1, device=cpu)[0] == 1
    assert pb.plan_splits(100, 64, 1, waves=64, occupancy=1, device=cpu)[0] == 2
    assert pb.plan_splits(1000, 16, 3, waves=1, occupancy=1, device=cpu, splits=5) == (5, 208)


if not _INTERPRETED:
    # triton was imported before this module without the interpreter: run every test above in a subprocess
    for _name in [k for k in list(globals()) if k.startswith("test_")]:
        del globals()[_name]

    from interpreter_rerun import rerun_in_subprocess

    test_in_interpreter_subprocess = rerun_in_subprocess(__file__)
