"""Export a converted model to MLIR through torch-mlir's FX importer.

    module = mhc_compile.export_mlir(model, example_batch, output_type="linalg-on-tensors", n=4)
    print(module)                     # a torch_mlir.ir.Module

How it works:

1. ``trace`` runs the backend's passes and returns the rewritten Dynamo graph: its placeholders are the
   user's input tensors, the model's parameters and buffers (lifted by Dynamo) and the mHC parameters.
2. Each mHC custom op (``torch.ops.mhc_compile.enter/step/post_res``, or proj/coeffs/pre with
   ``fuse=False``) in a copy of that graph is
   swapped for a plain Python function that calls the reference kernels of ``kernels/reference.py``,
   whatever ``impl`` the rewrite picked (Triton kernels cannot be lowered to MLIR). torch-mlir then
   sees only ATen ops: no ``torch.operator "mhc_compile..."`` is left to resolve, and the
   linalg-on-tensors / StableHLO / TOSA lowerings succeed.
3. A small wrapper module calls that graph with the user's inputs plus the state tensors, which it
   holds as parameters and buffers under their original names; ``torch.export`` turns it into an
   ATen-level ``ExportedProgram`` and torch-mlir's default decomposition table runs on it.
4. ``FxImporter.import_program`` imports it; a hook decides how the state tensors appear in MLIR:
   ``params="literals"`` (default) inlines them as ``torch.vtensor.literal`` whose
   ``dense_resource`` blob is named after the parameter (``dense_resource<h.0.mhc_attn.phi>``; MLIR
   may suffix a name that repeats; one-element tensors become unnamed splat constants), and
   ``params="arguments"`` makes them trailing arguments of ``func.func @main``, after the user
   inputs, in ``named_parameters``-then-buffers order, each tagged with ``{mhc.name = "<fqn>"}``.
5. Unless ``output_type="raw"``, torch-mlir's pipelines lower the result ("torch": the torch backend
   contract; "linalg-on-tensors", "stablehlo", "tosa": the corresponding backend pipeline).

One Dynamo graph is required: a model whose forward has graph breaks has no single function to export,
and ``export_mlir`` raises ``MHCConversionError`` naming the breaks (Dynamo's reasons). A model without
residual adds has nothing rewritten and is exported as is.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, fx, nn

from mhc_compile.kernels import reference as ref

#: Values accepted for ``output_type``, mapped to torch-mlir's ``OutputType`` names.
OUTPUT_TYPES = ("raw", "torch", "linalg-on-tensors", "stablehlo", "tosa")
PARAM_MODES = ("literals", "arguments")

INSTALL_HINT = (
    "mhc_compile.export_mlir needs torch-mlir: `pip install torch-mlir` (its wheel depends only on numpy "
    "and packaging, so it installs beside the torch you have)."
)


# ---------------------------------------------------------------------------------------------
# The mHC ops in reference form: same signatures and shapes as runtime/ops.py, plain ATen inside
# ---------------------------------------------------------------------------------------------
def _tokens(x: Tensor, trailing: int) -> Tensor:
    """View leading dims as one token dim, keeping ``trailing`` dims (as the custom ops do)."""
    return x.reshape((-1,) + tuple(x.shape[x.dim() - trailing :]))


def _proj(x: Tensor, phi: Tensor, impl: str) -> tuple[Tensor, Tensor]:
    lead = x.shape[:-2]
    p, sq = ref.proj(_tokens(x, 2), phi)
    return p.reshape(lead + p.shape[-1:]), sq.reshape(lead)


def _coeffs(p, sq, bias, alpha, n, nc, eps, iters, mode, impl, site="", check_finite=False):
    lead = p.shape[:-1]
    h_pre, h_post, h_res = ref.coeffs(_tokens(p, 1), sq.reshape(-1), bias, alpha, n, nc, eps, iters, mode)
    return h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,)), h_res.reshape(lead + (n, n))


def _pre(x: Tensor, h_pre: Tensor, impl: str, site: str = "", check_finite: bool = False) -> Tensor:
    out = ref.pre(_tokens(x, 2), _tokens(h_pre, 1))
    return out.reshape(x.shape[:-2] + x.shape[-1:])


def _post_res(x: Tensor, h_res: Tensor, h_post: Tensor, y: Tensor, impl: str) -> Tensor:
    out = ref.post_res(_tokens(x, 2), _tokens(h_res, 2), _tokens(h_post, 1), _tokens(y, 1))
    return out.reshape(x.shape)


def _coeffs_out(lead, n, h_pre, h_post, h_res, p, sq):
    return (h_pre.reshape(lead + (n,)), h_post.reshape(lead + (n,)), h_res.reshape(lead + (n, n)),
            p.reshape(lead + p.shape[-1:]), sq.reshape(lead))


def _enter(x, phi, bias, alpha, n, nc, eps, iters, mode, impl, site="", check_finite=False):
    lead = x.shape[:-2]
    x_in, *rest = ref.enter(_tokens(x, 2), phi, bias, alpha, n, nc, eps, iters, mode)
    return (x_in.reshape(lead + x.shape[-1:]), *_coeffs_out(lead, n, *rest))


def _step(x_prev, h_res_prev, h_post_prev, y_prev, phi, bias, alpha, n, nc, eps, iters, mode, impl, site="",
          check_finite=False):
    lead = x_prev.shape[:-2]
    x, x_in, *rest = ref.step(_tokens(x_prev, 2), _tokens(h_res_prev, 2), _tokens(h_post_prev, 1),
                              _tokens(y_prev, 1), phi, bias, alpha, n, nc, eps, iters, mode)
    return (x.reshape(x_prev.shape), x_in.reshape(lead + x_prev.shape[-1:]), *_coeffs_out(lead, n, *rest))


def _reference_targets() -> dict:
    """Custom op overload / packet -> its reference function. Built lazily: importing the ops module
    registers the custom ops."""
    import mhc_compile.runtime.ops  # noqa: F401  (registers torch.ops.mhc_compile.*)

    ops = torch.ops.mhc_compile
    table = {}
    for name, fn in (("proj", _proj), ("coeffs", _coeffs), ("pre", _pre), ("post_res", _post_res),
                     ("enter", _enter), ("step", _step)):
        packet = getattr(ops, name)
        table[packet] = fn
        table[packet.default] = fn
    return table


def decompose_mhc_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose mHC custom ops call their plain-PyTorch reference instead.

    Raises if an mHC op without a reference form (the backward ops: export is inference-only) is left.
    """
    table = _reference_targets()
    # A fresh copy of the graph (node meta shallow-copied), so the traced graph itself is left as is.
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    out = fx.GraphModule(gm, graph)
    for node in out.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in table:
            node.target = table[node.target]
        elif getattr(node.target, "namespace", None) == "mhc_compile":
            raise NotImplementedError(f"export_mlir: no reference decomposition for {node.target}")
    out.recompile()
    return out


