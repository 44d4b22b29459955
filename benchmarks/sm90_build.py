"""Build Triton kernels for a GPU target on a machine without one, and read the binary's resources.

The labs' ``--ptxas`` modes use this to see registers, spilled bytes and shared memory of a tile before spending
device time on it: a stand-in driver names the target, ``JITFunction.warmup`` compiles, and the toolkit's
cuobjdump (shipped beside Triton's ptxas) reads the cubin Triton built.

Builds depend on the Triton version. To build with the device machine's Triton (3.6 in session 20) instead of this
machine's, put that wheel first on the path; it imports beside torch for these builds:

    pip install --no-deps --target /tmp/t36site triton==3.6.0
    PYTHONPATH=/tmp/t36site python benchmarks/lab_dx_dphi.py --ptxas --rows 23

Session 20 did this. With Triton 3.6 the shipped proj-backward tile spills 136 stack bytes with acc and 64
without; Triton 3.9 spills 200 and 104. The shared memory is 113 and 97 KB with both versions, as the GPU
reported.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch


@contextlib.contextmanager
def builds_of(module, kernel, arch: int = 90):
    """While active, the launches that ``module`` makes through its ``launch`` compile for sm_<arch> instead of
    running (``JITFunction.warmup`` under ``cpu_target``). Yields the list that collects ``kernel``'s builds;
    other kernels the wrapper launches (a hi / lo split before it, say) are skipped."""
    built = []

    def warmup(launched, grid, args, meta, shrink_stages=True, **options):
        if launched is kernel:
            built.append(launched.warmup(*args, **meta, **options, grid=grid))

    launch, module.launch = module.launch, warmup
    try:
        with cpu_target(arch):
            yield built
    finally:
        module.launch = launch


@contextlib.contextmanager
def cpu_target(arch: int = 90):
    """While active, Triton compiles for sm_<arch> (CUDA) whatever this machine has."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class _Target:  # what JITFunction asks the driver for before it compiles
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    previous = getattr(driver, "_active", None)  # None without a GPU: reset_active would raise
    driver.set_active(_Target())
    try:
        yield
    finally:
        driver._active = previous


def _cuobjdump(compiled, arch: int, flag: str) -> str:
    """The toolkit's cuobjdump (shipped beside Triton's ptxas) run with ``flag`` on the cubin Triton built."""
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(arch).path), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([cuobjdump, flag, path], capture_output=True, text=True).stdout


def resources(compiled, arch: int = 90) -> tuple[int, int]:
    """(registers a thread, stack bytes: spills) of the very binary Triton built."""
    usage = _cuobjdump(compiled, arch, "--dump-resource-usage")
    return int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1))


def sass(compiled, arch: int = 90) -> str:
    """The SASS of the binary Triton built (cuobjdump -sass)."""
    return _cuobjdump(compiled, arch, "-sass")


def opcode_counts(text: str, opcodes: tuple[str, ...]) -> dict[str, int]:
    """How often each opcode opens an instruction of the SASS text (predicates and modifiers allowed), and
    'total': every instruction."""
    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)
    counts = {op: sum(1 for ins in instructions if ins == op or ins.startswith(op + ".")) for op in opcodes}
    counts["total"] = len(instructions)
    return counts


def main_loop(text: str, opcode: str = "HGMMA") -> str:
    """The SASS lines of the innermost-first loop that holds the most ``opcode`` instructions: from a backward
    branch's target to the branch (cuobjdump prints targets as addresses). '' when no loop holds one. The
    kernels' steady state lives there; whole-binary counts also hold the pipeline's prologue and epilogue."""
    lines = text.splitlines()
    addrs = [int(m.group(1), 16) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", ln)) else None for ln in lines]
    best, best_count = "", 0
    for i, ln in enumerate(lines):
        jump = re.search(r"\bBRA\s+(?:\S+,\s*)?0x([0-9a-f]+)", ln)
        if jump is None or addrs[i] is None or int(jump.group(1), 16) >= addrs[i]:
            continue
        start = next(j for j in range(i + 1) if addrs[j] is not None and addrs[j] >= int(jump.group(1), 16))
        body = "\n".join(lines[start:i + 1])
        count = opcode_counts(body, (opcode,))[opcode]
        if count > best_count:
            best, best_count = body, count
    return best
