"""kernels/launch.py: the cached direct launch path against Triton's own (``kernel[grid](...)``).

No GPU here: a stand-in kernel plays Triton's JITFunction (``params``, ``kernel[grid](...)`` returning a compiled
kernel) and module hooks stand in for the CUDA device and stream. What is checked is the contract the GPU path
relies on: the first call of a signature takes Triton's path, later ones call the compiled kernel's launcher with
every parameter in order; any argument class Triton specializes on is part of the key.
"""

from __future__ import annotations

import inspect
import os
import sys

import pytest
import torch
from triton.runtime.errors import OutOfResources

from mhc_compile.kernels import launch as L

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/


class _Param:
    def __init__(self, name, default=None, has_default=False):
        self.name, self.default, self.has_default = name, default, has_default


class _Compiled:
    def __init__(self, log):
        self.function, self.packed_metadata, self.log = object(), ("packed",), log

    def run(self, *args):
        self.log.append(("direct", args))


class _Kernel:
    """A JITFunction stand-in: parameters x_ptr, T, BT (constexpr), FLAG (constexpr, default False)."""

    def __init__(self):
        self.params = [_Param("x_ptr"), _Param("T"), _Param("BT"), _Param("FLAG", False, True)]
        self.log, self.compiled = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            self.compiled.append(_Compiled(self.log))
            return self.compiled[-1]

        return run


@pytest.fixture
def fake_gpu(monkeypatch):
    """Every tensor counts as a CUDA tensor on device 0, stream 77; the launcher cache starts empty."""
    monkeypatch.setattr(L, "_on_gpu", lambda args: True)
    monkeypatch.setattr(L, "_get_device", lambda: 0)
    monkeypatch.setattr(L, "_get_stream", lambda device: 77)
    monkeypatch.setattr(L, "_enabled", True)
    L._LAUNCHERS.clear()
    yield
    L._LAUNCHERS.clear()


def test_second_call_goes_to_the_launcher_with_every_parameter_in_order(fake_gpu):
    k, x = _Kernel(), torch.zeros(64)
    L.launch(k, (3,), (x, 37), {"BT": 16}, num_warps=4)
    L.launch(k, (5, 2), (x, 45), {"BT": 16}, num_warps=4)  # 45: same class as 37 (i32, not 1, not % 16)
    assert [e[0] for e in k.log] == ["triton", "direct"]
    assert k.log[0][1:] == ((3,), (x, 37), {"BT": 16, "num_warps": 4})
    compiled = k.compiled[0]
    # grid padded to 3-D, the stream, the compiled function, its packed metadata, no launch metadata or hooks,
    # then every parameter: the runtime arguments, BT from meta and FLAG's default
    assert k.log[1][1] == (5, 2, 1, 77, compiled.function, compiled.packed_metadata, None, None, None, x, 45, 16,
                           False)
    assert L.cached_launchers() == 1


@pytest.mark.parametrize("change", ["alignment", "dtype", "int_one", "int_div16", "int_i64", "meta", "warps"])
def test_any_specialized_difference_takes_triton_path_again(fake_gpu, change):
    k, x = _Kernel(), torch.zeros(64)
    args, meta, opts = (x, 37), {"BT": 16}, {"num_warps": 4}
    L.launch(k, (1,), args, meta, **opts)
    if change == "alignment":
        args = (x[1:], 37)  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args = (x.to(torch.bfloat16), 37)
    elif change == "int_one":
        args = (x, 1)
    elif change == "int_div16":
        args = (x, 48)
    elif change == "int_i64":
        args = (x, 2**31 + 1)
    elif change == "meta":
        meta = {"BT": 32}
    elif change == "warps":
        opts = {"num_warps": 8}
    L.launch(k, (1,), args, meta, **opts)
    L.launch(k, (1,), args, meta, **opts)
    assert [e[0] for e in k.log] == ["triton", "triton", "direct"]
    assert k.log[2][1][-4:-2] == args  # the new signature's own compiled kernel, replayed
    assert k.log[2][1][4] is k.compiled[1].function


