"""Data-parallel training of a converted model (mhc_compile/distributed.py): DDP and FSDP2 on two gloo ranks on the
CPU. The ranks run every case of tests/distributed_worker.py once (one spawn for the module); each test reads
one case's results from both ranks."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLD = 2
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.start_processes(distributed_worker.run, args=(WORLD, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):  # True once every rank has ended
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {WORLD} ranks did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = []
    for rank in range(WORLD):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


def case(ranks, name: str) -> dict:
    """One case's result, the same on every rank (the error texts, the warnings; gradients are compared to the
    oracle on each rank, and DDP / FSDP give every rank the average)."""
    got = [r[name] for r in ranks]
    if "error" in got[0]:
        assert all(g == got[0] for g in got), got
    return got[0]


def _trains_like_the_oracle(result: dict) -> None:
    assert result["missing"] == []
    assert result["mhc_params"] == 12  # 2 layers x 2 sites x (phi, bias, alpha)
    assert result["worst"] < 1e-10, result


@pytest.mark.parametrize("name", ["ddp_one_bucket", "ddp_split_off", "ddp_one_graph", "fsdp_root"])
def test_averaged_gradients_match_the_oracle_on_the_whole_batch(ranks, name):
    for r in ranks:
        _trains_like_the_oracle(r[name])


def test_ddp_buckets_overlap_the_reduces_with_the_backward(ranks):
    """optimize_ddp off: the backend splits the rewritten graph at DDP's buckets, and a bucket is reduced while the
    backward of the pieces before it has yet to run; with ddp_buckets=False, one graph, every reduce after it."""
    split, whole = case(ranks, "ddp_split_off"), case(ranks, "ddp_one_graph")
    assert split["pieces"] == [2] and whole["pieces"] == [0]
    assert split["order"] == ["graph", "reduce", "graph", "reduce"]  # DDP's 1 MB first bucket, then the rest
    assert whole["order"] == ["graph", "reduce", "reduce"]


def test_ddp_optimizer_split_is_an_error_naming_the_setting(ranks):
    error = case(ranks, "ddp_split")["error"]
    assert error is not None and error.startswith("MHCConversionError")
    assert "optimize_ddp = False" in error and "bucket" in error


def test_parameters_created_after_ddp_are_an_error(ranks):
    error = case(ranks, "ddp_lazy")["error"]
    assert error is not None and "do not exist yet" in error and "DistributedDataParallel" in error
    assert "mhc_compile.prepare(" in error


def test_prepare_of_a_wrapped_model_names_the_unsynchronised_sites(ranks):
    error = case(ranks, "ddp_prepare_wrapped")["error"]
    assert error is not None and "does not synchronise the mHC parameters of 4 residual site(s)" in error
    assert "h.0.mhc_attn" in error


def test_parameters_created_after_fully_shard_are_an_error(ranks):
    error = case(ranks, "fsdp_lazy")["error"]
    assert error is not None and "FSDP already manages '<root>'" in error


def test_loading_sites_after_fully_shard_is_an_error(ranks):
    error = case(ranks, "fsdp_load_after_shard")["error"]
    assert error is not None and error.startswith("MHCConversionError") and "FSDP already manages" in error
    assert "load_state_dict / load_sites before wrapping" in error


def test_fsdp_per_block_carries_the_streams_between_the_blocks(ranks):
    for r in ranks:
        assert r["fsdp_blocks"]["warnings"] == []
        _trains_like_the_oracle(r["fsdp_blocks"])


def test_fsdp_model_built_on_meta_trains_once_its_sites_are_initialised(ranks):
    for r in ranks:
        assert "made on the meta device" in r["fsdp_meta"]["before_init"]
        _trains_like_the_oracle(r["fsdp_meta"])


def test_fsdp_bf16_training_either_way_readme_gives(ranks):
    """A bf16 model with its sites cast to bf16, and an fp32 model under MixedPrecisionPolicy(param_dtype=bf16)."""
    for r in ranks:
        assert r["fsdp_bf16"] == {"sites_fp32": True, "missing": 0, "finite": True,
                                  "mp_policy": {"missing": 0, "finite": True}}
