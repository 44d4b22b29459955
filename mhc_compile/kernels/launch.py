"""Triton launches with less host work a call: each compiled kernel is kept per call signature and launched directly.

``kernel[grid](*args, **meta)`` (``JITFunction.run``) does, every call: read the current device and stream, bind
and specialize every argument (dtype and 16-byte alignment of each pointer, each int's class), build a cache key
string, look the compiled kernel up, check the kernel's globals, build launch metadata, and launch. On the H200
machine's CPU that path cost ~47 us a launch under cProfile, ~4 ms of a d = 2048 training step's host time at
8 sites (benchmarks/results/host-2026-12-02-h200-s10-call1.md), for kernels that run a few microseconds.

``launch`` keeps, per (kernel, device, constexprs, compile options, argument classes), the ``CompiledKernel`` that the
first such call compiled or found, and later calls hand it to the kernel's launcher (``CompiledKernel.run``, what
``JITFunction.run`` ends with). The argument classes mirror Triton's specialization and are at least as fine
(``_arg_key``): a pointer's dtype and 16-byte alignment; an int's value 1, divisibility by 16 and width class; the
type of a bool, float or None. A call whose classes differ takes Triton's path once, which compiles or finds the
right kernel, and is then cached too. On an H200 every op's outputs are bit-equal to Triton's path
(benchmarks/launch_check.py). The Gluon kernels (``kernels/gluon_*.py``, whose first arguments are Gluon TMA
descriptors) launch through it too: on an H100 (session 49, ``launch_check.py --quick --gluon``) every op's outputs
were bit-equal with them on it, and the host saved 381 us over one call of each op (``enable_gluon(False)`` puts
them back on Triton's path).

Triton's path is taken every time when:
- a launch hook is set (``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook`` hold a call: a profiler such as
  proton wants its metadata). With none set the launcher is given no hooks and no launch metadata; Triton's own
  path gives it empty hook chains, which call nothing;
- the first argument is not a CUDA tensor or a TMA descriptor of one (the interpreter, ``TRITON_INTERPRET=1``,
  runs on CPU tensors);
- an argument is unhashable, or the call's constexprs do not complete the kernel's parameters after its
  positional arguments;
- ``enable(False)`` was called (``MHC_COMPILE_TRITON_FAST_LAUNCH=0`` in the environment at import does the same);
- the first argument is a Gluon descriptor and ``enable_gluon(False)`` was called (``MHC_COMPILE_GLUON_FAST_LAUNCH=0``
  at import does the same).

With ``num_stages`` and ``shrink_stages`` (the default), a kernel that does not fit the GPU's shared memory is
retried with fewer stages (``OutOfResources``), once per signature; the stage count that fits is what is kept.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

try:  # Triton >= 3.4; older versions have no launch hooks to respect here
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - depends on the installed Triton
    _knobs = None
try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    _TensorDescriptor = None
try:  # Gluon's, which also carry their shared-memory layout (the Gluon kernels' TMA operands)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as _GluonDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    _GluonDescriptor = None

_I32_MIN, _I32_MAX, _U64_MIN = -(2**31), 2**31 - 1, 2**63

_enabled = os.environ.get("MHC_COMPILE_TRITON_FAST_LAUNCH", "1") != "0"
# the Gluon kernels (a Gluon descriptor first) on the direct path too: built in session 47, on by default since an
# H100 found every op bit-equal to Triton's path with it (session 49, benchmarks/launch_check.py --gluon)
_gluon_enabled = os.environ.get("MHC_COMPILE_GLUON_FAST_LAUNCH", "1") != "0"
# (kernel, device, constexprs, compile options, argument classes) -> (launcher, function handle, packed metadata,
# the constexpr values after the positional arguments in the kernel's parameter order, the CompiledKernel)
_LAUNCHERS: dict[tuple, tuple] = {}
# (kernel, constexprs, compile options) -> stages that fit this GPU's shared memory (after an OutOfResources)
_STAGES_THAT_FIT: dict[tuple, int] = {}
# what Triton's CUDA driver reads (get_current_device / get_current_stream), without its Python wrappers; module
# names so that tests can stand in for a GPU
_get_device = getattr(torch._C, "_cuda_getDevice", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def interpreter_index_fix(interpreter=None) -> bool:
    """Give Triton 3.6's interpreter (the Triton torch 2.11 pins) the scalar indexing later Tritons have; True if it
    needed it. It reads a scalar's ``__index__`` as ``int()`` of a one-element array, which NumPy 2.4 refuses, so
    every ``range()`` over a bound computed from ``tl.program_id`` failed ("only 0-dimensional arrays can be
    converted to Python scalars"; session 35, the GPU machine's interpreter). Later Tritons squeeze the array first;
    this wraps the interpreter's tensor patching to do the same, and leaves any other interpreter alone. Applied at
    import under ``TRITON_INTERPRET=1`` (every kernel here is launched after that)."""
    import inspect

    if interpreter is None:
        from triton.runtime import interpreter
    plain = getattr(interpreter, "_patch_lang_tensor", None)
    try:
        old = plain is not None and "int(self.handle.data))" in inspect.getsource(plain)
    except (OSError, TypeError):  # no source to read: leave it as is
        old = False
    if not old:
        return False

    def patch_lang_tensor(tensor, scope):
        plain(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if os.environ.get("TRITON_INTERPRET") == "1":
    interpreter_index_fix()


def _on_gpu(args: tuple) -> bool:
    if not args:
        return False
    first = args[0]
    if not isinstance(first, Tensor) and type(first) in (_TensorDescriptor, _GluonDescriptor):
        first = first.base  # a Gluon kernel's first argument is a descriptor
    return isinstance(first, Tensor) and first.is_cuda


def enable(on: bool = True) -> None:
    """Turn the direct launch path on or off (off: every launch goes through ``kernel[grid](...)``)."""
    global _enabled
    _enabled = bool(on)


def enable_gluon(on: bool = True) -> None:
    """Let the Gluon kernels' launches (first argument a Gluon descriptor) take the direct path too, where it is
    on (on by default: ``MHC_COMPILE_GLUON_FAST_LAUNCH=0`` in the environment at import turns it off)."""
    global _gluon_enabled
    _gluon_enabled = bool(on)


def _gluon_held_back(args: tuple) -> bool:
    return not _gluon_enabled and bool(args) and _GluonDescriptor is not None and type(args[0]) is _GluonDescriptor


def _int_class(a: int) -> tuple:
    return (a == 1, a % 16 == 0, _I32_MIN <= a <= _I32_MAX, a >= _U64_MIN)


def _arg_key(args: tuple) -> tuple:
    """Classes of the positional arguments, at least as fine as Triton's specialization of them, so that one class
    never stands for two compiled kernels (native_specialize_impl, BaseBackend.get_{int,tensor}_specialization):
    a pointer's dtype and 16-byte alignment; an int's value 1, divisibility by 16, i32 / i64 / u64 range; a TMA
    descriptor's dtype, block shape, padding and rounding (what Triton specializes it on; a Gluon descriptor's
    shared-memory layout too), its base's alignment and the classes of its shape and strides (which the launcher
    passes on as ints); the type of a bool, float
    or None; any other value itself (a TypeError if unhashable: then Triton's path). The launcher itself turns a
    descriptor into the kernel's arguments (the CUDA tensor map, its shape and strides) at every launch."""
    key = []
    for a in args:
        if isinstance(a, Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif type(a) is int:
            key.append(_int_class(a))
        elif _TensorDescriptor is not None and type(a) is _TensorDescriptor:
            key.append(("tensordesc", a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.block_shape),
                        getattr(a, "padding", None), getattr(a, "round_f32_to_tf32", None),
                        tuple(_int_class(int(v)) for v in (*a.shape, *a.strides))))
        elif _GluonDescriptor is not None and type(a) is _GluonDescriptor:  # its layout is specialized on too
            key.append(("gluon tensordesc", a.base.dtype, a.base.data_ptr() % 16 == 0, tuple(a.block_shape),
                        a.layout, a.padding, tuple(_int_class(int(v)) for v in (*a.shape, *a.strides))))
        elif a is None or type(a) in (bool, float):
            key.append(type(a))
        else:
            key.append((type(a), a))
    return tuple(key)


def _hook_active(hook) -> bool:
    """Triton >= 3.5 keeps launch hooks as HookChain objects (never None; active when they hold calls), older
    versions as a function or None."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _hooks_set() -> bool:
    return _knobs is not None and (
        _hook_active(_knobs.runtime.launch_enter_hook) or _hook_active(_knobs.runtime.launch_exit_hook)
    )


def _constexpr_tail(kernel, n_args: int, meta: dict) -> tuple | None:
    """The values of the kernel's parameters after its ``n_args`` positional ones, from ``meta`` or the parameter
    defaults, in parameter order (what Triton's binder passes the launcher); None if ``meta`` names a parameter
    outside them or leaves one without a value."""
    params = getattr(kernel, "params", None)
    if params is None or len(params) < n_args:
        return None
    rest = params[n_args:]
    if not set(meta) <= {p.name for p in rest}:
        return None
    if any(p.name not in meta and not p.has_default for p in rest):
        return None
    return tuple(meta[p.name] if p.name in meta else p.default for p in rest)


def _launch_slow(kernel, grid, args: tuple, meta: dict, options: dict, shrink_stages: bool):
    """Triton's own path, dropping pipeline stages while the tile does not fit the GPU's shared memory (with
    ``shrink_stages``); returns what ``kernel[grid]`` returns (the CompiledKernel on a GPU, None under the
    interpreter)."""
    if not shrink_stages or "num_stages" not in options:
        return kernel[grid](*args, **meta, **options)
    fit_key = (kernel, tuple(meta.items()), tuple(options.items()))
    stages = _STAGES_THAT_FIT.get(fit_key, options["num_stages"])
    while True:
        try:
            compiled = kernel[grid](*args, **meta, **{**options, "num_stages": stages})
        except OutOfResources:
            if stages <= 1:
                raise
            stages -= 1
            continue
        _STAGES_THAT_FIT[fit_key] = stages
        return compiled


def launch(kernel, grid: tuple, args: tuple, meta, shrink_stages: bool = True, **options):
    """``kernel[grid](*args, **meta, **options)``, through the cached launcher when this call's signature was
    launched before. ``args``: the runtime arguments in parameter order, the first a tensor; ``meta``: the
    constexprs after them; ``options``: compile options (num_warps, num_stages, maxnreg ...). With num_stages and
    ``shrink_stages``, a tile that does not fit the GPU's shared memory is retried with fewer stages (otherwise
    the OutOfResources reaches the caller). Returns the CompiledKernel (None under the interpreter)."""
    if not (_enabled and _on_gpu(args)) or _hooks_set() or _gluon_held_back(args):
        return _launch_slow(kernel, grid, args, meta, options, shrink_stages)
    device = _get_device()
    try:
        key = (kernel, device, tuple(meta.items()), tuple(options.items()), _arg_key(args))
        entry = _LAUNCHERS.get(key)
    except TypeError:  # an unhashable argument
        return _launch_slow(kernel, grid, args, meta, options, shrink_stages)
    if entry is not None:
        run, function, packed, tail, compiled = entry
        g = (*grid, 1, 1)
        # CompiledKernel.run is the launcher JITFunction.run ends with: (grid, stream, function, packed metadata,
        # launch metadata, enter hook, exit hook, every parameter's value); with no hooks there is no metadata
        run(g[0], g[1], g[2], _get_stream(device), function, packed, None, None, None, *args, *tail)
        return compiled
    compiled = _launch_slow(kernel, grid, args, meta, options, shrink_stages)
    tail = _constexpr_tail(kernel, len(args), meta)
    if tail is not None and all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        _LAUNCHERS[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail, compiled)
    return compiled  # (a call this path cannot replay takes Triton's path every time)


def cached_launchers() -> int:
    """How many call signatures launch directly (for tests and benchmarks)."""
    return len(_LAUNCHERS)
