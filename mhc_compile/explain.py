"""See what the backend did: the explain report, graph dumps and a picture of the rewritten region.

``explain(model, *example_inputs, **options)`` works on a deep copy of the model (the user's model gets
no parameters from it), runs the passes on every graph Dynamo produces, asks Dynamo where and why the
graph broke, and returns an ``ExplainReport`` that prints as a readable summary.
"""

from __future__ import annotations

import copy
import html
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class SiteInfo:
    path: str  # where its parameters live, e.g. "transformer.h.0.mhc_attn"
    owner_type: str  # class of the module owning the add
    width: int
    kind: str  # pre-norm | post-norm | parallel | plain
    graph: int
    chain: int
    index: int  # position in its chain
    parameters: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kernels: str = "reference"  # implementation and the mHC ops of this site, e.g. "triton: step"
    recompute_block: int | None = None


@dataclass
class ExplainReport:
    options: dict[str, Any]
    graph_count: int = 0
    graph_breaks: list[str] = field(default_factory=list)
    sites: list[SiteInfo] = field(default_factory=list)
    unconverted: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    recompute_blocks: list[list[str]] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)  # where the n streams cross a graph break (runtime/carry.py)
    traffic: list[str] = field(default_factory=list)  # cost-model lines, one per site width
    graphs_before: list[str] = field(default_factory=list)
    graphs_after: list[str] = field(default_factory=list)
    graph_modules: list[Any] = field(default_factory=list)  # the rewritten fx.GraphModule, or None

    @property
    def parameters_added(self) -> int:
        return sum(int(torch.Size(s).numel()) for site in self.sites for s in site.parameters.values())

    def summary(self) -> str:
        lines = [
            f"mhc explain: {len(self.sites)} residual site(s) in {self.graph_count} graph(s), "
            f"{len(self.graph_breaks)} graph break(s); options {self.options}",
            f"parameters added: {3 * len(self.sites)} tensors, {self.parameters_added:,} values",
        ]
        if self.sites:
            lines.append(f"  {'site':<44} {'kind':<10} {'C':>6} {'graph':>5} {'chain':>5} {'pos':>4} {'block':>5}  kernels")
            for s in self.sites:
                block = "-" if s.recompute_block is None else str(s.recompute_block)
                lines.append(f"  {s.path:<44} {s.kind:<10} {s.width:>6} {s.graph:>5} {s.chain:>5} {s.index:>4} {block:>5}  {s.kernels}")
        lines.extend(f"  {t}" for t in self.traffic)
        for brk in self.graph_breaks:
            lines.append(f"  graph break: {brk}")
        lines.extend(f"  carried: {c}" for c in self.carried)
        for item in self.unconverted:
            lines.append(f"  not converted: {item}")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def explain(model: nn.Module, *example_inputs: Any, print_summary: bool = True, **options: Any) -> ExplainReport:
    """Report every residual chain and site the backend finds and rewrites in ``model``.

    Works on a deep copy of ``model``. Graph breaks are listed from ``torch._dynamo.explain``, which
    resets Dynamo's caches: models compiled earlier in the process recompile at their next call.
    """
    from mhc_compile.api import trace
    from mhc_compile.config import MHCConfig

    config = MHCConfig.from_options(options)
    work = copy.deepcopy(model)
    with warnings.catch_warnings(record=True):  # they are collected in the report instead
        warnings.simplefilter("always")
        traced = trace(work, *example_inputs, **options)
    report = ExplainReport(options={k: v for k, v in options.items()} or {"n": config.n})
    report.graph_count = len(traced)
    report.graph_breaks = _graph_break_reasons(work, example_inputs)
    named = {name: mod for name, mod in work.named_modules()}
    block_of: dict[str, int] = {}
    for t in traced:
        for b, block in enumerate(t.report.recompute_blocks):
            report.recompute_blocks.append(block)
            for path in block:
                block_of[path] = len(report.recompute_blocks) - 1
    for t in traced:
        r = t.report
        report.graphs_before.append(r.before)
        report.graphs_after.append(r.after or r.before)
        report.graph_modules.append(r.gm)
        report.unconverted.extend(f"{u.node} in {u.module or '<root>'}: {u.reason}" for u in r.detection.unconverted)
        report.warnings.extend(w for w in r.warnings if "not converted" not in w)
        report.carried.extend(r.carried)
        ops_of = _ops_by_site(r.gm)
        for c, chain in enumerate(r.detection.chains):
            for site in chain.sites:
                owner = named.get(site.owner)
                params = named.get(site.path)
                report.sites.append(SiteInfo(
                    path=site.path, owner_type=type(owner).__name__ if owner is not None else "?",
                    width=site.width, kind=site.kind, graph=r.graph_index, chain=c, index=site.index,
                    parameters={k: tuple(p.shape) for k, p in params.named_parameters()} if params is not None else {},
                    kernels=(f"{r.impl}: {' + '.join(ops_of.get(site.path, []))}" if config.mode != "residual"
                             else "none (mode=residual)"),
                    recompute_block=block_of.get(site.path),
                ))
    if config.mode != "residual":
        from mhc_compile import cost

        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        size = torch.empty((), dtype=dtype).element_size()
        report.traffic = [cost.summary(config.n, width, size, fused=config.fuse,
                                       fold_stream_grads=config.fold_stream_grads,
                                       fold_pre_recompute=config.fold_pre_recompute,
                                       fold_boundary_grads=config.fold_boundary_grads)
                          for width in sorted({s.width for s in report.sites})]
    if print_summary:
        print(report.summary())
    return report


