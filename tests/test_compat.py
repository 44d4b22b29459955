"""One test per private torch internal wrapped in mhc_compile._compat."""

import pytest
import torch
from torch import nn

from mhc_compile import _compat


def test_frame_locals_reach_the_module_from_a_backend():
    seen = {}

    def backend(gm, inputs):
        seen.update(_compat.dynamo_frame_locals() or {})
        return gm.forward

    m = nn.Linear(3, 3)
    torch.compile(m, backend=backend)(torch.randn(2, 3))
    assert any(v is m for v in seen.values())
    assert _compat.dynamo_frame_locals() is None  # outside a compile


def test_resolve_module_paths():
    outer = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    mod, path = _compat.resolve_module("L['self'].1.1", {"self": outer})
    assert mod is outer and path == "1.1"
    assert _compat.resolve_module("G['x']", {}) is None
    # a decorator's wrapper frame (transformers 5.24's top-level forward): the model is args[0]
    mod, path = _compat.resolve_module("L['args'][0].1[1]", {"args": (outer, 3), "kwargs": {}})
    assert mod is outer and path == "1.1"
    assert _compat.resolve_module("L['args'][2].h", {"args": (outer,)}) is None
    assert _compat.resolve_module("L['args'][0]", {"args": (3,)}) is None
    # detect names sites by the same path below the module
    from mhc_compile.passes.detect import normalize_module_path

    assert normalize_module_path("L['args'][0].1[1]") == "1.1" == normalize_module_path("L['self'].1.1")
    assert normalize_module_path("L['args'][0]") == "" == normalize_module_path("L['self']")


def test_identity_guard_reaches_a_model_held_in_the_wrappers_args():
    """A decorated forward is compiled as the wrapper's frame: the identity guard goes on args[0]."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)

        return wrapper

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        @wrap
        def forward(self, x):
            return self.lin(x)

    guarded = []

    def backend(gm, example_inputs):
        guarded.append(_compat.guard_identity(_compat.dynamo_frame_locals()["args"][0]))
        return gm.forward

    a, b = M(), M()
    x = torch.randn(1, 2)
    torch.compile(a, backend=backend)(x)
    torch.compile(b, backend=backend)(x)
    assert guarded == [True, True]


def test_inner_compilers_and_policy_exist():
    assert callable(_compat.inductor_compile_fx())
    assert callable(_compat.lookup_backend("aot_eager"))
    policy = _compat.checkpoint_policy()
    assert hasattr(policy, "MUST_RECOMPUTE")


def test_recompute_meta_survives_aot_retrace():
    assert {"recompute", "ac_graph_id"} <= set(_compat.meta_fields_copied_to_aot())


def test_backend_compiler_failed_wraps_inner_exception():
    def backend(gm, inputs):
        raise ValueError("boom")

    try:
        torch.compile(lambda x: x + 1, backend=backend)(torch.randn(2))
    except _compat.backend_compiler_failed() as e:
        assert isinstance(e.inner_exception, ValueError)
    else:
        raise AssertionError("expected BackendCompilerFailed")


def test_modules_on_call_stack_finds_callers():
    class Probe(nn.Module):
        def forward(self):
            return _compat.modules_on_call_stack()

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.probe = Probe()

        def forward(self):
            return self.probe()

    outer = Outer()
    found = outer()
    assert found[0] is outer and found[-1] is outer.probe


def test_compiling_code_and_forget_compiled():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    codes = []

    def backend(gm, inputs):
        codes.append(_compat.compiling_code())
        return gm.forward

    def fn(x):
        return x * 2

    torch.compile(fn, backend=backend)(torch.randn(3))
    assert codes == [fn.__code__]
    assert len(_debug_get_cache_entry_list(fn.__code__)) == 1
    _compat.forget_compiled(codes)
    assert len(_debug_get_cache_entry_list(fn.__code__)) == 0
    assert _compat.compiling_code() is None


def test_checkpoint_context_fn_is_found_on_the_region_body():
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE

    found = []

    def backend(gm, inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "checkpoint" in str(node.target):
                found.append(_compat.checkpoint_context_fn(getattr(gm, node.args[0].target)))
        return gm.forward

    lin = nn.Linear(4, 4)
    fn = lambda x: checkpoint(lin, x, use_reentrant=False,  # noqa: E731
                              context_fn=partial(create_selective_checkpoint_contexts, policy))
    torch.compile(fn, backend=backend)(torch.randn(2, 4, requires_grad=True))
    assert found and found[0] is not None


def test_register_inductor_fallbacks_puts_every_op_in_the_lowering_table():
    from torch._inductor.lowering import lowerings

    from mhc_compile.runtime.ops import all_ops, direct_ops

    _compat.register_inductor_fallbacks(all_ops())
    assert all(op in lowerings for op in all_ops())
    _compat.register_inductor_fallbacks(all_ops())  # idempotent
    _compat.register_inductor_fallbacks(all_ops(), calls=direct_ops())  # re-pointed at the twins
    assert all(_compat._FALLBACK_CALLS[op] is direct_ops()[op] for op in all_ops())


def test_size_hint_reads_a_symbolic_size_without_a_guard():
    assert _compat.size_hint(7) == 7
    seen = {}

    def backend(gm, example_inputs):
        x = next(v for v in (n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder")
                 if isinstance(v, torch.Tensor))
        seen["hint"] = _compat.size_hint(x.numel())
        seen["symbolic"] = not isinstance(x.numel(), int)
        return gm.forward

    f = torch.compile(lambda x: x * 2, backend=backend, dynamic=True)
    f(torch.randn(3, 5))
    assert seen == {"hint": 15, "symbolic": True}


class _TwoLayers(nn.Module):
    """User code: Dynamo skips a frame of torch.nn's own modules (an nn.Sequential) under DDP."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture
def world_of_one(tmp_path):
    """A one-rank gloo process group: enough for DDP and for Dynamo's DDPOptimizer, in this process."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_internals_seen_from_a_backend(world_of_one):
    """The active DDP and the parameters it synchronises, and whether DDPOptimizer split the graph: one bucket
    (a small model) reaches the backend whole, a model past DDP's first bucket (1 MB) in pieces."""
    from torch.nn.parallel import DistributedDataParallel

    seen = []

    def backend(gm, inputs):
        seen.append((_compat.active_ddp_module(), _compat.split_by_ddp_optimizer()))
        return gm.forward

    for width, split in ((8, False), (512, True)):  # 2 x 512^2 fp32 = 2 MB
        model = _TwoLayers(width)
        ddp = DistributedDataParallel(model)
        assert [id(p) for p in _compat.ddp_synced_parameters(ddp)] == [id(p) for p in model.parameters()]
        seen.clear()
        torch._dynamo.reset()
        torch.compile(ddp, backend=backend)(torch.randn(2, width))
        assert seen and all(active is ddp and was_split is split for active, was_split in seen), (width, seen)
    assert _compat.active_ddp_module() is None and not _compat.split_by_ddp_optimizer()


def test_ddp_bucket_compiler_splits_a_graph_past_the_first_bucket(world_of_one):
    from torch.nn.parallel import DistributedDataParallel

    assert _compat.optimize_ddp_mode() == "ddp_optimizer"  # Dynamo's default

    model = _TwoLayers(512)
    ddp = DistributedDataParallel(model)
    pieces, counts = [], []

    def backend(gm, inputs):
        compile_split, buckets = _compat.ddp_bucket_compiler(ddp.bucket_bytes_cap, lambda g, i: pieces.append(g) or g)
        compiled = compile_split(gm, inputs)
        counts.append(buckets())
        return compiled

    x = torch.randn(2, 512)
    with torch._dynamo.config.patch(optimize_ddp=False):
        assert _compat.optimize_ddp_mode() == "no_optimization"
        out = torch.compile(ddp, backend=backend)(x)
    assert counts == [2] and len(pieces) == 2
    torch.testing.assert_close(out, model(x))
