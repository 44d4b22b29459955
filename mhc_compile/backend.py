"""The ``mhc`` torch.compile backend: detect -> rewrite -> fuse -> recompute tags -> inner compiler.

    torch.compile(model, backend="mhc", options={"n": 4})

Each Dynamo graph is copied (Dynamo's own graph object is never touched), its residual chains are
rewritten into n-stream mHC with the per-site parameters appended as extra graph inputs, and the result
goes to Inductor (``compile_fx``) or the configured inner backend. The returned callable appends the
parameters (the user's own ``nn.Parameter`` objects, so optimizer updates and ``load_state_dict`` are
seen) after Dynamo's arguments.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from mhc_compile import _compat
from mhc_compile import distributed
from mhc_compile.config import MHCConfig
from mhc_compile.errors import MHCConversionError
from mhc_compile.passes import inline_checkpoints
from mhc_compile.passes import (broadcast_collapse_grad, collapse_head_grad, collapse_tail, fold_boundary_grads,
                                 fold_post_res_proj, fold_pre_recompute, fold_recompute_chain, fold_stream_grads,
                                 inplace_stream_grads, post_grad)
from mhc_compile.passes import fuse as fuse_pass
from mhc_compile.passes import recompute as recompute_pass
from mhc_compile.passes import schedule as schedule_pass
from mhc_compile.passes.detect import Detection, detect
from mhc_compile.passes.rewrite import SiteParams, rewrite
from mhc_compile.runtime import ops as _ops  # noqa: F401  (registers torch.ops.mhc_compile.*)
from mhc_compile.runtime.binding import ParamBinder, SiteSpec, choose_anchor
from mhc_compile.runtime.carry import StreamCarry, example_inputs as carry_examples
from mhc_compile.runtime.params import ensure_record, get_or_create_site, lift_to_known_root, record_for

log = logging.getLogger("mhc_compile")


@dataclass
class GraphReport:
    """What the backend did to one compiled graph (collected for ``explain`` and tests)."""

    graph_index: int
    detection: Detection
    sites: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    impl: str = "reference"
    recompute_blocks: list[list[str]] = field(default_factory=list)
    fused: dict[str, int] = field(default_factory=dict)  # sites fused into "step" / "enter" ops
    ddp_pieces: int = 0  # pieces compiled apart at DDP's gradient buckets (schedule.compile_for_ddp); 0: not split
    carried: list[str] = field(default_factory=list)  # where n streams cross a graph break (runtime/carry.py)
    before: str = ""
    after: str = ""
    gm: fx.GraphModule | None = None


# Reports of the graphs compiled so far, newest last; ``explain`` and tests read them.
REPORTS: list[GraphReport] = []


def mhc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None,
                mode: str | None = None) -> Callable:
    """Entry point registered as ``backend="mhc"`` (``torch_dynamo_backends`` entry point)."""
    config = MHCConfig.from_options(options)
    if mode is not None and config.compile_mode is not None and mode != config.compile_mode:
        raise ValueError(f"mhc: torch.compile(mode={mode!r}) and options compile_mode={config.compile_mode!r} disagree")
    mode = mode if mode is not None else config.compile_mode
    _check_inductor_mode(mode)
    return compile_graph(gm, list(example_inputs), config, inductor_mode=mode)


def _check_inductor_mode(mode: str | None) -> None:
    """``torch.compile(mode=...)`` reaches a custom backend as a keyword; check it the way Inductor would."""
    if mode is None or mode == "default":
        return
    import torch._inductor

    try:
        torch._inductor.list_mode_options(mode)
    except RuntimeError:
        valid = ["default", *torch._inductor.list_mode_options().keys()]
        raise ValueError(f"mhc: unknown torch.compile mode {mode!r}; valid modes are {valid}") from None


# Stream dtypes the Triton kernels take (kernels/triton_ops.py); other dtypes are never silently cast.
TRITON_STREAM_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_impl_dtypes(impl: str, detection: Detection) -> None:
    if impl != "triton":
        return
    for site in detection.sites:
        value = site.stream.meta.get("example_value", site.stream.meta.get("val"))
        dtype = getattr(value, "dtype", None)
        if dtype is not None and dtype not in TRITON_STREAM_DTYPES:
            raise TypeError(
                f"mhc: kernels='triton' does not support the {dtype} residual stream of site {site.path}; "
                f"supported: {', '.join(map(str, TRITON_STREAM_DTYPES))}. Use kernels='reference'."
            )


# The last graph break Dynamo reported to us (reason, "file:line"): a graph compiled after it (the resumed
# frame) names it when its chain starts at a graph input.
_LAST_BREAK: list[str] = []
# Whether the last graph compiled returned a chain's n streams (runtime/carry.py): a frame resumed right after it
# should then start its chain from them, and is warned when it does not.
_LAST_CARRIED_OUT: list[bool] = [False]


def _break_reason(gm: fx.GraphModule) -> str | None:
    reason = getattr(gm, "compile_subgraph_reason", None)
    if reason is None or not getattr(reason, "graph_break", False):
        return None
    text = str(getattr(reason, "reason", "")).strip().splitlines()
    where = ""
    stack = getattr(reason, "user_stack", None) or []
    if stack:
        frame = stack[-1]
        where = f" at {frame.filename}:{frame.lineno} in {frame.name}()"
    return f"{text[0] if text else 'graph break'}{where}"


def _choose_impl(config: MHCConfig, example_inputs: Sequence[Any]) -> str:
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if config.kernels == "reference":
        return "reference"
    if config.kernels == "triton":
        return "triton"
    return "triton" if on_cuda and _triton_available() else "reference"


def _triton_available() -> bool:
    try:
        import mhc_compile.kernels.triton_ops  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def _resolve_root(detection: Detection) -> nn.Module:
    """The user's module that owns the residual adds, from the frame Dynamo is compiling."""
    f_locals = _compat.dynamo_frame_locals()
    if f_locals is None:
        raise MHCConversionError(
            "mhc: cannot reach the model's modules from this compile (the backend was not called by "
            "Dynamo); call mhc_compile.prepare(model, *example_inputs) first"
        )
    roots = []
    for site in detection.sites:
        stack = site.out.meta.get("nn_module_stack") or {}
        raw = next(iter(stack.values()))[0] if stack else None
        resolved = _compat.resolve_module(raw, f_locals) if raw else None
        if resolved is None:
            # An add in the compiled function itself: the module is the frame's `self` (or, in a frame
            # resumed after a graph break whose method names it otherwise, its only module local).
            candidate = f_locals.get("self")
            if not isinstance(candidate, nn.Module):
                mods = [v for k, v in f_locals.items() if isinstance(v, nn.Module) and not k.startswith("__")]
                candidate = mods[0] if len(mods) == 1 else None
            if not isinstance(candidate, nn.Module):
                raise MHCConversionError(
                    f"mhc: residual add {site.out.name!r} is not inside an nn.Module; the mHC parameters need a "
                    "module to live on. Compile the model (an nn.Module), not a free function."
                )
            roots.append(candidate)
        elif resolved is not None:
            roots.append(resolved[0])
    root = roots[0]
    if any(r is not root for r in roots):
        raise MHCConversionError("mhc: residual adds of one graph belong to different root modules")
    return root


