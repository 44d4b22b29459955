"""Recompute tags: fewer saved activations, identical gradients, and the L_r rule."""

import pytest
import torch

from mhc_compile.config import MHCConfig
from mhc_compile.passes.recompute import block_size
from models import NanoGPT


@pytest.mark.parametrize("n, sites, want", [(4, 8, 2), (4, 48, 6), (1, 9, 2), (4, 1, 1)])
def test_auto_block_size(n, sites, want):
    assert block_size(MHCConfig(n=n), sites) == want


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
