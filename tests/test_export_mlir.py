"""mhc_compile.export_mlir: the converted model through torch-mlir's FX importer (CPU, tiny shapes).

torch-mlir is a test dependency: without it the tests that need it FAIL with the install line (no skip).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mhc_compile
from mhc_compile.backend import MHCConversionError
from mhc_compile.export import INSTALL_HINT, OUTPUT_TYPES, exported_program
from models import NanoGPT

try:
    import torch_mlir  # noqa: F401
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    _MISSING = None
except ImportError as e:  # pragma: no cover - CI installs it
    _MISSING = e


@pytest.fixture(scope="module")
def mlir():
    """The torch-mlir Python package, or a failure that says how to install it."""
    if _MISSING is not None:
        pytest.fail(f"torch-mlir is not installed ({_MISSING}). {INSTALL_HINT}", pytrace=False)
    return ir


def _ids():
    return torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def _op_names(module) -> list[str]:
    """Every operation's name in ``module`` (nested regions included), from the IR itself."""
    names: list[str] = []

    def visit(op):
        names.append(op.name)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    return names


def _export(model, *inputs, **kw):
    torch._dynamo.reset()  # each trace adds a Dynamo cache entry on the model's forward
    return mhc_compile.export_mlir(model, *inputs, **kw)


@pytest.fixture(scope="module")
def torch_dialect(mlir):
    """NanoGPT (2 layers, 4 sites) at n=2 in the torch dialect, parameters as named literals."""
    torch.manual_seed(0)
    return str(_export(NanoGPT(), _ids(), n=2, sinkhorn_iters=4, output_type="torch"))


@pytest.fixture(scope="module")
def linalg(mlir):
    """NanoGPT (1 layer) at n=4 lowered to linalg-on-tensors, parameters as @main arguments."""
    torch.manual_seed(0)
    return _export(NanoGPT(layers=1), _ids(), n=4, sinkhorn_iters=3, output_type="linalg-on-tensors",
                   params="arguments")


def test_torch_dialect_parses_back_and_names_the_mhc_math(torch_dialect):
    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    module = ir.Module.parse(torch_dialect, ctx)
    assert module.operation.verify()
    ops = set(_op_names(module))
    # The reference decomposition of the mHC ops: H_pre/H_post sigmoids, Sinkhorn's exp, the rsqrt of
    # the RMS scale, and the model's own matmuls (Linear decomposes to mm / bmm / matmul).
    for expected in ("torch.aten.sigmoid", "torch.aten.exp", "torch.aten.rsqrt", "torch.aten.sum.dim_IntList"):
        assert expected in ops, expected
    assert ops & {"torch.aten.mm", "torch.aten.bmm", "torch.aten.matmul", "torch.aten.linear"}
    # No custom op is left for a backend to resolve.
    assert "torch.operator" not in ops
    assert "mhc_compile" not in torch_dialect
    # Parameters are inlined under their names in the model, the mHC ones included.
    for name in ("h.0.mhc_attn.phi", "h.1.mhc_mlp.phi", "h.0.mhc_attn.bias", "wte.weight"):
        assert re.search(rf'dense_resource<"?{re.escape(name)}"?>', torch_dialect), name
    # The function: token ids in, logits out.
    assert re.search(r"func\.func @main\(%arg0: !torch\.vtensor<\[2,8\],si64>\) -> !torch\.vtensor<\[2,8,64\],f32>",
                     torch_dialect)


def test_linalg_on_tensors_has_no_torch_ops(linalg):
    assert linalg.operation.verify()
    ops = _op_names(linalg)
    assert any(name.startswith("linalg.") for name in ops)
    assert "math.exp" in ops  # Sinkhorn survives as exp on scalars inside linalg.generic
    leftovers = sorted({name for name in ops if name.startswith("torch.")})
    assert not leftovers, leftovers


def test_arguments_mode_names_every_state_argument(linalg):
    text = str(linalg)
    header = text[text.index("func.func @main"):].split("{\n", 1)[0]
    # Token ids first, then every parameter tagged with its state-dict name.
    assert header.startswith("func.func @main(%arg0: tensor<2x8xi64>, %arg1: tensor<64x32xf32> {mhc.name = \"wte.weight\"}")
    for name in ("h.0.mhc_attn.phi", "h.0.mhc_attn.bias", "h.0.mhc_attn.alpha", "h.0.mhc_mlp.phi", "lm_head.weight"):
        assert f'{{mhc.name = "{name}"}}' in header, name
    # phi of a site is [n*C, n^2 + 2n] = [4*32, 24].
    assert 'tensor<128x24xf32> {mhc.name = "h.0.mhc_attn.phi"}' in header


@pytest.mark.parametrize("output_type,dialect", [("stablehlo", "stablehlo."), ("tosa", "tosa.")])
def test_other_backends_lower(mlir, output_type, dialect):
    module = _export(NanoGPT(layers=1, d=16), _ids(), n=2, sinkhorn_iters=2, output_type=output_type)
    assert module.operation.verify()
    ops = _op_names(module)
    assert any(name.startswith(dialect) for name in ops)
    assert not [name for name in ops if name.startswith("torch.")]


def test_exported_function_matches_the_backend():
    """The program torch-mlir imports computes what torch.compile(backend="mhc") computes, with mHC
    parameters moved off their init so the streams differ (needs no torch-mlir)."""
    torch.manual_seed(0)
    model, ids = NanoGPT(layers=1), _ids()
    mhc_compile.prepare(model, ids, n=2)
    with torch.no_grad():
        for p in mhc_compile.mhc_parameters(model):
            p.add_(0.5 * torch.randn_like(p))
        plain = model(ids)
    torch._dynamo.reset()
    program, names = exported_program(model, ids, n=2)
    assert "h.0.mhc_attn.phi" in names and "h.0.mhc_mlp.alpha" in names
    assert not any("mhc_compile" in str(n.target) for n in program.graph.nodes)
    with torch.no_grad():
        got = program.module()(ids)
        torch._dynamo.reset()
        want = torch.compile(model, backend="mhc", options={"n": 2, "inner_backend": "eager"})(ids)
    assert (want - plain).abs().max() > 1e-3  # the mHC path really differs from the plain model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_model_without_residual_adds_exports_as_is(mlir):
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    module = _export(mlp, torch.randn(3, 8), n=2, output_type="torch")
    assert module.operation.verify()
    ops = set(_op_names(module))
    assert "torch.aten.relu" in ops and "torch.aten.mm" in ops
    assert not ops & {"torch.aten.sigmoid", "torch.aten.exp"}
    assert re.search(r"func\.func @main\(%arg0: !torch\.vtensor<\[3,8\],f32>\) -> !torch\.vtensor<\[3,4\],f32>",
                     str(module))


def test_bad_output_type_and_params_raise():
    with pytest.raises(ValueError, match="'mlir-bytecode'"):
        mhc_compile.export_mlir(nn.Linear(2, 2), torch.randn(1, 2), output_type="mlir-bytecode")
    with pytest.raises(ValueError, match="'globals'"):
        mhc_compile.export_mlir(nn.Linear(2, 2), torch.randn(1, 2), params="globals")
    assert "linalg-on-tensors" in OUTPUT_TYPES and "torch" in OUTPUT_TYPES


def test_graph_break_is_named(mlir, quiet):
    with pytest.raises(MHCConversionError, match=r"3 Dynamo graphs.*graph_break\(\)"):
        _export(NanoGPT(layers=2, break_at=0), _ids(), n=2)