def _register_frame_root() -> None:
    """Remember the module whose forward Dynamo compiles, even when this graph has no sites: after a
    graph break inside a block, the block's own frame is compiled next, and its sites must be named
    (and found) by their path in this outer model."""
    f_locals = _compat.dynamo_frame_locals() or {}
    root = f_locals.get("self")
    if not isinstance(root, nn.Module) or record_for(root) is not None:
        return
    outer, _ = lift_to_known_root(root)
    if outer is not root:
        return
    for caller in _compat.modules_on_call_stack():  # outermost first
        if caller is root or any(sub is root for sub in caller.modules()):
            ensure_record(caller)
            return


def _warn_shared_modules(detection: Detection, root: nn.Module) -> None:
    """A module whose forward runs more than once in a graph (one block used for several layers) owns the
    residual adds of every call; each call gets its own sites. Say so, naming the module."""
    repeated: dict[str, list[str]] = {}
    for site in detection.sites:
        if site.repeat:
            repeated.setdefault(site.owner, []).append(site.path)
    for owner, paths in repeated.items():
        owner_sites = [s.path for s in detection.sites if s.owner == owner]
        kind = type(root.get_submodule(owner)).__name__ if owner else type(root).__name__
        warnings.warn(
            f"mhc: module {owner or '<root>'!r} ({kind}) runs more than once in this graph (shared between "
            f"layers); each call gets its own mHC parameters: {', '.join(owner_sites)}. A call separated from "
            "the others by a graph break would share the first call's parameters instead.",
            stacklevel=3,
        )