def test_triton_path_when_disabled_hooked_or_unreplayable(fake_gpu, monkeypatch):
    k, x = _Kernel(), torch.zeros(64)
    L.enable(False)
    try:
        for _ in range(2):
            L.launch(k, (1,), (x, 3), {"BT": 16})
    finally:
        L.enable(True)
    monkeypatch.setattr(L, "_hooks_set", lambda: True)  # a profiler's launch hooks want Triton's metadata
    for _ in range(2):
        L.launch(k, (1,), (x, 3), {"BT": 16})
    monkeypatch.undo()
    monkeypatch.setattr(L, "_on_gpu", lambda args: True)
    monkeypatch.setattr(L, "_get_device", lambda: 0)
    monkeypatch.setattr(L, "_get_stream", lambda device: 77)
    for _ in range(2):  # a constexpr the kernel does not have: nothing to replay
        L.launch(k, (1,), (x, 3), {"BT": 16, "NOPE": 1})
    k2 = _Kernel()
    k2.params = k2.params[:3] + [_Param("FLAG")]  # FLAG without a default and not given
    for _ in range(2):
        L.launch(k2, (1,), (x, 3), {"BT": 16})
    assert [e[0] for e in k.log + k2.log] == ["triton"] * 8
    assert L.cached_launchers() == 0


def test_cpu_tensors_take_triton_path():
    """The interpreter's case: CPU tensors never reach the launcher cache."""
    k, x = _Kernel(), torch.zeros(64)
    L._LAUNCHERS.clear()
    for _ in range(2):
        L.launch(k, (1,), (x, 3), {"BT": 16})
    assert [e[0] for e in k.log] == ["triton", "triton"] and L.cached_launchers() == 0


def test_stages_shrink_when_shared_memory_runs_out_and_the_fit_is_remembered():
    calls = []

    class Tight:
        params = [_Param("BT")]

        def __getitem__(self, grid):
            def run(*args, num_warps, num_stages, **meta):
                calls.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(300_000, 232_448, "shared memory")

            return run

    kernel = Tight()
    L.launch(kernel, (1,), (), {"BT": 16}, num_warps=4, num_stages=4)
    L.launch(kernel, (1,), (), {"BT": 16}, num_warps=4, num_stages=4)
    assert calls == [4, 3, 2, 2]
    with pytest.raises(OutOfResources):  # shrink_stages=False: the caller picks the fallback
        L.launch(kernel, (1,), (), {"BT": 32}, shrink_stages=False, num_warps=4, num_stages=4)


