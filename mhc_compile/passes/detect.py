"""Find residual chains in a Dynamo FX graph.

A residual *site* is an add ``out = s + y`` where ``y = f(s)`` for a sublayer ``f`` that contains a
weighted op (linear, matmul, convolution, attention) on some path from ``s`` to ``y``. That rule keeps
the activation add inside GPT-2's GELU (``x + 0.044715 * x**3``: no weighted op in between), bias adds
and position-embedding or mask adds (the other operand does not depend on ``s``) and rotary embeddings
(``q*cos + rot(q)*sin``: neither operand is the other's input) out.

Two structures extend a site:
* parallel branches: ``(s + f(s)) + g(s)`` (nanoGPT-style parallel block) folds ``g`` in as a second
  branch; ``(f(s) + g(s)) + s`` (GPT-NeoX) is already one branch whose value is the sum.
* stream-wise ops between sites: ``s' = LayerNorm(s + f(s))`` (post-norm, BERT) and dropout act on each
  token vector alone, so they are applied to every one of the n streams and the chain goes on. Elementwise
  activations (``relu(s + f(s))``, ResNet) act on each element alone: they are applied per stream too.

Convolutional residual blocks (ResNet): the stream is a channel-first activation ``[B, C, H, W]`` (or
``[B, C, L]``, ``[B, C, D, H, W]``). A site whose branch starts with a convolution of the stream gets
``channel_dim = 1`` and ``width = C``; the rewrite moves C last for the mHC ops. Only elementwise ops link
channel-first sites (a LayerNorm over the last dim of ``[B, C, H, W]`` would normalise W, not C). In-place
``out += identity`` (torchvision) is a site when the mutated operand is the branch output and nothing else
reads it (replacing the in-place add by the mHC update is then exact).

Not converted, and listed by name in ``Detection.unconverted`` (the backend warns; ``strict=True`` raises):
* ``x += f(x)`` (the stream itself is mutated: other readers would see the new value);
* projection shortcuts ``f(s) + P(s)`` where the shortcut ``P`` is itself a weighted map of ``s`` (ResNet's
  downsampling 1x1 conv + BN): there is no identity path to widen. The chain before it ends at ``s`` (its
  readers get the collapsed stream) and a new chain starts at the next site after the block.

Sites are linked into *chains*: site j follows site i when site i's output reaches site j's stream
through stream-wise ops only. The rewrite widens each chain as a whole.

The analysis works on a networkx DiGraph built from the FX graph (ancestor / descendant queries);
patterns are plain functions.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx

# --- op classification ------------------------------------------------------------------------

_ADD_FUNCTIONS = {operator.add, torch.add, torch.Tensor.add}
_INPLACE_ADD_FUNCTIONS = {operator.iadd, torch.Tensor.add_}

# Ops that carry weights or mix tokens: the mark of a real sublayer on a residual branch.
_WEIGHTED_NAMES = {
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "conv1d", "conv2d", "conv3d",
    "conv_transpose1d", "conv_transpose2d", "scaled_dot_product_attention", "__matmul__", "bilinear",
    "embedding_bag",
}
# Ops that act on each token vector (last dim) alone: safe to apply to all n streams at once.
_STREAMWISE_NAMES = {"layer_norm", "rms_norm", "dropout", "clone", "contiguous", "alpha_dropout"}
# Ops that act on each element alone: safe on any layout, channel-first streams included.
_ELEMENTWISE_NAMES = {"relu", "gelu", "silu", "dropout", "clone", "contiguous", "alpha_dropout"}
_CONV_NAMES = {"conv1d", "conv2d", "conv3d"}


def target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def _is_call(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def is_weighted(node: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    if node.op == "call_module" and gm is not None:
        mod = gm.get_submodule(node.target)
        return any(True for _ in mod.parameters())
    return _is_call(node) and target_name(node) in _WEIGHTED_NAMES


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target == "add":
        pass
    else:
        return False
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    return all(isinstance(a, fx.Node) for a in node.args)


def is_inplace_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _INPLACE_ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ("add_", "__iadd__")


def is_elementwise(node: fx.Node) -> bool:
    """True for unary ops that act on each element alone (any layout)."""
    if not _is_call(node) or target_name(node) not in _ELEMENTWISE_NAMES:
        return False
    return node.op != "call_module"


def is_streamwise(node: fx.Node, channel_first: bool = False) -> bool:
    """True for ops that map a stream [..., C] to [..., C] acting on each token vector alone.

    For a channel-first stream ([B, C, H, W]) only elementwise ops qualify."""
    if channel_first:
        return is_elementwise(node)
    name = target_name(node)
    if _is_call(node) and name in _ELEMENTWISE_NAMES - _STREAMWISE_NAMES:
        return is_elementwise(node)
    if not _is_call(node) or name not in _STREAMWISE_NAMES:
        return False
    if name in ("layer_norm", "rms_norm"):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(shape, (tuple, list)) and len(shape) == 1
    return True


_RESHAPE_TARGETS = {"view", "reshape", torch.reshape}


def is_token_reshape(node: fx.Node) -> bool:
    """True for a view / reshape of a token stream [..., C] that regroups its token dims only ([B, T, C] ->
    [B*T, C] and back: OPT's decoder layer around its MLP), so that it applies to an n-stream [..., n, C] with n
    and C kept last (``rewrite.stream_shape``). The new shape's last entry must be C itself, not -1."""
    if node.op not in ("call_method", "call_function") or node.target not in _RESHAPE_TARGETS or node.kwargs:
        return False
    before, after = tensor_shape(node.args[0]) if node.args else None, tensor_shape(node)
    shape = reshape_args(node)
    if before is None or after is None or len(before) < 2 or len(after) < 2 or shape is None:
        return False
    entries = example_value(shape) if isinstance(shape, fx.Node) else shape
    if not isinstance(entries, (tuple, list, torch.Size)) or len(entries) != len(after):
        return False
    return after[-1] == before[-1] and not (isinstance(entries[-1], int) and entries[-1] < 0)


def reshape_args(node: fx.Node) -> tuple | fx.Node | None:
    """The new shape a view / reshape node asks for, as given: a tuple of ints and graph nodes (``x.view(a, b)``,
    ``x.view((a, b))``, ``torch.reshape(x, (a, b))``), or the one graph node that makes it (``x.view(y.shape)``,
    a torch.Size, which dynamic shapes keep as a node); None for anything else."""
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], fx.Node) and not is_float_tensor(rest[0]):
        return rest[0]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = tuple(rest[0])
    return tuple(rest) if rest and not any(isinstance(a, (tuple, list)) for a in rest) else None


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def tensor_shape(node: fx.Node):
    v = example_value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def is_float_tensor(node: fx.Node) -> bool:
    v = example_value(node)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


