"""The mhc backend end to end on the CPU: detection on real architectures, function preservation at
init, gradients against a hand-written eager mHC model, parameters, checkpoints, options, graph breaks.

Most tests hand the rewritten graph to ``aot_eager`` (fast, same AOTAutograd path); a few go through
Inductor (tests/test_inductor.py).
"""

from __future__ import annotations

import logging
import operator
import warnings

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile.backend import REPORTS
from models import NanoGPT, eager_mhc_nanogpt, output_tensor, perturb_mhc, rel_err

AOT = {"inner_backend": "aot_eager"}


# --- architectures -----------------------------------------------------------------------------------


def _hf(name):
    import transformers

    ids = torch.randint(0, 50, (2, 8))
    small = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg), ids
    if name == "llama":
        cfg = transformers.LlamaConfig(num_hidden_layers=2, num_key_value_heads=1, **small)
        return transformers.LlamaForCausalLM(cfg), ids
    if name == "bert":
        cfg = transformers.BertConfig(num_hidden_layers=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small)
        return transformers.BertModel(cfg, add_pooling_layer=False), ids
    if name == "vit":
        cfg = transformers.ViTConfig(num_hidden_layers=2, image_size=16, patch_size=8,
                                     hidden_size=32, num_attention_heads=2, intermediate_size=64)
        return transformers.ViTModel(cfg, add_pooling_layer=False), torch.randn(2, 3, 16, 16)
    if name == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(num_hidden_layers=2, use_parallel_residual=True, **small)
        return transformers.GPTNeoXForCausalLM(cfg), ids
    raise KeyError(name)


def _model(name):
    if name == "nanogpt":
        return NanoGPT(), torch.randint(0, 64, (2, 8))
    if name == "nanogpt_parallel":
        return NanoGPT(parallel=True), torch.randint(0, 64, (2, 8))
    return _hf(name)


# expected site paths per layer i (two sites a layer; parallel blocks: one site with two branches)
EXPECTED = {
    "nanogpt": ["h.{i}.mhc_attn", "h.{i}.mhc_mlp"],
    "nanogpt_parallel": ["h.{i}.mhc_attn_mlp"],
    "gpt2": ["transformer.h.{i}.mhc_attn", "transformer.h.{i}.mhc_mlp"],
    "llama": ["model.layers.{i}.mhc_self_attn", "model.layers.{i}.mhc_mlp"],
    "bert": ["encoder.layer.{i}.attention.output.mhc_dense", "encoder.layer.{i}.output.mhc_dense"],
    "vit": ["layers.{i}.mhc_attention", "layers.{i}.mhc_mlp"],
    "gpt_neox": ["gpt_neox.layers.{i}.mhc_attention_mlp"],
}
KINDS = {"nanogpt": "pre-norm", "nanogpt_parallel": "parallel", "gpt2": "pre-norm", "llama": "pre-norm",
         "bert": "post-norm", "vit": "pre-norm", "gpt_neox": "parallel"}


def _adds(gm):
    return {n.name for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (operator.add, torch.add)
            or n.op == "call_method" and n.target == "add"}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_architecture_converts_and_preserves_function(name, quiet):
    model, inp = _model(name)
    model.eval()
    with torch.no_grad():
        want = output_tensor(model(inp))
    start = len(REPORTS)
    compiled = torch.compile(model, backend="mhc", options={"n": 4, **AOT})
    with torch.no_grad():
        got = output_tensor(compiled(inp))
    assert got.shape == want.shape
    assert rel_err(got, want) <= 1e-5

    reports = [r for r in REPORTS[start:] if r.sites]
    assert len(reports) == 1, "one graph expected"
    report = reports[0]
    sites = [s.path for s in report.detection.sites]
    assert sites == [p.format(i=i) for i in range(2) for p in EXPECTED[name]]
    assert {s.kind for s in report.detection.sites} == {KINDS[name]}
    assert len(report.detection.chains) == 1

    # nothing but the residual adds was rewritten: every other add of the graph is still there
    site_adds = {a.name for s in report.detection.sites for a in s.adds}
    before = {line.split("=")[0].strip() for line in report.before.splitlines() if "add" in line}
    remaining = _adds(report.gm)
    original_adds = {n for n in before if n.isidentifier()} & (_adds(report.gm) | site_adds)
    assert site_adds.isdisjoint(remaining)
    assert (original_adds - site_adds) <= remaining

    # each site got an MHCSite with the documented shapes, registered on the owning module
    params = dict(model.named_parameters())
    for path in sites:
        assert params[f"{path}.phi"].shape == (4 * 32, 24)
        assert params[f"{path}.bias"].shape == (24,)
        assert params[f"{path}.alpha"].shape == (3,)

    # a training step runs and every mHC parameter gets a finite gradient
    model.train()
    output_tensor(compiled(inp)).float().square().mean().backward()
    for p in mhc_compile.mhc_parameters(model):
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_no_false_positive_adds_survive_in_gpt2(quiet):
    """GPT-2's GELU (x + 0.044715 x^3), its position-embedding add and the attention internals stay."""
    model, ids = _hf("gpt2")
    torch.compile(model, backend="mhc", options=AOT)(ids)
    report = [r for r in REPORTS if r.sites][-1]
    gelu_adds = [n for n in report.gm.graph.nodes if n.name.startswith("add") and "act" in str(n.meta.get("nn_module_stack", ""))]
    assert len(gelu_adds) >= 2  # two GELU adds per layer survive untouched
    assert all(n.meta.get("mhc") is None for n in gelu_adds)