def test_arg_key_is_at_least_as_fine_as_tritons_specialization():
    """Two arguments with one key must get one Triton specialization (else one cached launcher would serve
    two compiled kernels). Checked against Triton's own specializer on ints around every boundary it uses, on
    tensors of several dtypes and alignments, bools, floats and None."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64, dtype=torch.float32)
    values = [None, True, False, 0.5, 3.0, *(torch.zeros(8, dtype=d) for d in (torch.bfloat16, torch.float16))]
    values += [base, base[1:], base[4:], base[2:].view(torch.bfloat16)]
    for edge in (0, 1, 2, 15, 16, 17, 2**31, 2**32, 2**63, 2**64 - 16):
        values += [edge - 1, edge, edge + 1, -edge]
    # TMA descriptors: dtypes, block shapes, shapes and strides, bases of either alignment
    from triton.tools.tensor_descriptor import TensorDescriptor

    for dtype in (torch.bfloat16, torch.float32):
        flat = torch.zeros(64 * 128 + 8, dtype=dtype)
        for rows, cols in ((64, 128), (37, 128), (16, 64)):
            for off in (0, 8):
                for block in ([16, 32], [16, 64]):
                    values.append(TensorDescriptor.from_tensor(flat[off:off + rows * cols].view(rows, cols), block))
    values = [v for v in values if not isinstance(v, int) or -(2**63) <= v < 2**64]
    groups = {}
    for v in values:
        spec = native_specialize_impl(BaseBackend, v, False, True, True)
        groups.setdefault(L._arg_key((v,)), set()).add(spec)
    for key, specs in groups.items():
        assert len(specs) == 1, (key, specs)
    # the descriptors were keyed, not left unhashable (which would send them down Triton's path every call)
    assert any(isinstance(k[0], tuple) and k[0][0] == "tensordesc" for k in groups)


def _signature_tail_complete(kernel, n_args: int, meta) -> bool:
    """Under the interpreter kernels have no ``params``: the same check as _constexpr_tail from the Python
    signature (annotations are strings: the kernel modules use postponed evaluation)."""
    params = list(inspect.signature(kernel.fn).parameters.values())
    is_constexpr = ["constexpr" in str(p.annotation) for p in params]
    rest = params[n_args:]
    return (not any(is_constexpr[:n_args]) and set(meta) <= {p.name for p in rest}
            and all(p.name in meta or p.default is not inspect.Parameter.empty for p in rest))


def test_every_launch_of_the_ops_is_replayable(monkeypatch):
    """Each launch the ops make (all of triton_ops', proj's one-pass backward, triton_fused's enter / step and
    backwards; bf16 and fp32) passes its runtime arguments positionally and constexprs that complete the
    kernel's parameters: on a GPU every one of them is cached, none left on Triton's path."""
    from benchmarks.launch_check import cases  # every op's call, on fresh inputs (what the GPU check runs)
    from mhc_compile.kernels import triton_fused as tf
    from mhc_compile.kernels import triton_ops as tk
    from mhc_compile.kernels import triton_proj_bwd as tpb
    from launch_spy import patch_launches

    seen = []
    real = L.launch

    def spy(kernel, grid, args, meta, shrink_stages=True, **options):
        seen.append((kernel.fn.__name__, _signature_tail_complete(kernel, len(args), meta)))
        return real(kernel, grid, args, meta, shrink_stages, **options)

    patch_launches(monkeypatch, spy, tf, tpb)
    # the other kernel each of these configurations picks
    alternates = {"post_res_backward": lambda: tk.tuning("post_res_backward", two_d=False),
                  "proj_pre_backward": lambda: tk.tuning("proj_dx_dphi", enabled=False)}
    for dtype in (torch.float32, torch.bfloat16):
        for name, thunk in cases(19, 4, 32, dtype, "cpu"):
            thunk()
            if name in alternates:
                with alternates[name]():
                    thunk()
    names = {name for name, _ in seen}
    assert not [s for s in seen if not s[1]], [s for s in seen if not s[1]]
    assert {"_proj_fwd_kernel", "_coeffs_fwd_kernel", "_coeffs_bwd_kernel", "_pre_fwd_kernel", "_pre_bwd_kernel",
            "_post_res_fwd_kernel", "_post_res_bwd_kernel", "_post_res_bwd_2d_kernel", "_post_res_proj_kernel",
            "_proj_dx_kernel", "_proj_dphi_kernel", "_proj_dx_dphi_kernel", "hi_lo_kernel"} <= names, names
    assert "_dh_pre_kernel" in names, names  # triton_fused's own


def test_launching_names_every_kernel_module_behind_triton_ops():
    """A spy or a build check that patches ``launch`` in ``triton_ops.LAUNCHING`` sees every launch of the ops'
    kernel modules: each triton_* module that binds ``launch`` is listed there, except the two that callers name
    on their own (proj's one-pass backward and the fused enter / step)."""
    import importlib
    import pathlib

    from mhc_compile.kernels import triton_ops

    folder = pathlib.Path(triton_ops.__file__).parent
    binding = []
    for path in sorted(folder.glob("triton_*.py")):
        module = importlib.import_module(f"mhc_compile.kernels.{path.stem}")
        if getattr(module, "launch", None) is L.launch:
            binding.append(path.stem)
    listed = sorted(m.__name__.rsplit(".", 1)[1] for m in triton_ops.LAUNCHING)
    assert sorted(set(binding) - {"triton_proj_bwd", "triton_fused"}) == listed, (binding, listed)


def test_launch_hooks_count_only_when_they_hold_calls():
    """Triton 3.5+ keeps launch hooks as HookChains that are never None: empty ones are no hooks (the launcher
    would call nothing), a chain with a call (a profiler) sends every launch through Triton's path."""
    from triton import knobs

    chain = knobs.runtime.launch_enter_hook
    assert not L._hooks_set()
    chain.add(print)
    try:
        assert L._hooks_set()
    finally:
        chain.remove(print)
    assert not L._hooks_set()
    assert L._hook_active(print) and not L._hook_active(None)


def test_interpreter_index_fix_patches_only_the_old_interpreter():
    """Triton 3.6's interpreter with NumPy 2.4: a scalar's __index__ as int() of a one-element array fails; the fix
    wraps the interpreter's tensor patching where it has that line, and leaves other interpreters alone."""
    import types

    import numpy as np

    from mhc_compile.kernels.launch import interpreter_index_fix

    set_attrs = {}

    class Scope:
        def set_attr(self, obj, name, value):
            set_attrs[name] = value

    def _patch_lang_tensor(tensor, scope):  # the old interpreter's line, as Triton 3.6 has it
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    old = types.SimpleNamespace(_patch_lang_tensor=_patch_lang_tensor)
    assert interpreter_index_fix(old) and old._patch_lang_tensor is not _patch_lang_tensor
    old._patch_lang_tensor(object, Scope())
    scalar = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([7], dtype=np.int32)))
    assert set_attrs["__index__"](scalar) == 7 and range(set_attrs["__index__"](scalar))[-1] == 6

    def _patch_lang_tensor_new(tensor, scope):  # a later interpreter's line
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    new = types.SimpleNamespace(_patch_lang_tensor=_patch_lang_tensor_new)
    assert not interpreter_index_fix(new) and new._patch_lang_tensor is _patch_lang_tensor_new
    assert not interpreter_index_fix(types.SimpleNamespace())


