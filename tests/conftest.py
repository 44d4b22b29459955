import os
import sys
import warnings

# Triton kernels run on the CPU under the interpreter here and in CI; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def _interpreter_reads_one_element_indices():
    """Triton 3.6's interpreter (the Triton torch 2.11 pins) gives a scalar its ``__index__`` as ``int()`` of a
    one-element array, which NumPy 2.4 refuses: every ``range()`` over a bound computed from ``tl.program_id`` then
    fails ("only 0-dimensional arrays can be converted to Python scalars"; session 35 on the GPU machine). Later
    Tritons squeeze the array first; this does the same for the interpreter the tests run, where it has the old line."""
    import inspect

    from triton.runtime import interpreter

    plain = getattr(interpreter, "_patch_lang_tensor", None)
    if plain is None or "int(self.handle.data))" not in inspect.getsource(plain):
        return

    def patch_lang_tensor(tensor, scope):
        plain(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor


if os.environ["TRITON_INTERPRET"] == "1":
    try:
        _interpreter_reads_one_element_indices()
    except (ImportError, OSError):  # no Triton (the tests that need it skip), or no source to read: leave it as is
        pass

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