def _check_graph_breaks(detection: Detection, gm: fx.GraphModule, config: MHCConfig, root: nn.Module,
                        here: str | None, before: str | None,
                        partial: bool) -> tuple[list[str], frozenset[int], frozenset[int]]:
    """A chain that starts at a graph input or ends at a graph output was cut by a graph break: (the warnings,
    the ids of the chains whose n streams are carried in across it, and those carried out; runtime/carry.py).

    ``here`` is the reason Dynamo ended this graph with, ``before`` the one that ended the graph before it;
    ``partial``: the compiled frame belongs to a module inside a larger converted model (Dynamo compiles a
    block's frame alone when it cannot compile the loop around it, and a block compiled on its own is one). A
    model whose forward simply takes the hidden states as input, or returns them, is not cut anywhere.
    Token streams are carried; a channel-first chain (convolutional blocks) is collapsed at the break, with a
    warning (an error under ``strict``)."""
    outputs = set(next(n for n in reversed(gm.graph.nodes) if n.op == "output").all_input_nodes)
    messages, carry_in, carry_out = [], set(), set()
    for chain in detection.chains:
        head, tail = chain.head, chain.sites[-1]
        where = []
        if head.op == "placeholder" and (before or partial):
            why = f", resumed after a graph break: {before}" if before else ""
            where.append(f"it starts at graph input {head.name!r} (before {chain.sites[0].path}{why})")
            carry_in.add(id(chain))
        if (here or partial) and (tail.out in outputs or any(n in outputs for n in chain.links[-1])):
            why = f", where Dynamo broke the graph: {here}" if here else ""
            where.append(f"it ends at a graph output (after {tail.path}{why})")
            carry_out.add(id(chain))
        if not where:
            continue
        if tail.channel_dim == -1:
            log.info("mhc: graph break inside the residual stack of %s: %s; its n streams are carried across "
                     "(runtime/carry.py)", type(root).__name__, " and ".join(where))
            continue
        carry_in.discard(id(chain))
        carry_out.discard(id(chain))
        messages.append(
            f"mhc: graph break inside the residual stack of {type(root).__name__}: " + " and ".join(where)
            + ". The n streams of this channel-first chain are "
            "collapsed (mean) at the break and re-expanded after it, so mixing across the break is lost; "
            "remove the graph break (TORCH_LOGS=graph_breaks names it) to keep the streams."
        )
    for msg in messages:
        if config.strict:
            raise MHCConversionError(msg + " (strict=True)")
        warnings.warn(msg, stacklevel=2)
    return messages, frozenset(carry_in), frozenset(carry_out)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: MHCConfig, *,
                  inductor_mode: str | None = None, plan_only: bool = False, lazily: bool = True,
                  on_graph: Callable[[fx.GraphModule, list, GraphReport], None] | None = None) -> Callable:
    """Run the passes on one Dynamo graph and compile the result, in three stages: find the residual sites
    (``_analyse``), make their parameters on the user's modules (``_site_parameters``), rewrite and lower the graph
    (``_lower``), then hand it to the inner compiler.

    ``plan_only`` stops after creating parameters (``prepare``); ``on_graph`` receives the final graph
    (rewritten or not), its example inputs (mHC parameters appended) and the report (``trace``)."""
    distributed.check_graph_whole()
    work, detection, report, breaks = _analyse(gm, config)
    carried_before, _LAST_CARRIED_OUT[0] = _LAST_CARRIED_OUT[0], False
    if not detection.sites or config.mode == "residual":
        if not detection.sites:
            log.info("mhc: graph %d has no residual adds; compiled unchanged", report.graph_index)
            if config.dump_dir:
                from mhc_compile.explain import dump_graph

                dump_graph(config.dump_dir, report.graph_index, report.before, None)
        else:
            report.sites.extend(f"{site.path} ({site.kind}, C={site.width})" for site in detection.sites)
            log.info("mhc: mode=residual, %d residual site(s) found in graph %d and left as they are",
                     len(detection.sites), report.graph_index)
        if on_graph is not None:
            on_graph(gm, example_inputs, report)
        return gm.forward if plan_only else _compile_rewritten(gm, example_inputs, config, inductor_mode, report)

    frame_module = _resolve_root(detection)
    root, prefix, specs, params = _site_parameters(work, detection, frame_module, config, example_inputs, report,
                                                   lazily)
    cut, carry_in, carry_out = _check_graph_breaks(detection, work, config, root, *breaks, partial=bool(prefix))
    report.warnings.extend(cut)
    binder = _bind(frame_module, root, prefix, specs, example_inputs, params, detection, lazily)
    if plan_only:
        if binder is None:
            return gm.forward

        def plan(*args):
            binder.extras(args)  # creates the sites of every instance this graph runs for
            return gm.forward(*args)

        return plan

    result = _lower(work, detection, config, _choose_impl(config, example_inputs), params, report, carry_in,
                    carry_out)
    carry, streams_in = _carry(result, work, config, example_inputs, carried_before)
    report.carried = ([f"{site} starts from the n streams its input carries from a graph before, if it carries any"
                       for _, site in result.stream_heads]
                      + [f"{site} hands its n streams to the next graph" for site in result.stream_tail_sites])
    _LAST_CARRIED_OUT[0] = bool(result.stream_tails)
    extra = result.extra_inputs + streams_in
    if on_graph is not None:
        on_graph(result.gm, example_inputs + extra, report)
    try:
        compiled = _compile_rewritten(result.gm, example_inputs + _as_trainable(result.extra_inputs) + streams_in,
                                      config, inductor_mode, report)
    except _compat.dynamo_restart() as e:  # Dynamo's own signal to trace the frame again (e.g. floats specialised)
        raise e
    except Exception as e:
        _report_inner_failure(report, config, detection, e)
        compiled = result.gm.forward

    if carry is not None:
        params_of = (lambda args, fixed=result.extra_inputs: fixed) if binder is None else binder.extras

        def run(*args):
            return carry.outputs(compiled(*args, *params_of(args), *carry.inputs(args)))
    elif binder is None:
        def run(*args):
            return compiled(*args, *extra)
    else:
        def run(*args):
            return compiled(*args, *binder.extras(args))

    return run