def test_arg_key_keys_gluon_descriptors_at_least_as_finely_as_triton():
    """The Gluon kernels' TMA operands are Gluon descriptors, which Triton also specializes on their shared-memory
    layout: one key must never stand for two of its specializations, and they are keyed (not left unhashable)."""
    gluon_hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.experimental.gluon.language import NVMMASharedLayout

    values = []
    for dtype, bits in ((torch.bfloat16, 16), (torch.float32, 32)):
        flat = torch.zeros(64 * 128 + 8, dtype=dtype)
        for rows, cols in ((64, 128), (37, 128)):
            for off in (0, 8):
                for block in ([8, 64], [16, 64]):  # at least the swizzle's width in elements
                    for swizzle in (64, 128):
                        view = flat[off:off + rows * cols].view(rows, cols)
                        values.append(gluon_hopper.TensorDescriptor.from_tensor(
                            view, block, NVMMASharedLayout(swizzle, bits)))
    groups = {}
    for v in values:
        groups.setdefault(L._arg_key((v,)), set()).add(native_specialize_impl(BaseBackend, v, False, True, True))
    assert all(len(specs) == 1 for specs in groups.values()), groups
    assert all(k[0][0] == "gluon tensordesc" for k in groups) and len(groups) > 1
    assert not L._on_gpu((values[0],))  # a descriptor of a CPU tensor: Triton's path (the interpreter's)


def test_gluon_launches_take_the_direct_path_only_once_enabled(fake_gpu, monkeypatch):
    """A launch whose first argument is a Gluon descriptor stays on Triton's path after ``enable_gluon(False)``;
    enabled (the default) it is cached and replayed like any other."""
    assert L._gluon_enabled or os.environ.get("MHC_COMPILE_GLUON_FAST_LAUNCH") == "0"
    gluon_hopper = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon.language import NVMMASharedLayout

    desc = gluon_hopper.TensorDescriptor.from_tensor(torch.zeros(64, 128, dtype=torch.bfloat16), [16, 64],
                                                     NVMMASharedLayout(128, 16))
    monkeypatch.setattr(L, "_gluon_enabled", False)
    k = _Kernel()
    for t in (37, 45):
        L.launch(k, (3,), (desc, t), {"BT": 16}, shrink_stages=False)
    assert [e[0] for e in k.log] == ["triton", "triton"] and L.cached_launchers() == 0
    L.enable_gluon(True)
    k = _Kernel()
    for t in (37, 45):
        L.launch(k, (3,), (desc, t), {"BT": 16}, shrink_stages=False)
    assert [e[0] for e in k.log] == ["triton", "direct"] and L.cached_launchers() == 1
    assert k.log[1][1][9:] == (desc, 45, 16, False)


