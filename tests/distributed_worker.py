"""The ranks of tests/test_distributed.py: two gloo processes on the CPU that train a converted NanoGPT under
DistributedDataParallel and FSDP2 and write what each case gave to ``OUT/rank{r}.json``.

Every rank computes the loss of its own half of one batch; the wrapper averages the two halves' gradients, which
must then equal the gradients of the hand-written eager mHC model (tests/models.py) on the whole batch.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

import mhc_compile  # noqa: E402
from models import NanoGPT, eager_mhc_nanogpt, perturb_mhc  # noqa: E402

N = 4
OPTIONS = {"n": N, "inner_backend": "aot_eager"}
SMALL = dict(vocab=64, d=32, heads=2, layers=2, block=16)  # 0.1 MB of parameters: one DDP bucket
LARGE = dict(SMALL, d=128)  # 1.6 MB: more than DDP's first bucket (1 MB), so DDPOptimizer splits the graph


def _batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def _loss(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def _model(size: dict, prepare: bool) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(the model, a copy of it for the oracle, made before any wrapper touches it). Same weights on every rank."""
    torch.manual_seed(0)
    model = NanoGPT(**size).double()
    if not prepare:
        return model, None
    mhc_compile.prepare(model, _batch()[:2], n=N)
    perturb_mhc(model)  # away from the symmetric initialisation, so that every mHC gradient is non-trivial
    return model, copy.deepcopy(model)


def _oracle_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    idx = _batch()
    loss = sum(_loss(eager_mhc_nanogpt(model, half, n=N), half) for half in idx.split(2)) / 2
    loss.backward()
    return {k: p.grad for k, p in model.named_parameters()}


def _step(step, rank: int) -> None:
    half = _batch()[2 * rank:2 * rank + 2]
    _loss(step(half), half).backward()


def _compare(model: torch.nn.Module, oracle: torch.nn.Module) -> dict:
    """Worst relative gradient error against the oracle, and the parameters that got no gradient."""
    want = _oracle_grads(oracle)
    worst, missing = 0.0, []
    for name, p in model.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        got = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, ((got - want[name]).abs().max() / want[name].abs().max()).item())
    return {"worst": worst, "missing": missing, "mhc_params": sum("mhc_" in k for k in want)}


def _expect_error(fn) -> dict:
    try:
        fn()
    except Exception as e:  # Dynamo wraps the backend's error: keep the innermost message
        inner = getattr(e, "inner_exception", e)
        return {"error": f"{type(inner).__name__}: {inner}"}
    return {"error": None}


def ddp_one_bucket(rank: int) -> dict:
    """Dynamo's default optimize_ddp: a model within DDP's first bucket is handed to the backend whole."""
    model, oracle = _model(SMALL, prepare=True)
    step = torch.compile(torch.nn.parallel.DistributedDataParallel(model), backend="mhc", options=OPTIONS)
    _step(step, rank)
    return _compare(model, oracle)


def ddp_split(rank: int) -> dict:
    model, _ = _model(LARGE, prepare=True)
    step = torch.compile(torch.nn.parallel.DistributedDataParallel(model), backend="mhc", options=OPTIONS)
    return _expect_error(lambda: _step(step, rank))