# --- gradients against the hand-written eager mHC model -------------------------------------------


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_gradients_match_eager_oracle_float64(mode, quiet):
    model = NanoGPT(layers=3).double()
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, n=3, mode=mode)
    perturb_mhc(model)
    compiled = torch.compile(model, backend="mhc", options={"n": 3, "mode": mode, **AOT})
    out = compiled(idx)
    loss = out.logsumexp(-1).mean() + out.sum() * 1e-3
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    want_out = eager_mhc_nanogpt(model, idx, n=3, mode=mode)
    torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-10)
    (want_out.logsumexp(-1).mean() + want_out.sum() * 1e-3).backward()
    assert any("mhc" in k for k in got)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{k}: {m}")


def test_token_reshape_between_sites_keeps_one_chain_float64(quiet):
    """OPT's decoder layer runs its MLP site on [B*T, C] (reshape before, view back after): the reshapes regroup the
    n-stream's tokens, so all sites stay one chain, and the compiled model is the eager mHC oracle, values and
    gradients; a second shape under dynamic=True reuses the graph with symbolic sizes."""
    model = NanoGPT(layers=2, flat_mlp=True).double()
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, n=3)
    perturb_mhc(model)
    start = len(REPORTS)
    compiled = torch.compile(model, backend="mhc", options={"n": 3, **AOT}, dynamic=True)
    compiles = []
    for idx in (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (3, 5))):
        model.zero_grad()
        out = compiled(idx)
        out.logsumexp(-1).mean().backward()
        got = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad()
        want = eager_mhc_nanogpt(model, idx, n=3)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        want.logsumexp(-1).mean().backward()
        for k, p in model.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{k}: {m}")
        compiles.append(len(REPORTS))
    assert compiles[0] == compiles[1]  # the second shape compiled nothing
    assert [[s.path for s in c.sites] for c in REPORTS[-1].detection.chains] == [
        ["h.0.mhc_attn", "h.0.mhc_mlp", "h.1.mhc_attn", "h.1.mhc_mlp"]]


def test_mode_residual_leaves_graph_and_parameters_alone(quiet):
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 8))
    want = model(idx)
    got = torch.compile(model, backend="mhc", options={"mode": "residual", **AOT})(idx)
    torch.testing.assert_close(got, want)
    assert mhc_compile.mhc_parameters(model) == []
    assert REPORTS[-1].sites  # detection still ran and is reported


# --- parameters: prepare, lazy creation, optimizer check, checkpoints ------------------------------


def test_prepare_is_idempotent_and_checks_options():
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, n=2)
    first = {k: p for k, p in model.named_parameters()}
    mhc_compile.prepare(model, idx, n=2)
    second = {k: p for k, p in model.named_parameters()}
    assert first.keys() == second.keys()
    assert all(first[k] is second[k] for k in first)
    assert len(mhc_compile.mhc_parameters(model)) == 4 * 3
    with pytest.raises(ValueError, match="prepared with n=2"):
        mhc_compile.prepare(model, idx, n=3)