class _StopAtGluonLaunch(Exception):
    pass


def _gluon_launch_spy(seen):
    """Stands in for ``launch`` in a Gluon kernel module: records the Gluon kernel's launch (kernel, runtime
    arguments, constexprs, options) and stops there; the module's Triton helper launches (token packing) do
    nothing, as their outputs are not looked at."""

    def spy(kernel, grid, args, meta, shrink_stages=True, **options):
        if kernel.fn.__name__.endswith("_ws_kernel"):
            seen.append((kernel, args, meta, options))
            raise _StopAtGluonLaunch
        return None

    return spy


def test_every_gluon_kernel_launch_is_replayable(monkeypatch):
    """Each Gluon kernel (proj, post_res_proj, proj's backward, the step / boundary backward) launches through
    ``launch`` with its runtime arguments positional, Gluon descriptors first, and constexprs that complete the
    kernel's parameters: on an sm_90 GPU the direct path caches every one of them (no call left on Triton's
    ~47 us path). Reached here with the build gates stood in for an sm_90 GPU; each stops at its launch."""
    from mhc_compile.kernels import gluon_post_res_proj as gprp
    from mhc_compile.kernels import gluon_proj as gproj
    from mhc_compile.kernels import gluon_proj_bwd as gpb
    from mhc_compile.kernels import gluon_step_bwd as gs
    from mhc_compile.kernels import reference as ref
    from mhc_compile.kernels import triton_config as tcfg
    from mhc_compile.kernels import triton_post_res_proj as tprp
    from mhc_compile.kernels import triton_proj as tproj

    if not gs.AVAILABLE:
        pytest.skip("the installed Triton has no Gluon")
    seen = []
    spy = _gluon_launch_spy(seen)
    for module, name in ((gproj, "kernel_launch"), (gprp, "kernel_launch"), (gpb, "launch"), (gs, "launch")):
        monkeypatch.setattr(module, name, spy)
    monkeypatch.setattr(gproj, "supported", lambda *args: True)
    monkeypatch.setattr(gprp, "supported", lambda *args: True)
    monkeypatch.setattr(tproj, "tma_ok", lambda *args: True)
    g = torch.Generator().manual_seed(3)
    t, n, c = 256, 4, 128
    m = ref.num_coeffs(n)
    bf = torch.bfloat16
    x = torch.randn(t, n, c, generator=g).to(bf)
    y = torch.randn(t, c, generator=g).to(bf)
    phi = torch.randn(n * c, m, generator=g) * 0.05
    h_res, h_post, h_pre = torch.rand(t, n, n, generator=g), torch.rand(t, n, generator=g), torch.rand(t, n, generator=g)
    dp, dsq = torch.randn(t, m, generator=g), torch.randn(t, generator=g)
    calls = [
        lambda: tproj._proj_ws(tcfg.cfg_of("proj"), x, phi, (t,), t, n * c, m, torch.float32),
        lambda: tprp._post_res_proj_ws(tcfg.cfg_of("post_res_proj"), x, False, h_res, h_post, y, phi,
                                       torch.empty_like(x), torch.float32),
        lambda: gpb.proj_grads(x, phi, dp, dsq, h_pre, y, x.clone()),
        lambda: gs.step_grads(x, h_res, h_post, y, phi, h_pre, dp, dsq, x.clone(), y.clone()),
        lambda: gs.boundary_grads(x, x.clone(), h_res, h_post, y, phi, h_pre, dp, dsq, x.clone(), y.clone(), h_pre),
    ]
    for call in calls:
        with pytest.raises(_StopAtGluonLaunch):
            call()
    assert [k.fn.__name__ for k, *_ in seen] == ["_proj_ws_kernel", "_post_res_proj_ws_kernel", "_proj_bwd_ws_kernel",
                                                 "_step_bwd_ws_kernel", "_step_bwd_ws_kernel"]
    for kernel, args, meta, options in seen:
        assert L._constexpr_tail(kernel, len(args), meta) is not None, kernel.fn.__name__
        key = L._arg_key(args)
        hash(key)
        assert key[0][0] == "gluon tensordesc" and not options, (kernel.fn.__name__, key[0], options)
