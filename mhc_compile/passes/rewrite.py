"""Rewrite detected residual chains into n-stream mHC.

For a chain with sites k = 0..K-1 (streams s_k, branch outputs y_k):

    X_0  = expand(s_0)                                  [..., n, C], every stream s_0 (a stride-0 view)
    p, sq = proj(X_k, phi_k); H = coeffs(p, sq, b_k, alpha_k)
    x_in = pre(X_k, H_pre)           -> replaces s_k wherever the sublayer reads it
    X'_k = post_res(X_k, H_res, H_post, y_k)           replaces the residual add(s)
    X_k+1 = stream-wise ops (post-norm LayerNorm, dropout) applied to X'_k, now on all streams

Any other reader of a widened value (an observer: output_hidden_states, the chain's tail, a value
kept for later) gets ``collapse(X) = mean_i X[i]`` (or the sum), which equals the original stream at init.

Channel-first chains (convolutional blocks, ``site.channel_dim == 1``, stream ``[B, C, H, W]``): the mHC
ops want C last, so the widened stream is kept as ``[B, H, W, n, C]`` for the whole chain: the head is
``movedim(1, -1)`` before the expand, ``x_in`` is moved back to ``[B, C, H, W]`` for the sublayer, the
branch output ``y`` is moved C-last before ``post_res``, elementwise link ops (relu) act on the wide
stream as they are (made out of place), and a collapsed observer gets ``movedim(-1, 1)`` after the mean.
The moves are views; the convolutions read ``x_in`` in channels-last strides.

The pass works on a copy of Dynamo's graph (never on Dynamo's own object) and appends one placeholder
per parameter; the caller passes the parameters after the graph's own inputs. A chain cut by a graph break
(``backend._check_graph_breaks``) starts from one more placeholder, its n streams X_0 (after the parameters),
and/or also returns its last n streams after the graph's own outputs (runtime/carry.py carries them across).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from mhc_compile.config import MHCConfig
from mhc_compile.passes.detect import Chain, Detection, Site, is_token_reshape, reshape_args

OPS = torch.ops.mhc_compile


@dataclass
class SiteParams:
    phi: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor


@dataclass
class RewriteResult:
    gm: fx.GraphModule
    extra_inputs: list[torch.Tensor]  # appended after the graph's own inputs, in placeholder order
    # chains carried across graph breaks (runtime/carry.py): (input index of the head, first site's path) of each
    # chain whose X_0 is a placeholder after the parameters; (output index of the collapsed tail, output index of
    # its n streams, appended last) of each chain whose n streams the graph also returns
    stream_heads: list[tuple[int, str]] = field(default_factory=list)
    stream_tails: list[tuple[int, int]] = field(default_factory=list)
    stream_tail_sites: list[str] = field(default_factory=list)  # the last site of each chain in stream_tails


def _copy_meta(new: fx.Node, like: fx.Node, site: Site | None, role: str) -> fx.Node:
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    new.meta["mhc"] = {"site": site.path if site else None, "role": role}
    return new


class _ChainRewriter:
    def __init__(self, graph: fx.Graph, config: MHCConfig, impl: str):
        self.graph = graph
        self.config = config
        self.impl = impl
        self.n = config.n
        self.wide: set[fx.Node] = set()  # nodes whose value is now [..., n, C]
        self.mhc_nodes: set[fx.Node] = set()
        self.channel_dim: dict[fx.Node, int] = {}  # wide node -> the stream's channel dim (1: channel-first)
        self.collapsed: dict[fx.Node, fx.Node] = {}  # wide node -> its collapse, where something observes it

    def call(self, target, args, like: fx.Node, site: Site | None, role: str, kind="call_function") -> fx.Node:
        if kind == "call_method":
            node = self.graph.call_method(target, args)
        else:
            node = self.graph.call_function(target, args)
        self.mhc_nodes.add(node)
        return _copy_meta(node, like, site, role)

    def expand(self, head: fx.Node, site: Site) -> fx.Node:
        ndim = len(head.meta["example_value"].shape)
        at = head
        if head.op == "placeholder":  # a graph input: go past every placeholder, ours included
            at = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        src = head
        if site.channel_dim != -1:  # [B, C, H, W] -> [B, H, W, C]
            with self.graph.inserting_after(at):
                src = at = self.call("movedim", (head, site.channel_dim, -1), head, site, "expand", kind="call_method")
        with self.graph.inserting_after(at):
            u = self.call("unsqueeze", (src, -2), head, site, "expand", kind="call_method")
        # The expand stays a view (stride 0 over the n streams): the ops read its one row a token
        # (triton_common.stream_arg) instead of a copy that writes n of them, in the forward and again in the
        # recomputing backward.
        with self.graph.inserting_after(u):
            e = self.call("expand", (u, *([-1] * (ndim - 1)), self.n, -1), head, site, "expand", kind="call_method")
        self.wide.add(e)
        self.channel_dim[e] = site.channel_dim
        return e

    def site(self, site: Site, x: fx.Node, params: tuple[fx.Node, fx.Node, fx.Node], region: set[fx.Node],
             stream_now: fx.Node) -> fx.Node:
        cfg, impl, n = self.config, self.impl, self.n
        phi, bias, alpha = params
        out = site.out
        with self.graph.inserting_after(x):
            proj = self.call(OPS.proj.default, (x, phi, impl), out, site, "proj")
        with self.graph.inserting_after(proj):
            p = self.call(operator.getitem, (proj, 0), out, site, "proj")
        with self.graph.inserting_after(p):
            sq = self.call(operator.getitem, (proj, 1), out, site, "proj")
        coeff_args = (p, sq, bias, alpha, n, n * site.width, cfg.eps, cfg.sinkhorn_iters, cfg.mode, impl, site.path,
                      cfg.check_finite)
        with self.graph.inserting_after(sq):
            coeffs = self.call(OPS.coeffs.default, coeff_args, out, site, "coeffs")
        h = []
        last = coeffs
        for i in range(3):
            with self.graph.inserting_after(last):
                last = self.call(operator.getitem, (coeffs, i), out, site, "coeffs")
            h.append(last)
        h_pre, h_post, h_res = h
        if cfg.res_convention == "transpose":
            with self.graph.inserting_after(last):
                h_res = last = self.call("transpose", (h_res, -1, -2), out, site, "coeffs", kind="call_method")
        with self.graph.inserting_after(last):
            x_in = self.call(OPS.pre.default, (x, h_pre, impl, site.path, cfg.check_finite), out, site, "pre")
        if site.channel_dim != -1:  # the sublayer reads [B, C, H, W]
            with self.graph.inserting_after(x_in):
                x_in = self.call("movedim", (x_in, -1, site.channel_dim), out, site, "pre", kind="call_method")

        # The sublayer now reads x_in where it read the stream.
        for user in list(stream_now.users):
            if user in region:
                user.replace_input_with(stream_now, x_in)

        with self.graph.inserting_before(out):
            y = site.branches[0]
            for extra in site.branches[1:]:
                y = self.call(operator.add, (y, extra), out, site, "branch_sum")
            if site.channel_dim != -1:  # y [B, C, H, W] -> [B, H, W, C]
                y = self.call("movedim", (y, site.channel_dim, -1), out, site, "branch_sum", kind="call_method")
            x_out = self.call(OPS.post_res.default, (x, h_res, h_post, y, impl), out, site, "post_res")
        self.wide.add(x_out)
        self.channel_dim[x_out] = site.channel_dim
        out.replace_all_uses_with(x_out)
        for add in reversed(site.adds):
            self.graph.erase_node(add)
        return x_out

    def collapse_observers(self) -> None:
        """Give every reader of a widened value that is not part of the chain the collapsed stream."""
        reduce = torch.mean if self.config.collapse == "mean" else torch.sum
        for w in list(self.wide):
            observers = [u for u in w.users if u not in self.mhc_nodes and u not in self.wide]
            if not observers:
                continue
            with self.graph.inserting_after(w):
                c = self.graph.call_function(reduce, (w,), {"dim": -2})
            _copy_meta(c, w, None, "collapse")
            cdim = self.channel_dim.get(w, -1)
            if cdim != -1:  # back to [B, C, H, W]
                with self.graph.inserting_after(c):
                    c = _copy_meta(self.graph.call_method("movedim", (c, -1, cdim)), w, None, "collapse")
            self.collapsed[w] = c
            for u in observers:
                u.replace_input_with(w, c)


def _branch_region(site: Site, an) -> set[fx.Node]:
    return set().union(*(an.between(site.stream, y) for y in site.branches))


def rewrite(gm: fx.GraphModule, detection: Detection, config: MHCConfig, impl: str,
            params: dict[str, SiteParams], carry_in: frozenset = frozenset(),
            carry_out: frozenset = frozenset()) -> RewriteResult:
    """Rewrite ``gm`` (already a copy) in place; ``params`` maps site path -> its tensors. The chains whose id is in
    ``carry_in`` (token-stream chains whose head is a graph input: ``backend._check_graph_breaks`` picks them) start
    from a placeholder of their n streams instead of expanding their head; those in ``carry_out`` also return their
    n streams where the graph returns their collapsed tail as it is (runtime/carry.py)."""
    from mhc_compile.passes.detect import _Analysis

    graph = gm.graph
    an = _Analysis(gm)
    regions = {id(s): _branch_region(s, an) for s in detection.sites}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    extra: list[torch.Tensor] = []
    param_nodes: dict[str, tuple[fx.Node, fx.Node, fx.Node]] = {}
    anchor = placeholders[-1] if placeholders else None
    for site in detection.sites:
        nodes = []
        for field_name in ("phi", "bias", "alpha"):
            name = f"mhc_{site.path.replace('.', '_')}_{field_name}"
            if anchor is None:
                with graph.inserting_before(next(iter(graph.nodes))):
                    ph = graph.placeholder(name)
            else:
                with graph.inserting_after(anchor):
                    ph = graph.placeholder(name)
            anchor = ph
            tensor = getattr(params[site.path], field_name)
            ph.meta["example_value"] = tensor
            ph.meta["mhc"] = {"site": site.path, "role": "param"}
            nodes.append(ph)
            extra.append(tensor)
        param_nodes[site.path] = tuple(nodes)

    heads: list[tuple[int, str]] = []
    starts: dict[int, fx.Node] = {}
    for chain in detection.chains:
        if id(chain) in carry_in:
            with graph.inserting_after(anchor):
                anchor = starts[id(chain)] = graph.placeholder(f"mhc_streams_in_{len(heads)}")
            anchor.meta["mhc"] = {"site": chain.sites[0].path, "role": "streams_in"}
            heads.append((placeholders.index(chain.head), chain.sites[0].path))

    rw = _ChainRewriter(graph, config, impl)
    tails = {}
    for chain in detection.chains:
        tails[id(chain)] = _rewrite_chain(rw, chain, regions, param_nodes, starts.get(id(chain)))
    rw.collapse_observers()
    carried = [c for c in detection.chains if id(c) in carry_out]
    stream_tails, returned = _return_streams(rw, [tails[id(c)] for c in carried])
    graph.lint()
    gm.recompile()
    return RewriteResult(gm=gm, extra_inputs=extra, stream_heads=heads, stream_tails=stream_tails,
                         stream_tail_sites=[c.sites[-1].path for c, kept in zip(carried, returned) if kept])


def _return_streams(rw: _ChainRewriter, tails: list[fx.Node]) -> tuple[list[tuple[int, int]], list[bool]]:
    """Append to the graph's outputs the n streams of each tail whose collapse the graph returns as it is:
    ((output index of the collapse, output index of the streams) for each, whether each tail's were)."""
    output = next(n for n in reversed(rw.graph.nodes) if n.op == "output")
    outs = output.args[0]
    if not isinstance(outs, (tuple, list)):
        return [], [False] * len(tails)
    outs, found, returned = list(outs), [], []
    for wide in tails:
        c = rw.collapsed.get(wide)
        returned.append(c is not None and c in outs)
        if returned[-1]:
            found.append((outs.index(c), len(outs)))
            outs.append(wide)
    if found:
        output.args = (type(output.args[0])(outs),)
    return found, returned


def stream_shape(shape: tuple, n: int) -> tuple:
    """The n-stream shape of a token reshape's new shape [..., C]: [..., n, C] (ints or SymInts; a graph call,
    evaluated as the graph runs or is traced)."""
    return (*shape[:-1], n, shape[-1])


def _rewrite_chain(rw: _ChainRewriter, chain: Chain, regions, param_nodes, start: fx.Node | None = None) -> fx.Node:
    """Rewrite one chain, from ``start`` (a placeholder of its n streams) or else the expanded head; returns the
    chain's last n-stream value."""
    if start is None:
        x = rw.expand(chain.head, chain.sites[0])
    else:
        x = start
        rw.wide.add(x)
        rw.channel_dim[x] = -1
    stream_now = chain.head
    for k, site in enumerate(chain.sites):
        link = chain.links[k]
        reshapes = {node for node in link if is_token_reshape(node)}  # told by the shapes, before the rewrite
        x_out = rw.site(site, x, param_nodes[site.path], regions[id(site)], stream_now)
        rw.wide.update(link)  # post-norm LayerNorm / dropout / relu now act on every stream
        for node in link:
            rw.channel_dim[node] = site.channel_dim
            if node in reshapes:  # [B, T, C] -> [B*T, C] regroups the tokens of [B, T, n, C] the same way
                with rw.graph.inserting_before(node):
                    shape = rw.call(stream_shape, (reshape_args(node), rw.n), node, site, "link")
                node.args = (node.args[0], shape)
            if node.kwargs.get("inplace"):  # relu(X', inplace=True): X' is ours, keep it out of place
                node.kwargs = {**node.kwargs, "inplace": False}
        x = link[-1] if link else x_out
        stream_now = x
    return x