def test_prepare_warns_when_it_finds_no_residual_add():
    """A model with no residual add in its captured graphs (none at all, or blocks that Dynamo ran eagerly) is not
    an error, but prepare says that it created nothing; a model with sites gets no such warning."""
    import warnings

    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    with pytest.warns(UserWarning, match="no residual add x \\+ f\\(x\\) in the graphs Dynamo captured from Sequential"):
        mhc_compile.prepare(plain, torch.randn(2, 8))
    assert mhc_compile.mhc_parameters(plain) == []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="mhc_compile.prepare: no residual add")
        mhc_compile.prepare(NanoGPT(), torch.randint(0, 64, (2, 8)), n=2)


def test_lazy_creation_warns_and_optimizer_without_them_is_detected():
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the mHC parameters exist
    compiled = torch.compile(model, backend="mhc", options=AOT)
    with pytest.warns(UserWarning, match="created 12 mHC parameters"):
        out = compiled(idx)
    out.sum().backward()
    with pytest.warns(UserWarning, match="will never train"):
        opt.step()
    # an optimizer that holds them is fine
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2.step()


def test_a_step_that_ran_without_mhc_is_reported_once(quiet):
    """A prepared model whose step gave its own parameters gradients but none to its mHC sites (here: called without
    the backend; in the field also blocks that Dynamo runs eagerly) gets one warning at the optimizer's first step;
    the compiled model's step gets none."""
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()  # no backward yet: nothing to judge, no warning, and the check waits for a later step
    model(idx).sum().backward()  # the plain model: the mHC parameters take no part
    with pytest.warns(UserWarning, match="none of the mHC parameters of its 4 residual site\\(s\\) did"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # said once
        opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
        opt2.zero_grad()
        torch.compile(model, backend="mhc", options=AOT)(idx).sum().backward()
        opt2.step()


def test_optimizer_check_is_an_error_under_strict():
    model = NanoGPT()
    idx = torch.randint(0, 64, (2, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend="mhc", options={"strict": True, **AOT})
        compiled(idx).sum().backward()
    with pytest.raises(mhc_compile.MissingMHCParametersError):
        opt.step()


def test_state_dict_round_trip_into_fresh_prepared_model(quiet):
    idx = torch.randint(0, 64, (2, 8))
    a = NanoGPT()
    mhc_compile.prepare(a, idx)
    perturb_mhc(a)
    state = a.state_dict()
    assert any(k.endswith("mhc_attn.phi") for k in state)
    b = NanoGPT()  # other random weights
    mhc_compile.prepare(b, idx)
    b.load_state_dict(state)
    out_a = torch.compile(a, backend="mhc", options=AOT)(idx)
    torch._dynamo.reset()
    out_b = torch.compile(b, backend="mhc", options=AOT)(idx)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)

    c = NanoGPT()
    mhc_compile.prepare(c, idx, n=2)
    with pytest.raises(ValueError, match="mHC checkpoint mismatch.*'n': 4.*'n': 2"):
        c.load_state_dict(state)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        NanoGPT().load_state_dict(state)
    d = NanoGPT()
    mhc_compile.prepare(d, idx, mode="hc")
    with pytest.raises(ValueError, match="mHC checkpoint mismatch"):
        d.load_state_dict(state)


# --- options -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, match", [
    ({"n": 0}, "'n' must be in"),
    ({"n": 2.5}, "'n' must be an integer"),
    ({"n": True}, "'n' must be an integer"),
    ({"mode": "mhcc"}, "'mode' must be one of"),
    ({"sinkhorn_iters": 0}, "sinkhorn_iters"),
    ({"eps": 0.0}, "'eps' must be > 0"),
    ({"recompute": "sometimes"}, "'recompute' must be an integer"),
    ({"kernels": "cuda"}, "'kernels' must be one of"),
    ({"bogus": 1}, r"unknown mhc option\(s\) \['bogus'\]"),
])
def test_bad_options_raise_value_error_naming_them(options, match):
    with pytest.raises(ValueError, match=match):
        mhc_compile.MHCConfig.from_options(options)
    with pytest.raises(Exception, match=match) as info:
        torch.compile(NanoGPT(), backend="mhc", options=options)(torch.randint(0, 64, (1, 4)))
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


# --- graphs without residuals, graph breaks ---------------------------------------------------------


class NoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)) + 1.0)


def test_model_without_residual_adds_is_unchanged_with_info(caplog):
    model = NoResidual()
    x = torch.randn(3, 8)
    with caplog.at_level(logging.INFO, logger="mhc_compile"):
        got = torch.compile(model, backend="mhc", options=AOT)(x)
    torch.testing.assert_close(got, model(x))
    assert "no residual adds" in caplog.text
    assert mhc_compile.mhc_parameters(model) == []


