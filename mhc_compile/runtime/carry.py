"""Carry the n streams across a graph break.

Dynamo may split a residual stack over several graphs: a graph break inside the stack, a block compiled on its own
(``torch.compile(block)`` for each block, as torchtitan does), FSDP2's hooks at every sharded block. A chain then
starts at an input of one graph and ends at an output of the one before, and the tensor that crosses between them
is the collapsed stream ``[..., C]``. So that the model stays the one a single graph would compute, such a graph
also returns its chain's n streams ``X [..., n, C]``, which ``StreamCarry.outputs`` attaches to the collapsed output
tensor, and a graph whose chain starts at an input takes the n streams attached to that input as the chain's X_0
(``StreamCarry.inputs``; ``expand(x)`` when none are).

The streams are taken only for the very tensor the previous graph returned, or a view of it with the same storage,
shape and strides (FSDP2 hands a block its inputs through an autograd function that returns views of them), and
only while its version counter says it was not written since (inference tensors have none): anything else starts
the chain afresh from ``expand(x)``, as a graph break did before. In a frame Dynamo resumed right after a graph that
returned streams, whose inputs come from that graph, that is warned of (raised under ``strict``), naming the site.

Autograd: X_0 = join(x, X) returns X and hands x a zero gradient, so that hooks on x still fire (FSDP2 gathers a
block's parameters for its backward from a hook on the block's output).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mhc_compile.errors import MHCConversionError

# (storage address, offset, shape, strides, dtype, device) -> the collapsed output the streams are attached to
_BY_STORAGE: dict[tuple, weakref.ref] = {}


def _key(t: Tensor) -> tuple | None:
    """Where ``t``'s elements lie; None for a tensor without real storage (fake, meta or a subclass: those are
    found by identity only)."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter or t.is_meta:
        return None
    ptr = t.untyped_storage().data_ptr()
    return (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device) if ptr else None


def _version(t: Tensor) -> int | None:
    """The tensor's version counter; None for an inference tensor, which has none (torch.inference_mode)."""
    return None if t.is_inference() else t._version


def attach(collapsed: Tensor, wide: Tensor) -> None:
    """Remember ``wide`` [..., n, C] as the n streams whose collapse ``collapsed`` [..., C] is."""
    collapsed._mhc_streams = (wide, _version(collapsed))
    key = _key(collapsed)
    if key is None:
        return
    ref = weakref.ref(collapsed)
    _BY_STORAGE[key] = ref
    weakref.finalize(collapsed, _forget, key, ref)


def _forget(key: tuple, ref: weakref.ref) -> None:
    if _BY_STORAGE.get(key) is ref:  # the storage may have been reused by a later output since
        del _BY_STORAGE[key]


def streams_of(x: Tensor, n: int) -> Tensor | None:
    """The n streams attached to ``x`` (or to the output ``x`` is an unchanged view of), if they fit it."""
    carrier = x if hasattr(x, "_mhc_streams") else None
    if carrier is None:
        key = _key(x)
        ref = _BY_STORAGE.get(key) if key is not None else None
        carrier = ref() if ref is not None else None
    if carrier is None:
        return None
    wide, version = carrier._mhc_streams
    if _version(x) != version or _version(carrier) != version:
        return None
    if tuple(wide.shape) != (*x.shape[:-1], n, x.shape[-1]) or wide.dtype != x.dtype or wide.device != x.device:
        return None
    return wide


class _Join(torch.autograd.Function):
    """X_0 = the carried streams; x, which the chain no longer reads, gets a zero gradient (a stride-0 view)."""

    @staticmethod
    def forward(ctx, x: Tensor, wide: Tensor) -> Tensor:
        ctx.x_shape = x.shape
        return wide.view_as(wide)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.new_zeros(()).expand(ctx.x_shape), grad


def expand(x: Tensor, n: int) -> Tensor:
    """X_0 of a chain that starts afresh: every stream the input, written out (the compiled graph takes a
    contiguous X_0, whichever way it came)."""
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


@dataclass
class StreamCarry:
    """What one compiled graph takes and returns besides Dynamo's own inputs and outputs.

    heads: (index of the input the chain starts at, its first site's path) for each chain carried in; the graph
    takes their X_0 after the mHC parameters, in this order. tails: (index of the collapsed output, index of the
    chain's n streams among the graph's outputs) for each chain carried out; the n streams are the last outputs.
    resumed: the graph was resumed after a graph break inside its frame, so its heads' inputs come from the graph
    before it. strict: a head without streams there raises instead of warning."""

    n: int
    heads: list[tuple[int, str]] = field(default_factory=list)
    tails: list[tuple[int, int]] = field(default_factory=list)
    resumed: bool = False
    strict: bool = False
    _warned: set = field(default_factory=set)

    def inputs(self, args) -> list[Tensor]:
        out = []
        for index, site in self.heads:
            x = args[index]
            wide = streams_of(x, self.n)
            if wide is None:
                if self.resumed:
                    self._restarted(site)
                out.append(expand(x, self.n))
            else:
                out.append(_Join.apply(x, wide if wide.is_contiguous() else wide.contiguous()))
        return out

    def outputs(self, outs):
        """Attach each carried tail's n streams to its collapsed output; Dynamo's outputs, without them."""
        extra = len(self.tails)
        if not extra:
            return outs
        for collapsed, wide in self.tails:
            attach(outs[collapsed], outs[wide])
        return outs[:len(outs) - extra]

    def _restarted(self, site: str) -> None:
        msg = (f"mhc: the stream entering {site} after a graph break is not the one the graph before it returned "
               f"(it was changed or replaced between the graphs), so its n streams start afresh from it there, "
               f"collapsed (mean) and re-expanded; mixing across the break is lost")
        if self.strict:
            raise MHCConversionError(msg + " (strict=True)")
        if site not in self._warned:
            self._warned.add(site)
            warnings.warn(msg, stacklevel=4)


def example_inputs(heads: list[tuple[int, str]], n: int, examples: list, fakes: list) -> list:
    """Example X_0 for each carried head. Dynamo hands a backend real example inputs and keeps their fake tensors
    (with its symbolic sizes) on the placeholders: X_0 is made from the head's fake tensor (``fakes``, by input
    index) in Dynamo's fake mode, so that the compile sees n as n. Made from a real input, it would be fakeified
    afresh, and duck sizing would give n the batch's symbol where the two are equal (a recompile for dynamic
    shapes at batch n then asserted the batch's size on the streams' dim)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    out = []
    for index, _ in heads:
        x = fakes[index] if isinstance(fakes[index], FakeTensor) else examples[index]
        with x.fake_mode if isinstance(x, FakeTensor) else unset_fake_temporarily():
            out.append(expand(x.detach(), n).requires_grad_(examples[index].requires_grad))
    return out