# --- results ------------------------------------------------------------------------------------


@dataclass
class Site:
    """One residual site: out = stream + sum(branches)."""

    stream: fx.Node
    branches: list[fx.Node]
    adds: list[fx.Node]  # the add nodes that form the site; adds[-1] is the site output
    width: int
    owner: str = ""  # module path of the module that owns the add ("" = root)
    kind: str = "pre-norm"
    channel_dim: int = -1  # -1: token stream [..., C]; 1: channel-first conv stream [B, C, *spatial]
    name: str = ""  # parameter container name on the owner, e.g. "mhc_attn"
    index: int = 0  # position in its chain
    repeat: int = 0  # >0: the owner already has a site of this name in the graph (a module called again)

    @property
    def out(self) -> fx.Node:
        return self.adds[-1]

    @property
    def path(self) -> str:
        return f"{self.owner}.{self.name}" if self.owner else self.name


@dataclass
class Chain:
    sites: list[Site]
    links: list[list[fx.Node]] = field(default_factory=list)  # stream-wise nodes after site k

    @property
    def head(self) -> fx.Node:
        return self.sites[0].stream


@dataclass
class Unconverted:
    node: str
    module: str
    reason: str


@dataclass
class Detection:
    chains: list[Chain]
    unconverted: list[Unconverted]

    @property
    def sites(self) -> list[Site]:
        return [s for c in self.chains for s in c.sites]