# --- the initialisation contract ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_init_contract_small_gates_zero_dynamics_and_leaning_pre_maps(mode):
    from mhc_compile.kernels import reference as ref

    n = 4
    model = NanoGPT(layers=2)
    mhc_compile.prepare(model, torch.randint(0, 64, (2, 8)), n=n, mode=mode, alpha_init=0.01)
    sites = [m for m in model.modules() if isinstance(m, mhc_compile.MHCSite)]
    assert len(sites) == 4
    leans = []
    for k, site in enumerate(sites):
        assert torch.equal(site.alpha.detach(), torch.full((3,), 0.01))  # gates start small
        assert torch.count_nonzero(site.phi) == 0  # dynamic part exactly zero: function preserved
        p = torch.zeros(1, n * n + 2 * n)
        h_pre, h_post, h_res = ref.coeffs(p, torch.ones(1), site.bias.detach(), site.alpha.detach(), n, n * 32, 1e-6, 20, mode)
        assert abs(h_pre.sum().item() - 1) < 1e-6  # x_in = x when the streams are equal
        torch.testing.assert_close(h_post, torch.ones(1, n))
        torch.testing.assert_close(h_res.sum(-1), torch.ones(1, n))  # rows sum to 1
        leans.append(int(h_pre.argmax()))
    assert leans == [0, 1, 2, 3]  # site k leans on stream k mod n: symmetry broken


def test_prepare_and_trace_do_not_use_up_dynamos_recompile_limit(quiet):
    """Sixteen prepare/trace calls on one model class, then the real compile still converts."""
    idx = torch.randint(0, 64, (2, 8))
    with torch._dynamo.config.patch(recompile_limit=8):  # Dynamo's default (conftest raises it)
        _prepare_and_trace_then_compile(idx)


def _prepare_and_trace_then_compile(idx):
    for _ in range(8):
        mhc_compile.prepare(NanoGPT(), idx)
        mhc_compile.trace(NanoGPT(), idx)
    model = NanoGPT()
    mhc_compile.prepare(model, idx)
    perturb_mhc(model)
    got = torch.compile(model, backend="mhc", options=AOT)(idx)
    torch.testing.assert_close(got, eager_mhc_nanogpt(model, idx, n=4), rtol=1e-5, atol=1e-5)


class HiddenStack(nn.Module):
    """Takes and returns hidden states: its chain starts at a graph input and ends at the output."""

    def __init__(self, d=16, layers=2):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))

    def forward(self, h):
        for fc in self.fc:
            h = h + fc(torch.tanh(h))
        return h


def test_no_graph_break_warning_for_a_model_that_takes_hidden_states():
    model = HiddenStack()
    h = torch.randn(2, 5, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.compile(model, backend="mhc", options={"strict": True, **AOT})(h)
    assert not [w for w in caught if "graph break" in str(w.message)]
    torch.testing.assert_close(got, model(h), rtol=1e-5, atol=1e-6)


@pytest.mark.inner_compile_failure
def test_inner_compiler_failure_runs_the_rewritten_graph_eagerly(monkeypatch):
    """If the inner compiler fails, the rewritten graph runs eagerly (warned, naming the sites), so no site
    is lost: raising would let Dynamo run that part without the mhc backend, its mHC parameters unused."""
    import mhc_compile.backend as backend

    def boom(*args, **kwargs):
        raise RuntimeError("data-dependent op the inner compiler cannot handle")

    model = NanoGPT(layers=1)
    idx = torch.randint(0, 64, (2, 8))
    mhc_compile.prepare(model, idx, **AOT)
    perturb_mhc(model)
    want = torch.compile(model, backend="mhc", options=AOT)(idx)
    torch._dynamo.reset()
    monkeypatch.setattr(backend, "_inner_compile", boom)
    with pytest.warns(UserWarning, match=r"failed to compile rewritten graph .*RuntimeError: data-dependent op.*"
                                         r"runs eagerly.*h\.0\.mhc_attn, h\.0\.mhc_mlp stay converted"):
        got = torch.compile(model, backend="mhc", options=AOT)(idx)
    assert rel_err(got, want) <= 1e-6
    got.sum().backward()
    assert all(p.grad is not None for p in mhc_compile.mhc_parameters(model))
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"stay converted.*strict=True"):
        torch.compile(model, backend="mhc", options={**AOT, "strict": True})(idx)
