"""Data-parallel training of a converted model: what must hold for every rank to train the same model, and the
same one as without the wrapper, checked where it would otherwise go wrong without a word.

DistributedDataParallel (tested on CPU with gloo, tests/test_distributed.py)::

    mhc_compile.prepare(model, batch, n=4)           # 1. the mHC parameters exist before DDP lists its parameters
    model = DDP(model)
    torch._dynamo.config.optimize_ddp = False        # 2. Dynamo hands the backend whole graphs
    step = torch.compile(model, backend="mhc", options={"n": 4})

1. DDP averages the gradients of the parameters its module had when it was built. mHC parameters created later
   (at the first compile, or by ``prepare`` of a wrapped model) would get each rank's own gradient and drift
   apart: ``check_synced`` raises instead.
2. With ``optimize_ddp`` on (Dynamo's default), DDPOptimizer splits each graph at DDP's gradient-bucket
   boundaries and compiles the pieces apart. A bucket may end anywhere, even between a residual add's stream and
   its sublayer, so the backend cannot find the sites whole in the pieces: some stay plain adds (in the test
   model, all of them), another model than the one trained without DDP. ``check_graph_whole`` raises instead.
   A model whose parameters fit DDP's first bucket (1 MB) is not split and compiles either way. With it off,
   the backend splits the graph itself after the rewrite, at the same bucket boundaries (``passes/schedule.py``),
   so that DDP still reduces a bucket while the backward of the layers before it runs.

FSDP2 (``fully_shard``): the mHC parameters must likewise exist before ``fully_shard`` (``check_can_create``
raises otherwise). Dynamo compiles each ``fully_shard``-ed module as a graph of its own (FSDP2's hooks break the
graph); the n streams cross between the blocks' graphs (``runtime/carry.py``), so sharding every block trains the
same model as one graph.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from mhc_compile import _compat
from mhc_compile.errors import MHCConversionError

PREPARE_FIRST = "mhc_compile.prepare(model, example_batch, n=...) before wrapping the model"


def is_ddp(model: nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def fsdp_modules(root: nn.Module) -> list[str]:
    """Paths of the modules of ``root`` that FSDP manages (FSDP2's ``fully_shard`` or FSDP1's wrapper)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return [path or "<root>" for path, m in root.named_modules()
            if isinstance(m, (FSDPModule, FullyShardedDataParallel))]


def check_graph_whole() -> None:
    """Raise when Dynamo's DDPOptimizer hands the backend one piece of a split graph (module docstring, 2)."""
    if _compat.active_ddp_module() is None or not _compat.split_by_ddp_optimizer():
        return
    raise MHCConversionError(
        "mhc: torch.compile of a DistributedDataParallel model with torch._dynamo.config.optimize_ddp on (Dynamo's "
        "default) splits each graph at DDP's gradient-bucket boundaries, anywhere, even between a residual add's "
        "stream and its sublayer, so the mHC rewrite cannot find the sites whole: some would stay plain adds, "
        "another model than the one without DDP. Set torch._dynamo.config.optimize_ddp = False before the first "
        "call (or make that call inside torch._dynamo.config.patch(optimize_ddp=False)); the backend then splits "
        "the rewritten graph at the same buckets itself, so the all-reduces still overlap the backward.")


def check_synced(sites: dict[str, Iterable[torch.Tensor]], ddp: nn.Module | None = None) -> None:
    """Raise when a DDP (``ddp``, else the one whose forward is running) does not average the gradients of every
    site's parameters (``sites``: path -> its tensors): it was built before they existed (module docstring, 1)."""
    ddp = ddp if ddp is not None else _compat.active_ddp_module()
    if ddp is None:
        return
    synced = {id(p) for p in _compat.ddp_synced_parameters(ddp)}
    missing = [path for path, tensors in sites.items() if any(id(t) not in synced for t in tensors)]
    if missing:
        raise MHCConversionError(
            f"mhc: DistributedDataParallel does not synchronise the mHC parameters of {len(missing)} residual "
            f"site(s) ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): it was built before they "
            f"existed, so every rank would train its own copy of them. Call {PREPARE_FIRST} in DDP.")


def check_can_create(root: nn.Module, path: str, fix: str = PREPARE_FIRST) -> None:
    """Raise before creating site ``path`` on a model that a data-parallel wrapper already manages: a DDP whose
    forward is running, or FSDP on any of its modules (module docstring). ``fix``: what to call before wrapping."""
    if _compat.active_ddp_module() is not None or is_ddp(root):
        raise MHCConversionError(
            f"mhc: the mHC parameters of {path!r} do not exist yet and the model is already wrapped in "
            f"DistributedDataParallel, which would not synchronise them (every rank would train its own copy). "
            f"Call {fix} in DDP.")
    sharded = fsdp_modules(root)
    if sharded:
        raise MHCConversionError(
            f"mhc: the mHC parameters of {path!r} do not exist yet and FSDP already manages {sharded[0]!r}"
            f"{' and others' if len(sharded) > 1 else ''}; it would neither shard nor reduce them. Call "
            f"{fix} with fully_shard / FSDP.")


def copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """``param.copy_(full)`` where ``param`` may be an FSDP2-sharded DTensor: each rank copies its own shard of
    ``full`` (the same on every rank, e.g. an initialisation), without communicating."""
    if torch.distributed.is_available() and _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    param.copy_(full)


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a DDP wraps (``prepare`` and ``trace`` run it directly: DDP's forward adds only its gradient
    synchronisation), else ``model``."""
    return model.module if is_ddp(model) else model
