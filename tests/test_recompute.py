"""Recompute tags: fewer saved activations, identical gradients, and the L_r rule."""

import pytest
import torch

from mhc_compile.config import MHCConfig
from mhc_compile.passes.recompute import block_size
from models import NanoGPT


@pytest.mark.parametrize("n, sites, want", [(4, 8, 2), (4, 48, 6), (1, 9, 2), (4, 1, 1)])
def test_auto_block_size(n, sites, want):
    assert block_size(MHCConfig(n=n), sites) == want


def test_auto_blocks_follow_the_peak_model_and_forced_blocks_are_uniform():
    from mhc_compile.passes.recompute import block_sizes

    # the 4-layer stack of benchmarks/bench_training.py (8 sites, ~8 activations a site, weight gradients
    # 6 d / T = 1.5 / 3 / 5.25 units a site at d = 2048 / 4096 / 7168): big blocks first
    for wgrad in (1.5, 3.0, 5.25):
        assert block_sizes(MHCConfig(n=4), 8, 8.1, wgrad) == [4, 3, 1]
    assert block_sizes(MHCConfig(n=4), 8, None) == [2, 2, 2, 2]  # no estimate: sqrt(nL / (n + 2)) blocks
    assert block_sizes(MHCConfig(recompute=3), 8, 8.7) == [3, 3, 2]
    assert block_sizes(MHCConfig(recompute="none"), 8, 8.7) == []


def test_explicit_block_sizes_are_used_as_given_and_checked():
    from mhc_compile.passes.recompute import block_sizes

    cfg = MHCConfig(recompute=[4, 3, 1])
    assert cfg.recompute == (4, 3, 1)
    assert block_sizes(cfg, 8, 8.7) == [4, 3, 1]
    with pytest.raises(ValueError, match=r"blocks \[4, 3, 1\] cover 8 sites, but a chain here has 6"):
        block_sizes(cfg, 6, 8.7)
    for bad in ([], [2, 0], [2, "3"], [1.5]):
        with pytest.raises(ValueError, match="recompute"):
            MHCConfig(recompute=bad)


def test_recompute_pass_estimates_activations_and_plans_blocks():
    """NanoGPT (2 sites a layer) through the backend: the report lists the planned blocks, which cover every
    site once, in order, and match cost.block_schedule for the estimated activations."""
    from mhc_compile import cost
    from mhc_compile.backend import REPORTS
    from mhc_compile.passes import recompute

    torch._dynamo.reset()
    seen = {}
    orig, orig_w = recompute.activation_units, recompute.weight_grad_units

    def spy(gm, detection):
        seen["act"] = orig(gm, detection)
        return seen["act"]

    def spy_w(gm, detection):
        seen["wgrad"] = orig_w(gm, detection)
        return seen["wgrad"]

    recompute.activation_units, recompute.weight_grad_units = spy, spy_w
    try:
        model = NanoGPT(layers=4, d=32, block=32)
        idx = torch.randint(0, 64, (2, 16))
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(model, backend="mhc", options={"inner_backend": "aot_eager"})(idx)
    finally:
        recompute.activation_units, recompute.weight_grad_units = orig, orig_w
    report = [r for r in REPORTS if r.sites][-1]
    sizes = [len(b) for b in report.recompute_blocks]
    assert seen["act"] is not None and 1 < seen["act"] < 100, seen
    # a layer's parameters (LayerNorms, attention, MLP: 12704 fp32 values at d = 32) for its two sites, over one
    # site's stream (2 x 16 tokens x 32 channels); the embeddings and the head are not counted
    assert seen["wgrad"] == pytest.approx(12704 / 2 / (2 * 16 * 32))
    assert sizes == cost.block_schedule(len(report.sites), 4, seen["act"], seen["wgrad"]), sizes
    flat = [p for b in report.recompute_blocks for p in b]
    assert len(flat) == len(set(flat)) == len(report.sites)
    assert all(line.startswith(path) for path, line in zip(flat, report.sites)), (flat, report.sites)


