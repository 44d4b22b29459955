"""Another build of a kernel module beside this one, in one process: ``--against FILE`` of the Gluon check scripts.

A branch's kernel and main's are best compared in the same process on the same GPU (interleaved timings, bit-equal
outputs), since clocks and machines differ between device calls. FILE is the other build's module source, e.g.
``git show main:mhc_compile/kernels/gluon_step_bwd.py > against_main.py`` (untracked, so it travels to the device).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys


def load_module(path: str, name: str):
    """The module at ``path``, importable as ``name`` beside this build's (Gluon's JIT reads the kernels' source
    through ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def serving(owner, importer: str, module):
    """``owner.importer()`` (the lazy import through which an op reaches its Gluon module) returns ``module`` inside
    the block, so the op as called runs the other build."""
    before = getattr(owner, importer)
    setattr(owner, importer, lambda: module)
    try:
        yield
    finally:
        setattr(owner, importer, before)