# ---------------------------------------------------------------------------------------------
# The module torch.export sees
# ---------------------------------------------------------------------------------------------
class _Exportable(nn.Module):
    """Calls the decomposed graph with the user's inputs and the model's state.

    The state tensors are registered here under their names in ``model`` (dots become nested
    submodules), so the ExportedProgram's signature and the MLIR names match ``model.state_dict()``.
    ``slots`` says, per graph placeholder, where its value comes from: ("input", k) = the k-th tensor
    argument of ``forward``, ("state", name) = a parameter or buffer of the model, or a tensor Dynamo
    captured that is neither (named ``_const<i>_<placeholder>``, held as a non-persistent buffer).
    """

    def __init__(self, gm: fx.GraphModule, slots: list[tuple[str, Any]], state: dict[str, Tensor]):
        super().__init__()
        self.gm = gm
        self.slots = slots
        self._attr_of: dict[str, tuple[nn.Module, str]] = {}
        self.state_names = list(state)
        for name, tensor in state.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if isinstance(tensor, nn.Parameter):
                owner.register_parameter(leaf, nn.Parameter(tensor.detach(), requires_grad=False))
            else:
                owner.register_buffer(leaf, tensor.detach(), persistent=not name.startswith("_const"))
            self._attr_of[name] = (owner, leaf)

    def _state(self, name: str) -> Tensor:
        owner, leaf = self._attr_of[name]
        return getattr(owner, leaf)

    def forward(self, *inputs: Tensor):
        args = [inputs[where] if kind == "input" else self._state(where) for kind, where in self.slots]
        out = self.gm(*args)
        # A Dynamo graph returns a tuple; one result is returned alone so @main has one result.
        if isinstance(out, (tuple, list)) and len(out) == 1:
            return out[0]
        return out


class _ArgumentsModule(nn.Module):
    """``params="arguments"``: the state tensors are ordinary inputs after the user's."""

    def __init__(self, inner: _Exportable, n_inputs: int):
        super().__init__()
        self.gm, self.slots, self.n_inputs = inner.gm, inner.slots, n_inputs
        self.state_index = {name: n_inputs + i for i, name in enumerate(inner.state_names)}

    def forward(self, *args: Tensor):
        vals = [args[where] if kind == "input" else args[self.state_index[where]] for kind, where in self.slots]
        out = self.gm(*vals)
        if isinstance(out, (tuple, list)) and len(out) == 1:
            return out[0]
        return out