def _as_trainable(site_params: list) -> list:
    """The sites' parameters as the inner compiler sees them: each requiring grad (when grad mode is on).

    They are the backend's inputs, not Dynamo's, so no guard of Dynamo's sees their requires_grad: a graph compiled
    while they were frozen (PEFT's get_peft_model freezes them) would go on giving them no gradient once they are
    unfrozen. Compiled as trainable, a frozen site's gradients are computed and dropped by autograd."""
    if not torch.is_grad_enabled():
        return site_params
    return [p if p.requires_grad else p.detach().requires_grad_(True) for p in site_params]


def _carry(result, work: fx.GraphModule, config: MHCConfig, example_inputs: list,
           carried_before: bool) -> tuple[StreamCarry | None, list]:
    """What carries the n streams of the chains cut by a graph break (runtime/carry.py), and example X_0 for the
    chains it starts; (None, []) when no chain is cut. ``carried_before``: the graph compiled before this one
    returned n streams, so a frame resumed after it expects them."""
    if not (result.stream_heads or result.stream_tails):
        return None, []
    expected = carried_before and _compat.compiling_resume_function()
    carry = StreamCarry(config.n, result.stream_heads, result.stream_tails, resumed=expected, strict=config.strict)
    fakes = [node.meta.get("example_value") for node in work.graph.find_nodes(op="placeholder")]
    return carry, carry_examples(result.stream_heads, config.n, example_inputs, fakes)


