"""What the GPU check scripts share: another build of a kernel module beside this one, in one process (``--against
FILE``), config specs for a build (``parse_tune``), a results file written at every line (``Lines``), and a call's
kernels timed under torch.profiler (``kernel_times``).

A branch's kernel and main's are best compared in the same process on the same GPU (interleaved timings, bit-equal
outputs), since clocks and machines differ between device calls. FILE is the other build's module source, e.g.
``git show main:mhc_compile/kernels/gluon_step_bwd.py > against_main.py`` (untracked, so it travels to the device).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import os
import sys


def kernel_times(fn, calls: int, on_gpu: bool = True, width: int = 70) -> tuple[collections.Counter, collections.Counter]:
    """Each kernel's device time, us a call of ``fn``, and its launches a call, over ``calls`` warm eager calls under
    torch.profiler (names cut to ``width``). ``on_gpu`` False (tests, under the interpreter): each outermost op's
    CPU time instead."""
    import torch

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    fn()  # compiled and its caches filled before the profile
    sync()
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        sync()
    us, launches = collections.Counter(), collections.Counter()
    for e in prof.events():
        if on_gpu:
            counted, t = e.device_type == torch.autograd.DeviceType.CUDA, e.device_time_total
        else:
            counted, t = e.cpu_parent is None, e.cpu_time_total
        if counted:
            us[e.name[:width]] += t / calls
            launches[e.name[:width]] += 1
    return us, collections.Counter({k: v / calls for k, v in launches.items()})


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


def parse_tune(spec: str, flag: str = "--against-tune") -> dict:
    """'mix_regs=184,join_hi_lo=false' -> {'mix_regs': 184, 'join_hi_lo': False}: a config's integer and boolean
    fields as a check script's ``flag`` gives them."""
    out = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        value = value.strip().lower()
        if sep and value in ("true", "false"):
            out[key.strip()] = value == "true"
        elif sep and value.lstrip("-").isdigit():
            out[key.strip()] = int(value)
        else:
            raise SystemExit(f"{flag} {item!r}: expected FIELD=INTEGER or FIELD=true/false")
    return out


class Lines(list):
    """The results file's lines, written out again at every append or extend (when ``path`` is set): a device call
    that a hung kernel runs past its time limit still returns the lines before it."""

    def __init__(self, path: str | None, first=()):
        super().__init__(first)
        self.path = path
        self._write()

    def append(self, line: str) -> None:
        super().append(line)
        self._write()

    def extend(self, lines) -> None:
        super().extend(lines)
        self._write()

    def __iadd__(self, lines):
        self.extend(lines)
        return self

    def _write(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(self.path, "w") as f:
                f.write("\n".join(self) + "\n")