def _flat_tensors(values: Any) -> list[Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(values)
    return [v for v in leaves if isinstance(v, Tensor)]


def _build(model: nn.Module, traced, example_inputs: tuple) -> tuple[_Exportable, list[Tensor]]:
    """Bind every placeholder of the traced graph to a user input, a named state tensor or a constant."""
    names: dict[int, str] = {}
    for name, t in model.named_buffers():
        names.setdefault(id(t), name)
    for name, t in model.named_parameters():  # parameters win over an identical buffer
        names[id(t)] = name
    user = _flat_tensors(example_inputs)
    user_index = {id(t): i for i, t in enumerate(user)}

    placeholders = [n for n in traced.gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(traced.example_inputs):
        raise RuntimeError("export_mlir: the traced graph's placeholders and example inputs disagree")
    slots: list[tuple[str, Any]] = []
    state: dict[str, Tensor] = {}
    for node, value in zip(placeholders, traced.example_inputs):
        if not isinstance(value, Tensor):
            raise NotImplementedError(
                f"export_mlir: graph input {node.name!r} is a {type(value).__name__}, not a tensor "
                "(symbolic sizes are not exported; shapes are static)"
            )
        if id(value) in user_index:
            slots.append(("input", user_index[id(value)]))
        else:
            name = names.get(id(value)) or f"_const{len(state)}_{node.name}"
            state[name] = value
            slots.append(("state", name))
    return _Exportable(decompose_mhc_ops(traced.gm), slots, state), user


# ---------------------------------------------------------------------------------------------
# torch-mlir side
# ---------------------------------------------------------------------------------------------
def _require_torch_mlir() -> None:
    try:
        import torch_mlir  # noqa: F401
    except ImportError as e:  # exercised only without torch-mlir
        raise ImportError(f"{INSTALL_HINT} ({e})") from e


def _named_literal_hooks():
    """Importer hooks that inline each parameter/buffer as a ``torch.vtensor.literal`` whose
    ``dense_resource`` blob carries the tensor's name (torch-mlir's default names blobs by shape)."""
    import numpy as np
    from torch_mlir import ir
    from torch_mlir.extras.fx_importer import FxImporterHooks, create_mlir_tensor_type

    class NamedLiterals(FxImporterHooks):
        def resolve_input(self, gni, value, info):
            if not isinstance(value, Tensor) or value.numel() <= 1 or info.mutable_producer_node_name:
                return None  # default path (splat constants have no blob to name)
            name = info.input_spec.target  # the tensor's name in the wrapper = its name in the model
            t = value.detach().cpu()
            if t.dtype == torch.bool:
                return None
            try:
                # A copy: the blob must not follow later in-place updates of the model's parameter.
                array = np.array(t.numpy(), copy=True, order="C")
            except TypeError:  # bfloat16 etc. have no numpy dtype: torch-mlir's default handles them
                return None
            tensor_type = create_mlir_tensor_type(t)
            attr = ir.DenseResourceElementsAttr.get_from_buffer(array, name, tensor_type)
            op = ir.Operation.create("torch.vtensor.literal", results=[info.ir_type], attributes={"value": attr})
            return op.result

    return NamedLiterals()


def _graph_break_message(model: nn.Module, example_inputs: tuple, n_graphs: int) -> str:
    """Name the graph breaks with Dynamo's own reasons (re-runs Dynamo's explain; error path only)."""
    reasons: list[str] = []
    try:
        with torch.no_grad():
            explanation = torch._dynamo.explain(model)(*example_inputs)
        for br in explanation.break_reasons:
            frame = br.user_stack[-1] if br.user_stack else None
            where = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
            reasons.append(f"{br.reason.strip().splitlines()[0]}{where}")
    except Exception as e:  # noqa: BLE001 - the message is best effort
        reasons.append(f"(could not name the breaks: {type(e).__name__}: {e})")
    return (
        f"mhc_compile.export_mlir: the model compiles to {n_graphs} Dynamo graphs (graph breaks), and one "
        "MLIR function needs one graph. Remove the graph break(s): "
        + "; ".join(reasons or ["unnamed here; TORCH_LOGS=graph_breaks names them"])
    )


def exported_program(model: nn.Module, *example_inputs: Any, params: str = "literals", **options: Any):
    """The ATen-level ``torch.export.ExportedProgram`` that ``export_mlir`` imports (mHC ops in
    reference form), and the names of the state tensors in the order ``params="arguments"`` appends
    them to the inputs. Needs no torch-mlir; useful to check the exported function numerically."""
    if params not in PARAM_MODES:
        raise ValueError(f"export_mlir: unknown params {params!r}; expected one of {PARAM_MODES}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_mlir expects an nn.Module, got {type(model).__name__}")
    from mhc_compile.api import trace
    from mhc_compile.backend import MHCConversionError

    # Export is inference: nothing to recompute. (Kernels do not matter: the reference form replaces them.)
    options.setdefault("recompute", "none")
    graphs = trace(model, *example_inputs, **options)
    if not graphs:
        raise RuntimeError(
            "mhc_compile.export_mlir: Dynamo produced no graph for this model. If it was traced or compiled "
            "many times in this process, Dynamo's recompile_limit was probably hit: call "
            "torch._dynamo.reset() or raise torch._dynamo.config.recompile_limit."
        )
    if len(graphs) > 1:
        raise MHCConversionError(_graph_break_message(model, example_inputs, len(graphs)))
    wrapper, user = _build(model, graphs[0], example_inputs)

    if params == "arguments":
        module = _ArgumentsModule(wrapper, len(user))
        export_args = tuple(user) + tuple(wrapper._state(n).detach() for n in wrapper.state_names)
    else:
        module, export_args = wrapper, tuple(user)
    module.eval()
    with torch.no_grad():
        program = torch.export.export(module, export_args, strict=False)
    return program, list(wrapper.state_names)


def export_mlir(
    model: nn.Module,
    *example_inputs: Any,
    output_type: str = "torch",
    params: str = "literals",
    func_name: str = "main",
    **options: Any,
):
    """Export ``model`` converted to n-stream mHC as an MLIR module via torch-mlir's FX importer.

    ``example_inputs`` fix the (static) shapes. ``options`` are the backend's (``n``, ``mode``, ...);
    the mHC ops are always lowered through their reference decomposition. ``output_type``: "torch"
    (torch dialect at the backend contract; default), "linalg-on-tensors", "stablehlo", "tosa", or
    "raw" (the importer's output before any pass). ``params``: "literals" (parameters and buffers
    inlined as named constants) or "arguments" (trailing ``@main`` arguments tagged ``mhc.name``).
    The model is exported in inference form (no autograd); missing mHC parameters are created on
    ``model`` as by ``prepare``.

    Returns a ``torch_mlir.ir.Module`` (``str(module)`` is its text; ``module.operation.verify()``).
    Raises ``ValueError`` for an unknown ``output_type`` / ``params``, ``MHCConversionError`` when the
    model has graph breaks, ``ImportError`` (with the install line) without torch-mlir.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"export_mlir: unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
    if params not in PARAM_MODES:
        raise ValueError(f"export_mlir: unknown params {params!r}; expected one of {PARAM_MODES}")
    _require_torch_mlir()
    from torch_mlir import ir
    from torch_mlir.compiler_utils import OutputType, lower_mlir_module, run_pipeline_with_repro_report
    from torch_mlir.dialects import torch as torch_d
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table
    from torch_mlir.extras.fx_importer import FxImporter

    program, state_names = exported_program(model, *example_inputs, params=params, **options)
    # torch-mlir's own table (core ATen minus what it lowers better itself), as its export_and_import uses.
    with warnings.catch_warnings():
        # torch's own deepcopy of the program's pytree specs warns about a deprecated spelling.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = program.run_decompositions(get_decomposition_table())

    context = ir.Context()
    torch_d.register_dialect(context)
    with context, ir.Location.unknown(context):
        importer = FxImporter(context=context, hooks=_named_literal_hooks() if params == "literals" else None)
        func_op = importer.import_program(program, func_name=func_name)
        if params == "arguments":
            _tag_state_arguments(ir, func_op, state_names)
    mlir_module = importer.module
    if output_type == "raw":
        return mlir_module

    # torch-mlir's FX path: bring the imported IR to the torch backend contract, then lower it.
    run_pipeline_with_repro_report(
        mlir_module,
        "builtin.module(func.func(torch-match-quantized-custom-ops), torchdynamo-export-to-torch-backend-pipeline)",
        "Lowering TorchFX IR -> Torch Backend IR",
    )
    return lower_mlir_module(False, OutputType.get(output_type), mlir_module)


def _tag_state_arguments(ir, func_op, state_names: list[str]) -> None:
    """Give each state argument of @main (the trailing ones) an ``mhc.name`` attribute: its name in
    the model's state dict."""
    n_args = len(func_op.regions[0].blocks[0].arguments)
    first_state = n_args - len(state_names)
    attrs = []
    for i in range(n_args):
        entries = {} if i < first_state else {"mhc.name": ir.StringAttr.get(state_names[i - first_state])}
        attrs.append(ir.DictAttr.get(entries))
    func_op.arg_attrs = ir.ArrayAttr.get(attrs)