def _analyse(gm: fx.GraphModule, config: MHCConfig) -> tuple[fx.GraphModule, Detection, GraphReport, tuple]:
    """Stage 1: a copy of the graph with activation-checkpoint regions inlined, its residual sites and chains, the
    graph's report (in ``REPORTS``), and the graph breaks at this graph's start and the previous one's. Adds that
    are not converted are warned of, or raise under ``strict``."""
    index = len(REPORTS)
    break_here = _break_reason(gm)
    break_before = _LAST_BREAK[0] if _LAST_BREAK else None
    _LAST_BREAK[:] = [break_here] if break_here else []
    _register_frame_root()
    work = _copy_graph_module(gm)
    left_regions = inline_checkpoints.apply(work)
    detection = detect(work)
    detection.unconverted.extend(left_regions)
    report = GraphReport(graph_index=index, detection=detection, before=gm.print_readable(print_output=False))
    REPORTS.append(report)
    for item in detection.unconverted:
        msg = f"mhc: not converted: {item.node} in {item.module or '<root>'}: {item.reason}"
        report.warnings.append(msg)
        if config.strict:
            raise MHCConversionError(msg + " (strict=True)")
        warnings.warn(msg, stacklevel=3)
    for site in detection.sites:
        log.debug("mhc: graph %d: site %s = %s + %s (%s)", index, site.out.name, site.stream.name,
                  " + ".join(b.name for b in site.branches), site.kind)
    return work, detection, report, (break_here, break_before)


def _site_parameters(work: fx.GraphModule, detection: Detection, frame_module: nn.Module,
                     config: MHCConfig, example_inputs: list, report: GraphReport,
                     lazily: bool) -> tuple[nn.Module, str, list[SiteSpec], dict[str, SiteParams]]:
    """Stage 2: each site's phi / bias / alpha, found on or created as ordinary parameters of the module that owns
    its residual add (DESIGN.md section 3). Returns the model root, the frame's prefix under it, the sites' specs
    and their parameters by site path. Warns of modules shared between sites and of parameters it had to create
    that an optimizer may have missed."""
    device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    root, prefix = lift_to_known_root(frame_module)
    specs, params = [], {}
    for site in detection.sites:
        specs.append(SiteSpec(site.owner, site.name, config.n, config.mode, site.width, site.index, config.alpha_init))
        owner = ".".join(p for p in (prefix, site.owner) if p)
        module, created = get_or_create_site(
            root, owner, site.name, n=config.n, mode=config.mode, width=site.width, index=site.index,
            alpha_init=config.alpha_init, device=device, lazily=lazily,
        )
        site.owner = owner
        if created:
            report.created.append(site.path)
        params[site.path] = SiteParams(module.phi, module.bias, module.alpha)
    distributed.check_synced({path: (p.phi, p.bias, p.alpha) for path, p in params.items()})
    report.sites[:] = [f"{s.path} ({s.kind}, C={s.width})" for s in detection.sites]
    _warn_shared_modules(detection, root)
    record = record_for(root)
    record.strict = record.strict or config.strict
    if report.created and lazily:
        n_params = 3 * len(report.created)
        msg = (
            f"mhc: created {n_params} mHC parameters for {len(report.created)} residual site(s) of "
            f"{type(root).__name__} at its first compile (e.g. {report.created[0]}). An optimizer built before "
            "this call does not hold them: call mhc_compile.prepare(model, *example_inputs) before building it."
        )
        warnings.warn(msg, stacklevel=3)
    return root, prefix, specs, params


