"""CUDA kernel time of one training step by kernel name: the plain residual stack under Inductor, then
backend="mhc" with fold_stream_grads on and off; the profile behind benchmarks/results/training-*.md (what a
step spends its time on, not just its total).

    PYTHONPATH=. python benchmarks/profile_step.py [d]        (bench_training's stack: 4 layers, 2048 x 4, bf16)
"""
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mhc_compile  # noqa: E402
from benchmarks.bench_training import Stack, _step  # noqa: E402


def main():
    d = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
    torch.manual_seed(0)
    x = torch.randn(4, 2048, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    m = Stack(d, 4).to("cuda", torch.bfloat16)
    variants = [("residual (Inductor)", torch.compile(Stack(d, 4).to("cuda", torch.bfloat16)))]
    mhc_compile.prepare(m, x.detach(), n=4)
    for fold in (True, False):
        variants.append((f"backend=mhc fold_stream_grads={fold}",
                         torch.compile(m, backend="mhc", options={"n": 4, "fold_stream_grads": fold})))
    for name, c in variants:
        for _ in range(3):
            _step(c, x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                _step(c, x)
            torch.cuda.synchronize()
        agg = collections.Counter(); cnt = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                agg[e.name[:70]] += e.device_time_total / 3; cnt[e.name[:70]] += 1
        tot = sum(agg.values())
        print(f"\n== {name}: CUDA kernel time per step {tot/1000:.2f} ms")
        for kernel, us in agg.most_common(24):
            print(f"{us:9.1f} us  x{cnt[kernel]//3:3d}  {kernel}")


if __name__ == "__main__":
    main()