# --- analysis -----------------------------------------------------------------------------------


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.g = to_networkx(gm.graph)
        self._desc: dict[fx.Node, set] = {}
        self._anc: dict[fx.Node, set] = {}
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}

    def descendants(self, n: fx.Node) -> set:
        if n not in self._desc:
            self._desc[n] = nx.descendants(self.g, n)
        return self._desc[n]

    def ancestors(self, n: fx.Node) -> set:
        if n not in self._anc:
            self._anc[n] = nx.ancestors(self.g, n)
        return self._anc[n]

    def between(self, src: fx.Node, dst: fx.Node) -> set:
        """Nodes on some path src -> dst, dst included, src excluded."""
        if dst is src or src not in self.ancestors(dst):
            return set()
        return (self.descendants(src) & self.ancestors(dst)) | {dst}

    def is_branch_of(self, stream: fx.Node, y: fx.Node) -> bool:
        """y = f(stream) through at least one weighted op."""
        return any(is_weighted(n, self.gm) for n in self.between(stream, y))


def _same_shape(*nodes: fx.Node) -> bool:
    shapes = [tensor_shape(n) for n in nodes]
    return shapes[0] is not None and len(shapes[0]) >= 1 and all(s == shapes[0] for s in shapes)


def module_stack(node: fx.Node) -> list[str]:
    """Module paths from outermost to innermost, relative to the compiled root (e.g. "h.0.attn")."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else str(value)
        paths.append(normalize_module_path(path))
    return paths


_FRAME_ROOT = re.compile(r"^[LG]\[[^\]]*\](\[[^\]]*\])*")
# A submodule Dynamo reached through a module's __getattr__ (PEFT's PeftModel forwards to its base model that way)
# is written "self.__dict__['_modules']['base_model']" (or "._modules['base_model']"): the path's "base_model".
_MODULES_ITEM = re.compile(r"(?:\.__dict__\[['\"]_modules['\"]\]|\._modules)\[['\"]([^'\"]+)['\"]\]")


def normalize_module_path(path: str) -> str:
    """"L['self'].h.0.attn" -> "h.0.attn";  "L['self']" -> "";
    "L['self'].__dict__['_modules']['base_model'].model" -> "base_model.model".

    Items right after the local are the container the model sits in, not part of its path: a decorated forward
    is compiled as the wrapper's frame, "L['args'][0].model.layers.0" -> "model.layers.0" (transformers 5.24).
    """
    path = _MODULES_ITEM.sub(r".\1", _FRAME_ROOT.sub("", path)).lstrip(".")
    # Dynamo writes indexing as "h[0]" in some versions and "h.0" in others.
    return path.replace("[", ".").replace("]", "").replace("'", "")


def innermost_module(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1] if stack else ""


def _channel_first(an: _Analysis, stream: fx.Node, y: fx.Node) -> bool:
    """The branch reads the stream with a convolution whose input layout is the stream's:
    [B, C, *spatial] with C at dim 1 (conv1d/2d/3d on a 3/4/5-D stream)."""
    shape = tensor_shape(stream)
    if shape is None or len(shape) < 3:
        return False
    region = an.between(stream, y)
    first = [n for n in region if is_weighted(n, an.gm)
             and not any(is_weighted(m, an.gm) for m in an.between(stream, n) - {n})]
    return bool(first) and all(
        target_name(n) in _CONV_NAMES and len(shape) == int(target_name(n)[4]) + 2 for n in first)


def _convertible_iadd(an: _Analysis, node: fx.Node) -> bool:
    """``y += s`` where ``y = f(s)`` is read by nothing but this add: exact to replace out of place."""
    if not is_inplace_add(node) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    y, s = node.args
    if not (isinstance(y, fx.Node) and isinstance(s, fx.Node)):
        return False
    return set(y.users) == {node} and an.is_branch_of(s, y)


def _find_site(an: _Analysis, add: fx.Node) -> Site | None:
    a, b = add.args
    if not _same_shape(a, b, add) or not is_float_tensor(add):
        return None
    pairs = ((b, a),) if is_inplace_add(add) else ((a, b), (b, a))
    for stream, y in pairs:
        if an.is_branch_of(stream, y):
            cdim = 1 if _channel_first(an, stream, y) else -1
            return Site(stream=stream, branches=[y], adds=[add], width=tensor_shape(add)[cdim], channel_dim=cdim)
    return None


def _projection_shortcut(an: _Analysis, add: fx.Node, regions: list[set]) -> fx.Node | None:
    """``f(s) + P(s)``: both operands are weighted maps of one tensor ``s`` (neither is the other's input)
    and the add is not part of a site's branch. Returns ``s`` (the nearest such tensor) or None."""
    a, b = add.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or not _same_shape(a, b, add):
        return None
    if not is_float_tensor(add) or any(add in r for r in regions):
        return None
    if a in an.ancestors(b) or b in an.ancestors(a):
        return None
    common = [s for s in an.ancestors(a) & an.ancestors(b) if is_float_tensor(s) and _is_value(s)]
    for s in sorted(common, key=an.order.__getitem__, reverse=True)[:3]:  # the nearest ones
        if an.is_branch_of(s, a) and an.is_branch_of(s, b):
            return s
    return None


def _is_value(node: fx.Node) -> bool:
    """An activation, not a parameter or buffer placeholder / attribute."""
    if node.op == "get_attr":
        return False
    if node.op == "placeholder":
        v = example_value(node)
        return not isinstance(v, torch.nn.Parameter) and "_parameters_" not in node.name and "_buffers_" not in node.name
    return True


def _extend_parallel(an: _Analysis, site: Site) -> None:
    """Fold ``(s + f(s)) + g(s)`` into one site with branches [f(s), g(s)]."""
    while True:
        users = [u for u in site.out.users if is_add(u)]
        if len(site.out.users) != 1 or len(users) != 1:
            return
        nxt = users[0]
        other = nxt.args[1] if nxt.args[0] is site.out else nxt.args[0]
        if other is site.out or not _same_shape(other, nxt, site.out):
            return
        if site.out in an.ancestors(other) or not an.is_branch_of(site.stream, other):
            return
        site.branches.append(other)
        site.adds.append(nxt)


def _follow_link(site: Site, stream_of: dict[fx.Node, Site]) -> tuple[Site | None, list[fx.Node]]:
    """From a site output, follow stream-wise ops to the next site's stream, if any (a site of the
    same layout: token and channel-first streams do not mix in one chain)."""
    node, path = site.out, []
    channel_first = site.channel_dim != -1
    while True:
        if node in stream_of:
            follower = stream_of[node]
            return (follower, path) if follower.channel_dim == site.channel_dim else (None, path)
        nxt = [u for u in node.users if (is_streamwise(u, channel_first) or not channel_first and is_token_reshape(u))
               and u.args and u.args[0] is node]
        if len(nxt) != 1:
            return None, path
        node = nxt[0]
        path.append(node)


_NORMS = ("layer_norm", "rms_norm")


def _classify(an: _Analysis, site: Site, link_after: list[fx.Node]) -> str:
    """pre-norm (the branch reads a norm of the stream), post-norm (the norm follows the add),
    parallel (several branches read the same stream) or plain (no norm around the site)."""
    if len(site.branches) > 1 or any(is_add(b) and _both_branches(an, site.stream, b) for b in site.branches):
        return "parallel"
    region = set().union(*(an.between(site.stream, y) for y in site.branches))
    if _norm_near(site.stream, region):
        return "pre-norm"
    if any(target_name(n) in _NORMS for n in link_after) or target_name(site.stream) in _NORMS:
        return "post-norm"
    if any(target_name(u) in _NORMS for u in site.out.users):
        return "post-norm"
    return "plain"


def _norm_near(stream: fx.Node, region: set, hops: int = 6) -> bool:
    """A norm of the stream at the start of the branch: a norm op, or the rsqrt of a decomposed
    RMSNorm / LayerNorm (Llama writes its RMSNorm out in primitive ops)."""
    frontier = [u for u in stream.users if u in region]
    for _ in range(hops):
        if any(target_name(n) in _NORMS + ("rsqrt",) for n in frontier):
            return True
        frontier = [u for n in frontier for u in n.users if u in region and not is_weighted(u)]
    return False


def _both_branches(an: _Analysis, stream: fx.Node, node: fx.Node) -> bool:
    return all(isinstance(x, fx.Node) and an.is_branch_of(stream, x) for x in node.args[:2])


def _child_of(owner: str, path: str) -> str | None:
    """The owner's child module that ``path`` lies in ("h.0", "h.0.attn.c_proj" -> "attn").

    A numbered container child keeps its index ("", "layers.3.fc" -> "layers_3")."""
    prefix = owner + "." if owner else ""
    if not path.startswith(prefix) or path == owner:
        return None
    parts = path[len(prefix) :].split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return parts[0] + "_" + parts[1]
    return parts[0]


def _name_site(site: Site, an: _Analysis) -> str:
    """Name the site after the owner's child modules that compute its branches ("mhc_attn")."""
    names: list[str] = []
    for y in site.branches:
        children: list[str] = []
        for n in sorted(an.between(site.stream, y), key=an.order.__getitem__):
            if is_weighted(n, an.gm):
                child = next((c for c in map(lambda p: _child_of(site.owner, p), module_stack(n)) if c), None)
                if child:
                    children.append(child)
        if children and len(site.branches) == 1 and is_add(y) and _both_branches(an, site.stream, y):
            names.extend(dict.fromkeys(children))  # one branch that sums two sublayers (GPT-NeoX)
        elif children:
            counts = {c: children.count(c) for c in dict.fromkeys(children)}
            top = [c for c, k in counts.items() if k == max(counts.values())]
            # one sublayer dominates ("attn"; ties: first in graph order, "up" for up/down linears); a
            # convolutional block whose branch is several equal children (ResNet's conv1, conv2) is named
            # after all of them: the branch is the whole block, not its first conv
            names.append("_".join(top) if site.channel_dim != -1 else top[0])
    return "mhc_" + ("_".join(dict.fromkeys(names)) or "site")


def detect(gm: fx.GraphModule) -> Detection:
    """Find every residual chain of ``gm``; never rewrite anything."""
    an = _Analysis(gm)
    unconverted: list[Unconverted] = []
    sites, claimed = _find_sites(an, gm, unconverted)
    sites = _drop_forked(sites, unconverted)
    _name_projection_shortcuts(an, gm, sites, claimed, unconverted)
    chains = _link_chains(sites, {n: i for i, n in enumerate(gm.graph.nodes)})
    _name_sites(an, chains)
    return Detection(chains=chains, unconverted=unconverted)


def _find_sites(an: _Analysis, gm: fx.GraphModule,
                unconverted: list[Unconverted]) -> tuple[list[Site], set[fx.Node]]:
    """Every residual add of the graph as a site (parallel branches folded in), and the adds the sites claim.
    In-place residual adds that cannot be converted are named in ``unconverted``."""
    sites: list[Site] = []
    claimed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in claimed:
            continue
        if _convertible_iadd(an, node):
            site = _find_site(an, node)
            if site is not None:
                claimed.add(node)
                sites.append(site)
                continue
        if is_inplace_add(node):
            a = node.args[0] if node.args else None
            b = node.args[1] if len(node.args) > 1 else None
            if isinstance(a, fx.Node) and isinstance(b, fx.Node) and an.is_branch_of(a, b):
                unconverted.append(Unconverted(node.name, innermost_module(node), "in-place residual add (x += f(x)) is not converted"))
            elif isinstance(a, fx.Node) and isinstance(b, fx.Node) and an.is_branch_of(b, a):
                unconverted.append(Unconverted(node.name, innermost_module(node), "in-place residual add (y += x, "
                                               "y = f(x)) whose branch output y is also read elsewhere is not converted"))
            continue
        if not is_add(node):
            continue
        site = _find_site(an, node)
        if site is None:
            continue
        _extend_parallel(an, site)
        claimed.update(site.adds)
        sites.append(site)
    return sites, claimed


def _drop_forked(sites: list[Site], unconverted: list[Unconverted]) -> list[Site]:
    """The sites without those whose stream feeds another site too: that would fork the chain. Both are left out,
    named."""
    by_stream: dict[fx.Node, list[Site]] = {}
    for s in sites:
        by_stream.setdefault(s.stream, []).append(s)
    forked = [s for group in by_stream.values() if len(group) > 1 for s in group]
    for s in forked:
        unconverted.append(Unconverted(s.out.name, innermost_module(s.out), "its stream feeds more than one residual add"))
    return [s for s in sites if s not in forked]


def _name_projection_shortcuts(an: _Analysis, gm: fx.GraphModule, sites: list[Site], claimed: set[fx.Node],
                               unconverted: list[Unconverted]) -> None:
    """Projection shortcuts (ResNet downsampling blocks) have no identity path: each is named, and is a chain
    boundary (no site links across it)."""
    regions = [set().union(*(an.between(s.stream, y) for y in s.branches)) for s in sites]
    for node in gm.graph.nodes:
        if node in claimed or not (is_add(node) or is_inplace_add(node)) or len(node.args) < 2:
            continue
        src = _projection_shortcut(an, node, regions)
        if src is not None:
            unconverted.append(Unconverted(
                node.name, innermost_module(node),
                f"projection shortcut: both operands are weighted maps of {src.name!r} (e.g. a downsampling "
                "1x1 conv + BN), not an identity residual; the residual chain ends before this block and a "
                "new chain starts after it"))


def _link_chains(sites: list[Site], order: dict[fx.Node, int]) -> list[Chain]:
    """The sites as chains, in graph order: site j follows site i when site i's output reaches site j's stream
    through stream-wise ops only (``_follow_link``)."""
    stream_of = {s.stream: s for s in sites}
    nxt: dict[int, tuple[Site, list[fx.Node]]] = {}
    has_prev: set[int] = set()
    for s in sites:
        follower, path = _follow_link(s, stream_of)
        if follower is not None and follower is not s:
            nxt[id(s)] = (follower, path)
            has_prev.add(id(follower))
    chains: list[Chain] = []
    for s in sorted(sites, key=lambda s: order[s.out]):
        if id(s) in has_prev:
            continue
        chain = Chain(sites=[s])
        while id(chain.sites[-1]) in nxt:
            follower, path = nxt[id(chain.sites[-1])]
            chain.links.append(path)
            chain.sites.append(follower)
        chain.links.append([])
        chains.append(chain)
    return chains


def _name_sites(an: _Analysis, chains: list[Chain]) -> None:
    """Each site's index in its chain, owner module, kind, and a name unique within its owner (a numbered repeat
    where one module holds several adds of one kind)."""
    used: dict[str, set[str]] = {}
    for chain in chains:
        for k, site in enumerate(chain.sites):
            site.index = k
            site.owner = innermost_module(site.out)
            site.kind = _classify(an, site, chain.links[k])
            name = _name_site(site, an)
            taken = used.setdefault(site.owner, set())
            base, i = name, 1
            while name in taken:
                name, i = f"{base}{i}", i + 1
                site.repeat = i - 1
            taken.add(name)
            site.name = name