def _lower(work: fx.GraphModule, detection: Detection, config: MHCConfig, impl: str,
           params: dict[str, SiteParams], report: GraphReport, carry_in: frozenset = frozenset(),
           carry_out: frozenset = frozenset()):
    """Stage 3: the rewrite to n streams on the ops of ``impl`` (the chains in ``carry_in`` / ``carry_out`` take /
    return their n streams across a graph break), then the graph passes (fuse, recompute, the scheduler's slot);
    records the result in the report and publishes it (``dump_dir``, ``verbose``)."""
    _check_impl_dtypes(impl, detection)
    report.impl = impl
    result = rewrite(work, detection, config, impl, params, carry_in, carry_out)
    report.fused = fuse_pass.apply(result.gm, config)
    report.recompute_blocks = recompute_pass.apply(result.gm, detection, config)
    schedule_pass.apply(result.gm, config)
    report.after = result.gm.print_readable(print_output=False)
    report.gm = result.gm
    _publish(report, config)
    if config.verbose:
        print(f"[mhc] graph {report.graph_index}: {len(detection.sites)} site(s) in {len(detection.chains)} "
              f"chain(s), n={config.n}, mode={config.mode}, kernels={impl}")
    log.info("mhc: graph %d rewritten: %s", report.graph_index, ", ".join(report.sites))
    return result


def _bind(frame_module: nn.Module, root: nn.Module, prefix: str, specs: list[SiteSpec], example_inputs: list,
          params: dict[str, SiteParams], detection: Detection, lazily: bool) -> ParamBinder | None:
    """Make the compiled graph take the mHC parameters of whichever instance it runs for
    (runtime/binding.py says why). A graph of a whole converted model is kept to that model by an
    identity guard instead: its parameters are in no other converted model to be found from."""
    if not prefix:
        _compat.guard_identity(frame_module)
    anchor = choose_anchor(frame_module, root, example_inputs)
    if anchor is None:
        log.debug("mhc: no parameter of %s among the graph's inputs; mHC parameters bound at compile time",
                  type(frame_module).__name__)
        return None
    index, name = anchor
    first = [t for site in detection.sites for t in (params[site.path].phi, params[site.path].bias,
                                                        params[site.path].alpha)]
    return ParamBinder(anchor_index=index, anchor_name=name, frame_type=type(frame_module), specs=specs,
                       first_anchor=example_inputs[index], first_extras=first, lazily=lazily)


def _publish(report: GraphReport, config: MHCConfig) -> None:
    """Make the rewrite visible: debug log (TORCH_LOGS="+mhc_compile"), structured trace artifact
    (TORCH_TRACE / tlparse) and, with ``dump_dir``, files with the graphs and a picture."""
    log.debug("mhc: graph %d after the rewrite:\n%s", report.graph_index, report.after)
    _compat.trace_artifact(f"mhc_rewritten_graph_{report.graph_index}", lambda: report.after)
    if config.dump_dir:
        from mhc_compile.explain import dump_graph

        for path in dump_graph(config.dump_dir, report.graph_index, report.before, report.gm):
            log.info("mhc: wrote %s", path)