def test_forced_and_disabled_block_size():
    assert block_size(MHCConfig(recompute=3), 10) == 3
    assert block_size(MHCConfig(recompute=30), 10) == 10
    assert block_size(MHCConfig(recompute="none"), 10) is None


def _saved_bytes_and_grads(recompute):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NanoGPT(layers=6, d=32, block=32)
    idx = torch.randint(0, 64, (4, 32))
    step = torch.compile(model, backend="mhc", options={"recompute": recompute, "inner_backend": "aot_eager"})
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = step(idx)
    out.square().mean().backward()
    return saved[0], {k: p.grad for k, p in model.named_parameters()}


def test_recompute_saves_less_and_keeps_gradients():
    none_bytes, none_grads = _saved_bytes_and_grads("none")
    auto_bytes, auto_grads = _saved_bytes_and_grads("auto")
    assert auto_bytes < 0.85 * none_bytes, (auto_bytes, none_bytes)
    for k in none_grads:
        torch.testing.assert_close(auto_grads[k], none_grads[k], rtol=1e-5, atol=1e-7)


def _saved_shapes_min_cut(monkeypatch, fuse):
    """Saved tensors' shapes of one forward, partitioned by the min-cut partitioner that Inductor uses
    (``aot_eager_decomp_partition``: the same partition, no code generation)."""
    import collections
    import warnings

    import mhc_compile.backend as backend

    monkeypatch.setattr(backend, "_inner_compile", lambda gm, example_inputs, config, mode: torch._dynamo.lookup_backend(
        "aot_eager_decomp_partition")(gm, example_inputs))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NanoGPT(layers=4, d=32, block=32)
    idx = torch.randint(0, 64, (2, 16))
    step = torch.compile(model, backend="mhc", options={"recompute": [4, 4], "fuse": fuse, "inner_backend": "aot_eager"})
    shapes = collections.Counter()

    def pack(t):
        shapes[tuple(t.shape)] += 1
        return t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(idx)
    return shapes


@pytest.mark.parametrize("fuse", [False, True], ids=["unfused", "fused"])
def test_block_boundary_stream_is_saved_under_min_cut(monkeypatch, fuse):
    """Two blocks of 4 sites: the forward saves exactly one n-stream tensor, the stream entering the second block.
    With fuse=True that stream is a getitem of a ``step``, which the min-cut partitioner never keeps on a
    MUST_SAVE tag of its own; without the boundary rule for fused ops nothing was saved and the backward rebuilt
    the chain from its start (H200: +65 % activation memory)."""
    shapes = _saved_shapes_min_cut(monkeypatch, fuse)
    assert shapes[(2, 16, 4, 32)] == 1, shapes


def test_head_collapse_is_saved_not_rebuilt_from_the_last_stream(monkeypatch):
    """Blocks [4, 4] over 8 sites: the backward recomputes the 3 streams inside each block with post_res, and
    nothing else. The head's collapse (mean over the streams, one C-wide tensor) is saved; left to the min-cut
    partitioner it was recomputed, which rebuilt the chain's last n-wide stream with a 7th post_res that only the
    mean read (H200, d = 7168: ~0.5 ms a step)."""
    import warnings

    import mhc_compile.backend as backend
    from mhc_compile.kernels import reference as ref

    monkeypatch.setattr(backend, "_inner_compile", lambda gm, example_inputs, config, mode: torch._dynamo.lookup_backend(
        "aot_eager_decomp_partition")(gm, example_inputs))
    calls = [0]
    post_res = ref.post_res

    def counted(*args):
        calls[0] += 1
        return post_res(*args)

    monkeypatch.setattr(ref, "post_res", counted)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NanoGPT(layers=4, d=32, block=32)
    step = torch.compile(model, backend="mhc", options={"recompute": [4, 4], "inner_backend": "aot_eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = step(torch.randint(0, 64, (2, 16)))
    assert calls[0] == 8  # the forward: one a site
    out.square().mean().backward()
    assert calls[0] - 8 == 3 + 3