def _ops_by_site(gm) -> dict[str, list[str]]:
    """Site path -> the names of the mHC custom ops the rewritten graph runs for it, in graph order."""
    out: dict[str, list[str]] = {}
    for node in gm.graph.nodes if gm is not None else ():
        site = (node.meta.get("mhc") or {}).get("site")
        if site and getattr(node.target, "namespace", None) == "mhc_compile":
            out.setdefault(site, []).append(node.target._opname)
    return out


def _graph_break_reasons(model: nn.Module, example_inputs) -> list[str]:
    from mhc_compile import _compat

    try:
        return _compat.graph_break_reasons(model, example_inputs)
    except Exception as e:  # explain must not fail because Dynamo's own explain did
        log.debug("torch._dynamo.explain failed: %s", e)
        return [f"(could not list graph breaks: {e})"]


# --- dumps ----------------------------------------------------------------------------------------


def dump_graph(dump_dir: str, index: int, before: str, gm: fx.GraphModule | None) -> list[str]:
    """Write graph_<i>_before.py, graph_<i>_after.py and graph_<i>_mhc.svg; return the paths."""
    os.makedirs(dump_dir, exist_ok=True)
    paths = []
    path = os.path.join(dump_dir, f"graph_{index}_before.py")
    with open(path, "w") as f:
        f.write(before)
    paths.append(path)
    if gm is not None:
        path = os.path.join(dump_dir, f"graph_{index}_after.py")
        with open(path, "w") as f:
            f.write(gm.print_readable(print_output=False))
        paths.append(path)
        path = os.path.join(dump_dir, f"graph_{index}_mhc.svg")
        with open(path, "w") as f:
            f.write(region_svg(gm))
        paths.append(path)
    return paths


_ROLE_COLOURS = {
    "expand": "#c6dbef", "enter": "#fdae6b", "step": "#fd8d3c", "proj": "#fdd0a2", "coeffs": "#fdae6b",
    "pre": "#a1d99b", "post_res": "#74c476", "collapse": "#c6dbef", "branch_sum": "#dadaeb", "param": "#f0f0f0",
}


def region_svg(gm: fx.GraphModule, max_sites: int = 2) -> str:
    """A layered picture of the first ``max_sites`` rewritten sites: mHC nodes coloured by role, with
    the graph nodes that feed them or read them in grey."""
    sites: list[str] = []
    for node in gm.graph.nodes:
        site = (node.meta.get("mhc") or {}).get("site")
        if site and site not in sites and node.meta["mhc"].get("role") != "param":
            sites.append(site)
    keep_sites = set(sites[:max_sites])
    core = [n for n in gm.graph.nodes if (n.meta.get("mhc") or {}).get("site") in keep_sites
            and n.meta["mhc"].get("role") != "param" and n.target is not _getitem()]
    core_set = set(core)
    g = nx.DiGraph()
    for n in core:
        g.add_node(n)
        for inp in n.all_input_nodes:
            src = _skip_getitem(inp)
            if src.op == "placeholder" and (src.meta.get("mhc") or {}).get("role") == "param":
                continue
            g.add_edge(src, n)
        for user in n.users:
            dst = user
            if dst not in core_set and dst.op != "output":
                g.add_edge(n, dst)
    if g.number_of_nodes() == 0:
        return '<svg xmlns="http://www.w3.org/2000/svg" width="200" height="40"><text x="10" y="25">no mHC nodes</text></svg>'
    layers = list(nx.topological_generations(g))
    box_w, box_h, gap_x, gap_y = 170, 34, 20, 40
    width = max(len(layer) for layer in layers) * (box_w + gap_x) + gap_x
    height = len(layers) * (box_h + gap_y) + gap_y
    pos = {}
    for row, layer in enumerate(layers):
        for col, node in enumerate(sorted(layer, key=lambda n: n.name)):
            pos[node] = (gap_x + col * (box_w + gap_x), gap_y + row * (box_h + gap_y))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="11">',
             '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="8" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>']
    for src, dst in g.edges:
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        parts.append(f'<line x1="{x1 + box_w / 2}" y1="{y1 + box_h}" x2="{x2 + box_w / 2}" y2="{y2}" '
                     'stroke="#555" marker-end="url(#a)"/>')
    for node, (x, y) in pos.items():
        role = (node.meta.get("mhc") or {}).get("role")
        fill = _ROLE_COLOURS.get(role, "#ffffff")
        label = html.escape(_label(node))
        site = html.escape((node.meta.get("mhc") or {}).get("site") or "")
        parts.append(f'<g><title>{site}</title><rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="5" '
                     f'fill="{fill}" stroke="#333"/><text x="{x + 6}" y="{y + 21}">{label}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def _getitem():
    import operator

    return operator.getitem


def _skip_getitem(node: fx.Node) -> fx.Node:
    return node.args[0] if node.target is _getitem() and isinstance(node.args[0], fx.Node) else node


def _label(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    target = str(target).replace("mhc_compile.", "").replace(".default", "")
    text = f"{node.name}: {target}"
    return text if len(text) <= 24 else text[:23] + "…"