def _report_inner_failure(report: GraphReport, config: MHCConfig, detection: Detection, error: Exception) -> None:
    """The inner compiler failed on a rewritten graph: say so, then the graph runs eagerly (raise under strict).

    Raising instead would let Dynamo recover its own way from some failures (a data-dependent op, e.g. the
    ``.item()`` of transformers 5.17's MoE grouped_mm path on CUDA, 2026-11-23): split the graph and run
    the failing part without this backend, so its sites would silently stay plain residual adds while their
    mHC parameters exist and get no gradient. Run eagerly, the rewritten graph keeps every site converted
    (the mHC ops still run their kernels); only the rest of that graph loses Inductor's fusion.
    """
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    sites = ", ".join(s.path for s in detection.sites)
    msg = (f"mhc: {config.inner_backend} failed to compile rewritten graph {report.graph_index} ({reason[:300]}); "
           f"the graph runs eagerly instead, so its residual site(s) {sites} stay converted but the rest of "
           f"it is not compiled")
    report.warnings.append(msg)
    if config.strict:
        raise MHCConversionError(msg + " (strict=True)") from error
    warnings.warn(msg, stacklevel=3)


def _compile_rewritten(gm: fx.GraphModule, example_inputs: list, config: MHCConfig, mode: str | None,
                       report: GraphReport) -> Callable:
    """The inner compiler on the rewritten graph: in pieces at DDP's gradient buckets while a DDP's forward runs
    (``schedule.compile_for_ddp``), else whole."""
    def compile_piece(piece: fx.GraphModule, inputs: list) -> Callable:
        return _inner_compile(piece, inputs, config, mode)

    split = schedule_pass.compile_for_ddp(gm, example_inputs, config, compile_piece)
    if split is None:
        return compile_piece(gm, example_inputs)
    compiled, report.ddp_pieces = split
    return compiled


def _inner_compile(gm: fx.GraphModule, example_inputs: list, config: MHCConfig, mode: str | None) -> Callable:
    if config.inner_backend == "eager":
        return gm.forward
    if config.inner_backend == "aot_eager":
        return _compat.lookup_backend("aot_eager")(gm, example_inputs)
    from mhc_compile.runtime.ops import all_ops, direct_ops

    _compat.register_inductor_fallbacks(all_ops(), calls=direct_ops())
    patches = dict(config.inductor_options)
    if mode and mode != "default":
        import torch._inductor

        patches = {**torch._inductor.list_mode_options(mode), **patches}
    # each pass rewrites its own pattern and leaves graphs without it alone: the fold_* passes act on backward
    # graphs, fold_post_res_proj and collapse_tail on forward graphs; fold_recompute_chain first (the others then see
    # a block's rebuilt streams as the getitems of one chain); broadcast_collapse_grad and collapse_head_grad
    # (on the proj_pre_backward nodes fold_stream_grads makes) before inplace_stream_grads (they make the last site's
    # gradient a view and the head's a row, which that pass leaves alone), fold_boundary_grads after collapse_head_grad
    # (which leaves the head's post_res backward collapsed, a call it does not fold), inplace_stream_grads last, as it
    # makes the graph mutate
    passes = [p for p, on in ((fold_recompute_chain, config.fold_recompute_chain),
                              (fold_stream_grads, config.fold_stream_grads),
                              (fold_pre_recompute, config.fold_pre_recompute),
                              (fold_post_res_proj, config.fold_post_res_proj),
                              (collapse_tail, config.collapse_tail),
                              (broadcast_collapse_grad, config.broadcast_collapse_grad),
                              (collapse_head_grad, config.collapse_head_grad),
                              (fold_boundary_grads, config.fold_boundary_grads),
                              (inplace_stream_grads, config.inplace_stream_grads)) if on]
    import torch._inductor.config as inductor_config

    theirs = patches.get("post_grad_custom_post_pass", inductor_config.post_grad_custom_post_pass)
    patches["post_grad_custom_post_pass"] = post_grad.PostGradPasses(passes, then=theirs)
    return _compat.inductor_compile_fx()(gm, example_inputs, config_patches=patches or None)