def _backward_order(step, ddp, rank: int) -> list[str]:
    """Two steps (DDP puts every gradient in one bucket for the first, then builds its buckets in the order the
    gradients came); the order in which the second one's backward ran its compiled graphs' backwards ("graph")
    and DDP reduced its gradient buckets ("reduce"). A reduce before the last graph overlaps the backward."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    events = []

    def recording_hook(state, bucket):
        events.append("reduce")
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(dist.group.WORLD, recording_hook)
    half = _batch()[2 * rank:2 * rank + 2]
    for _ in range(2):
        events.clear()
        loss = _loss(step(half), half)
        seen, todo = set(), [loss.grad_fn]
        while todo:  # every node of the autograd graph: the compiled graphs' backwards are CompiledFunctionBackward
            node = todo.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ == "CompiledFunctionBackward":
                node.register_prehook(lambda grads: events.append("graph"))
            todo.extend(next_fn for next_fn, _ in node.next_functions)
        ddp.zero_grad(set_to_none=True)
        loss.backward()
    return events


def _ddp_large(rank: int, **options) -> dict:
    """The model past DDP's first bucket with optimize_ddp off, as README says: the oracle's gradients, the pieces
    the backend compiled and the backward's order."""
    model, oracle = _model(LARGE, prepare=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    step = torch.compile(ddp, backend="mhc", options={**OPTIONS, **options})
    start = len(mhc_compile.REPORTS)
    with torch._dynamo.config.patch(optimize_ddp=False):
        order = _backward_order(step, ddp, rank)
    pieces = [r.ddp_pieces for r in mhc_compile.REPORTS[start:]]
    return {**_compare(model, oracle), "pieces": pieces, "order": order}


def ddp_split_off(rank: int) -> dict:
    return _ddp_large(rank, inner_backend="inductor")  # the pieces through Inductor and the backend's passes there


def ddp_one_graph(rank: int) -> dict:
    return _ddp_large(rank, ddp_buckets=False)


def ddp_lazy(rank: int) -> dict:
    model, _ = _model(SMALL, prepare=False)
    step = torch.compile(torch.nn.parallel.DistributedDataParallel(model), backend="mhc", options=OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _expect_error(lambda: _step(step, rank))


def ddp_prepare_wrapped(rank: int) -> dict:
    model, _ = _model(SMALL, prepare=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    return _expect_error(lambda: mhc_compile.prepare(ddp, _batch()[:2], n=N))


def fsdp_root(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model, oracle = _model(SMALL, prepare=True)
    fully_shard(model)
    _step(torch.compile(model, backend="mhc", options=OPTIONS), rank)
    return _compare(model, oracle)


def fsdp_lazy(rank: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    model, _ = _model(SMALL, prepare=False)
    fully_shard(model)
    return _expect_error(lambda: _step(torch.compile(model, backend="mhc", options=OPTIONS), rank))


def fsdp_blocks(rank: int) -> dict:
    """Every block sharded: Dynamo compiles each block apart (FSDP2's hooks break the graph), and the n streams
    cross between them (runtime/carry.py) through the views of its inputs FSDP2 hands each block."""
    from torch.distributed.fsdp import fully_shard

    model, oracle = _model(SMALL, prepare=True)
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(torch.compile(model, backend="mhc", options=OPTIONS), rank)
    return {**_compare(model, oracle), "warnings": [str(w.message) for w in caught if "mhc" in str(w.message)]}


def fsdp_load_after_shard(rank: int) -> dict:
    """A converted checkpoint loaded into an unprepared model after fully_shard: its sites would be created outside
    FSDP's groups."""
    from torch.distributed.fsdp import fully_shard

    converted, _ = _model(SMALL, prepare=True)
    model, _ = _model(SMALL, prepare=False)
    fully_shard(model)
    return _expect_error(lambda: mhc_compile.load_state_dict(model, converted.state_dict()))


def fsdp_meta(rank: int) -> dict:
    """torchtitan's order: built and prepared on the meta device, sharded, to_empty, then initialised: the model's
    own weights copied shard by shard from the oracle's (its init_weights), the sites by init_sites. Compiling
    before init_sites is an error; after it, the gradients are the oracle's."""
    from torch.distributed.fsdp import fully_shard

    from mhc_compile.distributed import copy_full_into

    torch.manual_seed(0)
    oracle = NanoGPT(**SMALL).double()
    mhc_compile.prepare(oracle, _batch()[:2], n=N)  # the sites at their initialisation
    with torch.device("meta"):
        model = NanoGPT(**SMALL).double()
    mhc_compile.prepare(model, _batch()[:2].to("meta"), n=N)
    fully_shard(model)
    model.to_empty(device="cpu")
    full = dict(oracle.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mhc_" not in name:
                copy_full_into(p, full[name])
    before = _expect_error(lambda: _step(torch.compile(model, backend="mhc", options=OPTIONS), rank))
    mhc_compile.init_sites(model)
    torch._dynamo.reset()
    _step(torch.compile(model, backend="mhc", options=OPTIONS), rank)
    return {**_compare(model, oracle), "before_init": before["error"]}


def fsdp_bf16(rank: int) -> dict:
    """A bf16 model: its sites are fp32 (the contract), and FSDP2 needs one dtype a fully_shard group, so README's
    remedy casts them to the model's dtype before sharding each block. Every parameter then gets a finite gradient
    of its own dtype."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = NanoGPT(**SMALL).to(torch.bfloat16)
    mhc_compile.prepare(model, _batch()[:2], n=N)
    sites_fp32 = all(p.dtype == torch.float32 for p in mhc_compile.mhc_parameters(model))
    model.to(torch.bfloat16)
    for block in model.h:
        fully_shard(block)
    fully_shard(model)
    _step(torch.compile(model, backend="mhc", options=OPTIONS), rank)
    result = {"sites_fp32": sites_fp32, **_grads_finite(model, torch.bfloat16)}

    # README's other way: fp32 parameters, bf16 compute by FSDP2's mixed-precision policy
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = NanoGPT(**SMALL)
    mhc_compile.prepare(model, _batch()[:2], n=N)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    for block in model.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    _step(torch.compile(model, backend="mhc", options=OPTIONS), rank)
    return {**result, "mp_policy": _grads_finite(model, torch.float32)}


def _grads_finite(model: torch.nn.Module, dtype: torch.dtype) -> dict:
    grads = [p.grad for p in model.parameters()]
    return {"missing": sum(g is None for g in grads),
            "finite": all(g.dtype == dtype and bool(torch.isfinite(g.full_tensor()).all()) for g in grads if g is not None)}


CASES = [ddp_one_bucket, ddp_split, ddp_split_off, ddp_one_graph, ddp_lazy, ddp_prepare_wrapped,
         fsdp_root, fsdp_lazy, fsdp_blocks, fsdp_meta, fsdp_bf16,
         fsdp_load_after_shard]


def run(rank: int, world: int, out: str) -> None:
    """One rank: every case in turn, each on fresh modules and a fresh Dynamo cache."""
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    results = {}
    try:
        for case in CASES:
            torch._dynamo.reset()
            results[case.__name__] = case(rank)
            dist.barrier()  # a case whose ranks disagree stops here, not in the next case's collectives
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()
