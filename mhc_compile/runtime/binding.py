"""Bind a compiled graph's mHC parameters to the module instance it runs for, at every call.

Dynamo caches a compiled graph on the code object it came from and, with ``inline_inbuilt_nn_modules``
(its default), lifts the module's own parameters to graph inputs, so one graph serves every instance
whose guards pass: a decoder layer's frame compiled after a graph break runs for layers 0 .. L-1, and a
block compiled on its own (``layer.compile(backend="mhc")``) runs for every layer. The mHC parameters
are inputs the backend appends, so they must follow the instance, or every layer would silently train
layer 0's mixing. Each call therefore reads one of the graph's own parameter inputs (the anchor), finds
where it lives in a converted model, and appends the parameters of the sites at the same relative paths
under that instance (creating them there on first use, like the first compile did).
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mhc_compile.runtime.params import find_tensor, get_or_create_site

log = logging.getLogger("mhc_compile")


@dataclass(frozen=True)
class SiteSpec:
    """What creating one site on another instance needs; ``rel_owner`` is relative to the frame's module."""

    rel_owner: str
    name: str
    n: int
    mode: str
    width: int
    index: int
    alpha_init: float


class BindingError(RuntimeError):
    """A compiled graph ran for a module whose mHC parameters cannot be found."""


class ParamBinder:
    """Returns, for the arguments of one call, the mHC parameters (phi, bias, alpha per site) to append."""

    def __init__(self, *, anchor_index: int, anchor_name: str, frame_type: type, specs: Sequence[SiteSpec],
                 first_anchor: torch.Tensor, first_extras: list[torch.Tensor], lazily: bool):
        self.anchor_index = anchor_index
        self.anchor_name = anchor_name  # the anchor's name relative to the frame's module
        self.frame_type = frame_type
        self.specs = tuple(specs)
        self.lazily = lazily
        self._last_anchor: torch.Tensor = first_anchor
        self._last_extras = first_extras
        self._by_id: dict[int, tuple[weakref.ref, list[torch.Tensor]]] = {
            id(first_anchor): (weakref.ref(first_anchor), first_extras)}

    def extras(self, args: Sequence) -> list[torch.Tensor]:
        anchor = args[self.anchor_index]
        if anchor is self._last_anchor:  # the common case: the same instance as last call
            return self._last_extras
        hit = self._by_id.get(id(anchor))
        if hit is None or hit[0]() is not anchor:
            hit = (weakref.ref(anchor), self._resolve(anchor))
            self._by_id[id(anchor)] = hit
        self._last_anchor, self._last_extras = anchor, hit[1]
        return hit[1]

    def _resolve(self, anchor: torch.Tensor) -> list[torch.Tensor]:
        found = find_tensor(anchor)
        what = f"a graph compiled for a {self.frame_type.__name__} (its input {self.anchor_name!r})"
        if found is None:
            raise BindingError(
                f"mhc: Dynamo ran {what} for a module of a model the mhc backend has not converted, so its "
                f"mHC parameters cannot be found. Call mhc_compile.prepare(model, *example_inputs) on every "
                f"model before running it, or torch._dynamo.reset() between models")
        root, name = found
        frame_path = _strip_suffix(name, self.anchor_name)
        frame = None if frame_path is None else root.get_submodule(frame_path) if frame_path else root
        if frame_path is None or type(frame) is not self.frame_type:
            raise BindingError(
                f"mhc: Dynamo ran {what} with {name!r} of {type(root).__name__} in that input's place; the "
                f"module it runs for cannot be told, so its mHC parameters cannot be chosen")
        extras: list[torch.Tensor] = []
        created = []
        for spec in self.specs:
            owner = ".".join(p for p in (frame_path, spec.rel_owner) if p)
            site, new = get_or_create_site(root, owner, spec.name, n=spec.n, mode=spec.mode, width=spec.width,
                                           index=spec.index, alpha_init=spec.alpha_init, device=anchor.device,
                                           lazily=self.lazily)
            if new:
                created.append(f"{owner}.{spec.name}" if owner else spec.name)
            extras += [site.phi, site.bias, site.alpha]
        log.debug("mhc: graph for %s bound to %s.%s", self.frame_type.__name__, type(root).__name__, frame_path)
        if created and self.lazily:
            warnings.warn(
                f"mhc: created mHC parameters for {len(created)} residual site(s) of {type(root).__name__} when "
                f"a compiled graph first ran for {frame_path or 'the model'} (e.g. {created[0]}). An optimizer "
                f"built before this call does not hold them: call mhc_compile.prepare(model, *example_inputs) "
                f"before building it.", stacklevel=3)
        return extras


def _strip_suffix(name: str, suffix: str) -> str | None:
    """"h.3.attn.weight" less "attn.weight" -> "h.3"; None when ``name`` does not end with ``suffix``."""
    if name == suffix:
        return ""
    if name.endswith("." + suffix):
        return name[: -len(suffix) - 1]
    return None


def choose_anchor(frame: nn.Module, root: nn.Module, example_inputs: Sequence) -> tuple[int, str] | None:
    """(index in the graph's inputs, name relative to ``frame``) of a parameter or buffer of ``frame``
    that the graph takes as an input and that appears once in ``root`` (a tied weight would not say
    which instance runs). None when there is none: the graph then keeps the parameters it was built with."""
    names = {}
    for name, t in _named_tensors(frame):
        names.setdefault(id(t), []).append(name)
    counts: dict[int, int] = {}
    for _, t in _named_tensors(root):
        counts[id(t)] = counts.get(id(t), 0) + 1
    for i, t in enumerate(example_inputs):
        if isinstance(t, torch.Tensor) and len(names.get(id(t), ())) == 1 and counts.get(id(t)) == 1:
            return i, names[id(t)][0]
    return None


def _named_tensors(module: nn.Module):
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
