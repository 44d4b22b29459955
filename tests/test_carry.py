"""The n streams cross graph breaks (mhc_compile/runtime/carry.py): a residual stack Dynamo splits over several
graphs is the model one graph computes, checked against the hand-written eager mHC oracle in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile.errors import MHCConversionError
from mhc_compile.runtime import carry
from models import NanoGPT, eager_mhc_nanogpt, perturb_mhc

N = 3
AOT = {"n": N, "inner_backend": "aot_eager"}


def _blocks_one_by_one(model, idx, dynamic=None):
    """NanoGPT's forward with each block compiled on its own, as torchtitan compiles its blocks."""
    x = model.wte(idx) + model.wpe(torch.arange(idx.shape[1]))
    for block in model.h:
        x = torch.compile(block, backend="mhc", options=AOT, dynamic=dynamic)(x)
    return model.lm_head(model.ln_f(x))


CASES = {  # name -> (NanoGPT keywords, how the compiled model runs)
    "break in the first block": (dict(break_at=0), None),
    "break in the last block": (dict(break_at=2), None),
    "break at every block's end": (dict(break_every_block_end=True), None),
    "blocks compiled one by one": ({}, _blocks_one_by_one),
    "blocks compiled one by one, dynamic": ({}, lambda m, i: _blocks_one_by_one(m, i, dynamic=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_split_stack_is_the_one_chain_model_float64(name):
    kw, run = CASES[name]
    model = NanoGPT(layers=3, **kw).double()
    mhc_compile.prepare(model, torch.randint(0, 64, (2, 8)), n=N)
    perturb_mhc(model)
    run = run or (lambda m, i, c=torch.compile(model, backend="mhc", options=AOT): c(i))
    # (3, 5): Dynamo recompiles for dynamic shapes at a batch of n, which X_0's example must not tie to n
    for idx in (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (N, 5)), torch.randint(0, 64, (2, 7))):
        model.zero_grad()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = run(model, idx)
            out.logsumexp(-1).mean().backward()
        assert not [str(w.message) for w in caught if "mhc" in str(w.message)]
        got = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        want = eager_mhc_nanogpt(model, idx, n=N)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        want.logsumexp(-1).mean().backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-8, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_blocks_compiled_one_by_one_under_inference_mode():
    """Inference tensors have no version counter: the streams are carried on their identity alone."""
    model = NanoGPT(layers=2).double()
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, n=N)
    perturb_mhc(model)
    with torch.inference_mode():
        out = _blocks_one_by_one(model, idx)
    with torch.no_grad():
        torch.testing.assert_close(out, eager_mhc_nanogpt(model, idx, n=N), rtol=1e-10, atol=1e-10)


@torch._dynamo.disable
def _eager_copy(x):
    return x * 1.0  # runs between the graphs: a new tensor, not the one the graph before returned


class _ChangedAtTheBreak(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.a(x)
        x = _eager_copy(x)
        return x + self.b(x)


def test_stream_changed_between_graphs_restarts_with_a_warning_or_raises_under_strict():
    model = _ChangedAtTheBreak()
    x = torch.randn(2, 5, 32)
    mhc_compile.prepare(model, x, n=N)
    with pytest.warns(UserWarning, match=r"stream entering mhc_b after a graph break is not the one the graph "
                                         r"before it returned.*start afresh"):
        out = torch.compile(model, backend="mhc", options=AOT)(x)
    out.sum().backward()
    assert all(p.grad is not None for p in mhc_compile.mhc_parameters(model))
    torch._dynamo.reset()
    with pytest.raises(MHCConversionError, match=r"stream entering mhc_b .*strict=True"):
        torch.compile(model, backend="mhc", options={**AOT, "strict": True})(x)


def test_streams_are_found_for_the_same_storage_unchanged_only():
    c, wide = torch.randn(2, 4, 8), torch.randn(2, 4, N, 8)
    carry.attach(c, wide)
    assert carry.streams_of(c, N) is wide
    assert carry.streams_of(c.view_as(c), N) is wide  # FSDP2 hands a block views of its inputs
    assert carry.streams_of(c.clone(), N) is None
    assert carry.streams_of(c, N + 1) is None
    assert carry.streams_of(c[:1], N) is None
    c.add_(0)  # written since: the streams no longer collapse to it
    assert carry.streams_of(c, N) is None


def test_join_hands_the_streams_their_gradient_and_the_input_a_zero_one():
    x = torch.randn(2, 4, 8, requires_grad=True)
    wide = torch.randn(2, 4, N, 8, requires_grad=True)
    seen = []
    x.register_hook(lambda g: seen.append(g))
    out = carry._Join.apply(x, wide)
    assert torch.equal(out, wide)
    (out * 3).sum().backward()
    assert torch.equal(wide.grad, torch.full_like(wide, 3.0))
    assert len(seen) == 1 and torch.equal(seen[0], torch.zeros_like(x))


class _ConvBlock(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


class _ConvStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = _ConvBlock(), _ConvBlock()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_channel_first_chain_is_collapsed_at_a_break_with_a_warning():
    model = _ConvStack()
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(UserWarning, match=r"graph break inside the residual stack.*channel-first chain are collapsed"):
        torch.compile(model, backend="mhc", options=AOT)(x)


def test_hf_llama_layers_compiled_one_by_one_equal_the_whole_model_compiled(quiet):
    """transformers' own per-layer compile (``layer.compile``): the same logits as the whole model in one graph."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50,
                                      num_hidden_layers=3, num_key_value_heads=1)
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 50, (2, 8))
    mhc_compile.prepare(model, ids, n=N)
    perturb_mhc(model)
    with torch.no_grad():
        whole = torch.compile(model, backend="mhc", options=AOT)(ids).logits
    torch._dynamo.reset()
    for layer in model.model.layers:
        layer.compile(backend="mhc", options=AOT)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, whole, rtol=1e-10, atol=1e-10)


def test_tensors_without_storage_are_carried_by_identity_only():
    """Fake and meta tensors all report address 0: a lookup by storage would mix them up."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        c, wide = torch.randn(2, 4, 8), torch.randn(2, 4, N, 8)
        carry.attach(c, wide)
        assert carry.streams_of(c, N) is wide
        assert carry.streams_of(torch.randn(2, 4, 8), N) is None
        assert carry.streams_of(c.view_as(c), N) is None
    meta = torch.empty(2, 4, 8, device="meta")
    carry.attach(meta, torch.empty(2, 4, N, 8, device="meta"))
    assert carry.streams_of(torch.empty(2, 4, 8, device="meta"), N) is None
