import os
import sys
import warnings

# Triton kernels run on the CPU under the interpreter here and in CI; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch._dynamo.config.cache_size_limit = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own models: start from an empty Dynamo cache."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(autouse=True)
def _no_silent_eager_fallback(request):
    """Every graph the backend rewrites must compile: a graph whose inner compile fails runs eagerly with a warning
    (backend._report_inner_failure), which ``quiet`` would hide. Session 33 found every dynamic=True compile doing
    so (Dynamo's restart request caught as a failure). A test of that fallback says so with the marker."""
    from mhc_compile.backend import REPORTS

    start = len(REPORTS)
    yield
    if request.node.get_closest_marker("inner_compile_failure") is None:
        failed = [w for r in REPORTS[start:] for w in r.warnings if "failed to compile rewritten graph" in w]
        assert not failed, failed
