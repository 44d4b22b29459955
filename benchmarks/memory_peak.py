"""What is alive at a training step's memory peak: the residual stack vs backend="mhc" (bench_training's stack).

Records the CUDA caching allocator's history over one step (after warm-up), replays its alloc / free events to
find the moment of the peak, and prints the tensors alive then, in units of one C-wide bf16 activation of the
batch (T x C x 2 bytes; an n-stream tensor is n units), grouped by the first frame of their allocation inside
this project or Inductor's generated code, and marked "saved" where the block holds a tensor that the forward
saved for backward (``saved_tensors_hooks`` around the recorded step). That says which stream-sized tensors make
the activation-memory overhead that bench_training.py reports, where they come from, and whether the partition
kept them.

    PYTHONPATH=. python benchmarks/memory_peak.py [d] [options as k=v, e.g. recompute=4]
"""

from __future__ import annotations

import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mhc_compile  # noqa: E402
from benchmarks.bench_training import Stack, _step  # noqa: E402


_GRAPHS: dict[str, str] = {}  # generated-code file -> "graph k" in order of first allocation (forward first)


def _source(name: str, line: int) -> str:
    try:
        with open(name) as fh:
            return fh.readlines()[line - 1].strip()[:80]
    except (OSError, IndexError):
        return ""


def _frame(frames: list[dict]) -> str:
    """Where a block was allocated: the generated graph it belongs to (graph 0 = the step's first, the forward)
    with its line, and the first frame of this project inside that call, with their source lines."""
    ours, graph = "", "(outside compiled graphs)"
    for f in frames:
        name = f.get("filename", "")
        if not ours and "mhc_compile" in name:
            ours = f"{os.path.basename(name)}:{f['line']} {_source(name, f['line'])}"
        if "torchinductor" in name and name.endswith(".py"):
            label = _GRAPHS.setdefault(name, f"graph {len(_GRAPHS)}")
            graph = f"{label}:{f['line']} {_source(name, f['line'])}" if not ours else f"{label}"
            break
    return f"{graph} | {ours}" if ours else graph


def live_at_peak(snapshot: dict) -> tuple[int, list[tuple[int, str, int]], str]:
    """(peak bytes above the step's start, [(size, frame, address)] of the blocks allocated during the step and
    alive at the peak, the allocation that reached the peak) from the allocator trace."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live: dict[int, tuple[int, str, int]] = {}
    cur = peak = 0
    at_peak: list[tuple[int, str, int]] = []
    where = ""
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], _frame(e.get("frames", [])), e["addr"])
            cur += e["size"]
            if cur > peak:
                peak, at_peak, where = cur, list(live.values()), live[e["addr"]][1]
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]  # whichever of the two comes first
    return peak, at_peak, where


def highest_by_frame(snapshot: dict) -> list[tuple[int, str]]:
    """[(the highest allocated total any allocation from a frame reached, that frame)], highest first: the peak,
    then how far below it the next-highest moments of other ops sit (what a cut at the peak's op would gain)."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live: dict[int, int] = {}
    cur = 0
    best: dict[str, int] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            cur += e["size"]
            frame = _frame(e.get("frames", []))
            best[frame] = max(best.get(frame, 0), cur)
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            cur -= live.pop(e["addr"])
    return sorted(((v, k) for k, v in best.items()), reverse=True)


def _saved(addr: int, size: int, saved_ptrs: list[int]) -> bool:
    """Whether a block holds the storage of a tensor the forward saved for backward."""
    return any(addr <= p < addr + size for p in saved_ptrs)


def report(name: str, fn, x, unit: int) -> list[str]:
    for _ in range(3):
        _step(fn, x)
    torch.cuda.synchronize()
    saved_ptrs: list[int] = []  # storages the recorded step's forward hands to its backward

    def pack(t):
        saved_ptrs.append(t.untyped_storage().data_ptr())
        return t

    torch.cuda.memory._record_memory_history(max_entries=200_000)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(fn, x)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    _GRAPHS.clear()
    peak, blocks, where = live_at_peak(snap)
    by_frame: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for size, frame, addr in blocks:
        # "saved": the block holds a tensor saved for backward (a block alive at the peak that is not saved, and
        # not made in the backward, is kept by something else: an alias, a graph output, the allocator)
        key = f"{'saved' if _saved(addr, size, saved_ptrs) else '     '} {frame}"
        by_frame[key] += size
        count[key] += 1
    lines = [f"== {name}: {peak / 2**30:.2f} GiB allocated during the step at its peak = {peak / unit:.1f} units "
             f"(unit = T x C x 2 B = {unit / 2**20:.0f} MiB), reached at {where}"]
    for frame, size in by_frame.most_common(25):
        lines.append(f"  {size / unit:7.2f} units  x{count[frame]:3d}  {frame}")
    lines.append("  the highest total reached at an allocation, by where it was made (the top 8):")
    for total, frame in highest_by_frame(snap)[:8]:
        lines.append(f"  {total / unit:7.1f} units  {frame}")
    return lines


def main() -> None:
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    options = {}
    for kv in sys.argv[2:]:
        k, v = kv.split("=", 1)
        options[k] = int(v) if v.isdigit() else {"True": True, "False": False}.get(v, v)
    if options.pop("reorder_for_peak_memory", True) is False:  # Inductor's scheduler pass, for comparison
        options["inductor_options"] = {"reorder_for_peak_memory": False}
    torch.manual_seed(0)
    x = torch.randn(4, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    unit = x.numel() * x.element_size()
    residual = torch.compile(Stack(d, 4).to("cuda", torch.bfloat16))
    m = Stack(d, 4).to("cuda", torch.bfloat16)
    mhc_compile.prepare(m, x.detach(), n=4)
    lines = report("residual (Inductor)", residual, x, unit)
    lines += report(f"backend=mhc {options or ''}", torch.compile(m, backend="mhc", options={"n": 4, **options}), x,
                    unit)
    text = "\n".join(lines)
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"memory_peak_{d}.txt"), "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
