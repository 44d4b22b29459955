"""Build Triton kernels for a GPU target on a machine without one, and read the binary's resources.

    python benchmarks/sm90_build.py --hazards   # every wgmma kernel: a one-slot operand loaded over too soon?
    python benchmarks/sm90_build.py --sweep     # every op's kernels at n = 1..16: do they build and fit?

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
import itertools
import os
import re
import subprocess
import tempfile

import torch


@contextlib.contextmanager
def builds_of(module, kernel, arch: int = 90):
    """While active, the launches that ``module`` and triton_ops' kernel modules (``triton_ops.LAUNCHING``) make
    through their ``launch`` compile for sm_<arch> instead of running (``JITFunction.warmup`` under ``cpu_target``).
    Yields the list that collects ``kernel``'s builds; other kernels the wrapper launches (a hi / lo split before
    it, say) are skipped."""
    from mhc_compile.kernels import triton_ops

    built = []

    def warmup(launched, grid, args, meta, shrink_stages=True, **options):
        if launched is kernel:
            built.append(launched.warmup(*args, **meta, **options, grid=grid))

    with _launching_through(warmup, (module, *triton_ops.LAUNCHING)), cpu_target(arch):
        yield built


@contextlib.contextmanager
def _launching_through(launch, modules):
    """While active, each of ``modules`` launches through ``launch`` (each binds its own name ``launch``)."""
    modules = {id(m): m for m in modules}.values()
    saved = [(m, m.launch) for m in modules]
    for m in modules:
        m.launch = launch
    try:
        yield
    finally:
        for m, bound in saved:
            m.launch = bound


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


def loops(text: str) -> list[str]:
    """The SASS lines of every loop, innermost first: from a conditional backward branch's target to the branch
    (cuobjdump prints targets as addresses).

    Unconditional backward branches are not loop latches: ptxas puts an mbarrier wait's retry spin out of line at
    the function's end, and its block jumps back into the loop it came from (``@!P0 BRA <spin>; BRA <back>``). In a
    warp-specialized kernel that span runs from the middle of one partition's loop over the partitions laid out
    after it; before session 28, ``main_loop`` took such spans for loops."""
    lines = text.splitlines()
    addrs = [int(m.group(1), 16) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", ln)) else None for ln in lines]
    found = []
    for i, ln in enumerate(lines):
        jump = re.search(r"(@!?U?P\w+\s+)?\bBRA\s+(?:\S+,\s*)?0x([0-9a-f]+)", ln)
        if jump is None or jump.group(1) is None or addrs[i] is None or int(jump.group(2), 16) >= addrs[i]:
            continue
        start = next(j for j in range(i + 1) if addrs[j] is not None and addrs[j] >= int(jump.group(2), 16))
        found.append("\n".join(lines[start:i + 1]))
    return found


def innermost_loops(text: str) -> list[str]:
    """The loops (``loops``) that hold no other loop."""
    found = loops(text)
    return [body for body in found if not any(other != body and other in body for other in found)]


def biggest_loop(text: str) -> str:
    """The loop (``loops``) of the most instructions: a warp-specialized kernel's busiest partition's (the Gluon
    kernels' mixing warpgroups), whose loop a tile sets the pace."""
    return max(loops(text), key=lambda body: body.count("\n"), default="")


def loop_spills(text: str) -> dict[str, int]:
    """Local-memory loads and stores (LDL / STL: spills) in any loop of any partition, each instruction once."""
    lines = {line for body in loops(text) for line in body.splitlines()}
    counts = opcode_counts("\n".join(sorted(lines)), ("LDL", "STL"))
    return {"LDL": counts["LDL"], "STL": counts["STL"]}


def ws_loop_counts(text: str, opcodes: tuple[str, ...]) -> dict[str, int]:
    """A warp-specialized kernel's loop report, as the Gluon check scripts print it: ``opcodes`` and 'total' in its
    biggest loop, then LDL / STL in any loop (``loop_spills``)."""
    counts = opcode_counts(biggest_loop(text), opcodes)
    counts.update(loop_spills(text))
    return counts


def main_loop(text: str, opcode: str = "HGMMA") -> str:
    """The loop (``loops``) that holds the most ``opcode`` instructions, the longer one of a tie; '' when no loop
    holds one. The kernels' steady state lives there; whole-binary counts also hold the pipeline's prologue and
    epilogue. In a warp-specialized kernel whose partitions issue the same number of wgmmas a tile, the tie goes to
    the partition doing the most besides (the Gluon kernels' mixing warpgroups, not their dphi warpgroup)."""
    best, best_key = "", (0, 0)
    for body in loops(text):
        counts = opcode_counts(body, (opcode,))
        key = (counts[opcode], counts["total"])
        if counts[opcode] and key > best_key:
            best, best_key = body, key
    return best


def wgmma_buffer_hazards(ttgir: str) -> list[str]:
    """Asynchronous wgmmas (``ttng.warp_group_dot`` with isAsync) whose shared-memory operand is a buffer too short
    for its ring, which a load (TMA or cp.async) writes while the wgmma may still read it: before a
    ``warp_group_dot_wait`` with pendings = 0, scanning the enclosing ``scf.for`` body from the dot on and around its
    back edge. Each hazard as 'line L: ... line M'. A buffer is too short when it has one slot, or no more slots
    than the loads into it before the loop (its prefetch distance): the load in the loop then goes into the slot
    of the tile that the last, unwaited wgmma reads. Slots beyond that are told apart by index arithmetic that this
    does not follow. Found in session 24: proj's one-pass backward, whose X tile is the dphi wgmma's operand and
    the next tile's load destination (kernels/triton_proj_bwd.py); in session 30: proj's forward, whose X tile
    also feeds sq through registers, which Triton 3.6's pipeliner gives one slot too few (triton-lang/triton
    #6691 / #7110)."""
    lines = ttgir.splitlines()
    slots, base = {}, {}  # alloc -> its leading (slot) dimension; memdesc view -> the alloc it indexes
    for line in lines:
        if m := re.match(r"\s*(%[\w.]+) = ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x", line):
            slots[m.group(1)] = int(m.group(2))
        elif m := re.match(r"\s*(%[\w.]+) = ttg\.memdesc_index (%[\w.]+)\[", line):
            base[m.group(1)] = base.get(m.group(2), m.group(2))

    def indent(line):
        return len(line) - len(line.lstrip())

    def loads_into(line):
        if "async_tma_copy_global_to_local" not in line and "async_copy_global_to_local" not in line:
            return set()
        return {base.get(v, v) for v in re.findall(r"%[\w.]+", line.split("=", 1)[-1])}

    hazards = []
    for i, line in enumerate(lines):
        if "ttng.warp_group_dot " not in line or "isAsync = true" not in line:
            continue
        operands = re.findall(r"%[\w.]+", line.split("=", 1)[1].split(":", 1)[0])[:2]
        head = next((j for j in range(i - 1, -1, -1) if "scf.for" in lines[j] and indent(lines[j]) < indent(line)),
                    None)
        if head is None:
            continue
        ahead = {a: sum(a in loads_into(lines[j]) for j in range(head)) for a in slots}  # prologue loads
        single = {base.get(v, v) for v in operands} & {a for a, s in slots.items() if s == 1 or s <= ahead[a]}
        if not single:
            continue
        end = next(j for j in range(head + 1, len(lines)) if indent(lines[j]) <= indent(lines[head]))
        for j in list(range(i + 1, end)) + list(range(head + 1, i)):
            if "warp_group_dot_wait" in lines[j] and "pendings = 0" in lines[j]:
                break
            if "async_tma_copy_global_to_local" in lines[j] or "async_copy_global_to_local" in lines[j]:
                written = {base.get(v, v) for v in re.findall(r"%[\w.]+", lines[j].split("=", 1)[-1])}
                if single & written:
                    hazards.append(f"line {i + 1}: an async wgmma reads {sorted(single & written)} (too few slots); "
                                   f"line {j + 1} loads into it before the wgmma is waited on")
                    break
    return hazards


def wgmma_builds(n: int = 4, c: int = 4096, t: int = 1024):
    """(name, compiled kernel) of every Triton kernel of the default and opt-in paths that runs wgmmas, built for
    sm_90a the way their wrappers launch them on bf16 streams (TMA and pointer loads where both exist)."""
    from mhc_compile.kernels import reference as ref
    from mhc_compile.kernels import triton_ops as tk
    from mhc_compile.kernels import triton_post_res_proj as tprp
    from mhc_compile.kernels import triton_proj as tproj
    from mhc_compile.kernels import triton_proj_bwd as tpb

    m = ref.num_coeffs(n)
    bf, f32 = dict(dtype=torch.bfloat16), dict(dtype=torch.float32)
    x, y, phi = torch.zeros(t, n, c, **bf), torch.zeros(t, c, **bf), torch.zeros(n * c, m, **f32)
    dp, dsq, h = torch.zeros(t, m, **f32), torch.zeros(t, **f32), torch.zeros(t, n, **f32)
    hres = torch.zeros(t, n, n, **f32)

    def one(module, kernel, call, **tuning):
        with builds_of(module, kernel) as built, contextlib.ExitStack() as stack:
            for name, fields in tuning.items():
                stack.enter_context(tk.tuning(name, **fields))
            call()
        return built[0]

    yield "proj forward", one(tproj, tproj._proj_fwd_kernel, lambda: tk.proj(x, phi))
    for tma in (True, False):
        label = "TMA" if tma else "pointer"
        yield f"post_res_proj, {label}", one(tprp, tprp._post_res_proj_kernel,
                                            lambda: tk.post_res_proj(x, hres, h, y, phi),
                                            post_res_proj=dict(tma=tma))
        for acc in (x, None):
            yield (f"proj's one-pass backward, {label}, {'with' if acc is not None else 'without'} acc",
                   one(tpb, tpb._proj_dx_dphi_kernel, lambda: tk.proj_pre_backward(x, phi, dp, dsq, h, y, acc),
                       proj_dx_dphi=dict(tma=tma)))
    # the fallback where the staged dout and acc do not fit a GPU's shared memory (triton_proj._proj_grads)
    yield "proj's one-pass backward, TMA, with acc, no PIPELINE_ALL", one(
        tpb, tpb._proj_dx_dphi_kernel, lambda: tk.proj_pre_backward(x, phi, dp, dsq, h, y, x),
        proj_dx_dphi=dict(pipeline_all=False))
    # the pair's dx kernel runs mma.sync on 16-token tiles, no wgmma
    yield "proj's backward pair: dphi", one(tproj, tproj._proj_dphi_kernel,
                                            lambda: tk.proj_pre_backward(x, phi, dp, dsq, h, y, None),
                                            proj_dx_dphi=dict(enabled=False))


SMEM_LIMIT = 232448  # bytes of shared memory a block may take on an H100 / H200 (227 KB)


@contextlib.contextmanager
def gpu_builds(arch: int = 90, smem: int = SMEM_LIMIT):
    """While active, every launch of the ops' Triton kernels (``triton_ops.LAUNCHING``, triton_fused, triton_proj_bwd)
    compiles for sm_<arch> instead of running, and meets the shared memory as the GPU would: a build past ``smem``
    raises OutOfResources inside kernels/launch.py's own launch path, which drops pipeline stages where the launch
    allows it (shrink_stages) and otherwise passes the error to the op's fallback. Yields the list of builds, (kernel name, stages, shared bytes).
    The ops' outputs are left unwritten."""
    from triton.runtime.errors import OutOfResources

    from mhc_compile.kernels import launch as L
    from mhc_compile.kernels import triton_fused, triton_ops, triton_proj_bwd

    built = []

    class Compiling:
        """``kernel[grid](...)`` that compiles instead of running and, past ``smem``, raises OutOfResources as the
        GPU does when it loads the kernel: launch's own retry with fewer stages then runs as it would there."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kw):
                compiled = self.kernel.warmup(*args, **kw, grid=grid)
                if compiled.metadata.shared > smem:
                    raise OutOfResources(compiled.metadata.shared, smem, "shared memory")
                built.append((self.kernel.fn.__name__, kw.get("num_stages"), compiled.metadata.shared))
                return compiled
            return run

    stand_ins = {}

    def build(kernel, grid, args, meta, shrink_stages=True, **options):
        stand_in = stand_ins.setdefault(kernel, Compiling(kernel))  # one a kernel: launch remembers what fit by it
        return L._launch_slow(stand_in, grid, args, meta, options, shrink_stages)

    with _launching_through(build, (*triton_ops.LAUNCHING, triton_fused, triton_proj_bwd)), cpu_target(arch):
        yield built


def sweep(ns, dtypes, t: int = 256, cs=(4096,)) -> tuple[list[str], list[str], int]:
    """Every op of launch_check.cases at each n and stream dtype, built for sm_90a (``gpu_builds``) on CPU tensors:
    (problems, fallbacks, launches built). A problem is an op that raised: a kernel that does not build, or that fits
    no stage count and has no fallback. A fallback is an op's warning that it took another kernel. CPU tensors take
    the pointer builds: the TMA and Gluon kernels have their own --build checks."""
    import warnings

    from benchmarks.launch_check import cases

    problems, fallbacks, count = [], [], 0
    for n, c, dtype in itertools.product(ns, cs, dtypes):
        label = f"n = {n}, C = {c}, {str(dtype).split('.')[1]}"
        with gpu_builds() as built, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                for name, call in cases(t, n, c, dtype, "cpu"):
                    try:
                        call()
                    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the sweep
                        problems.append(f"{label}: {name}: {type(e).__name__}: {str(e)[:300]}")
            except Exception as e:  # noqa: BLE001 - the inputs' own ops (proj, coeffs, step, enter)
                problems.append(f"{label}: the inputs: {type(e).__name__}: {str(e)[:300]}")
        count += len(built)
        fallbacks += sorted({f"{label}: " + re.sub(r" \(out of resource[^)]*\)", "", str(w.message))
                             for w in caught if "mhc" in str(w.message)})
    return problems, fallbacks, count


def main() -> int:
    import argparse

    import triton

    ap = argparse.ArgumentParser(description="sm_90a builds on a machine without a GPU")
    ap.add_argument("--hazards", action="store_true",
                    help="every wgmma kernel's build: one-slot operands loaded over before their wgmma is waited on")
    ap.add_argument("--sweep", action="store_true",
                    help="every op's Triton kernels at each --n and --dtypes: builds, and fits the shared memory?")
    ap.add_argument("--n", type=int, nargs="*", default=list(range(1, 17)))
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32", "float16"])
    ap.add_argument("--c", type=int, nargs="*", default=[4096], help="channel counts (--sweep)")
    args = ap.parse_args()
    if not (args.hazards or args.sweep):
        ap.print_help()
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("sm90_build: unset TRITON_INTERPRET (it compiles for the GPU)")
        return 2
    if args.sweep:
        problems, fallbacks, count = sweep(args.n, [getattr(torch, d) for d in args.dtypes], cs=args.c)
        print(f"sm_90a builds, triton {triton.__version__}: {count} launches built at n = {args.n}, C = {args.c}, "
              f"{', '.join(args.dtypes)}; {len(problems)} problems")
        for line in fallbacks:
            print(f"fallback: {line}")
        for line in problems:
            print(f"PROBLEM: {line}")
        return 1 if problems else 0
    print(f"sm_90a builds, triton {triton.__version__}")
    bad = 0
    for name, compiled in wgmma_builds():
        found = wgmma_buffer_hazards(compiled.asm["ttgir"])
        dots = compiled.asm["ttgir"].count("ttng.warp_group_dot ")
        print(f"{name}: {dots} wgmma ops, {len(found)} hazards{': ' + '; '.join(found) if found else ''}: "
              f"{'FAIL' if found or not dots else 'ok'}", flush=True)
        bad += bool(found) or not dots
    return 1 if bad else 0


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mhc_compile
    raise SystemExit(main())
