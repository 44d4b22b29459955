"""End-to-end checks of real usage on a CUDA machine (issue 4): what the CPU test suite checks with the
reference kernels under ``aot_eager``, run here with the Triton kernels compiled for real and Inductor.

For each architecture (the tests' small configs, plus torchvision's ResNet-18 when it is installed):
``backend="mhc"`` with its defaults (kernels="auto" -> Triton, Inductor, fused boundary ops, recompute)
against the same converted model with the reference kernels under ``aot_eager``, fp32, mHC parameters
moved off their init: output and every gradient (relative error to the largest entry). Then a bf16
autocast step (finite gradients for every mHC parameter), greedy ``generate()`` with a KV cache against
the reference run eagerly without cache, and the number of graphs compiled while the batch and sequence
length change. Writes a markdown table to $OUT/gpu_check.md (or ./gpu_check.md).

    PYTHONPATH=. python benchmarks/gpu_check.py [--budget-s 420]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import mhc_compile  # noqa: E402
from models import NanoGPT, output_tensor, perturb_mhc  # noqa: E402

DEV = "cuda"
REFERENCE = {"n": 4, "kernels": "reference", "inner_backend": "aot_eager"}
FAST = {"n": 4}
TOL = 2e-3  # fp32 both sides; the Triton dots are exact ("ieee") for fp32 streams


def _models():
    import test_architectures as arch
    import test_usage as usage

    yield "nanogpt", NanoGPT(layers=2), lambda: {"idx": torch.randint(0, 64, (2, 16))}
    yield "gpt2", usage._gpt2(), lambda: {"input_ids": torch.randint(0, 50, (2, 8))}
    yield "llama", usage._llama(), lambda: {"input_ids": torch.randint(0, 50, (2, 8))}
    for name in ("mistral", "mixtral", "roberta", "t5", "resnet18"):
        model, inputs = arch._build(name)
        if name == "resnet18":  # batch norm over 2 samples at 1x1 (layer4 of a 32x32 input) is ill-conditioned
            inputs = lambda: {"x": torch.randn(8, 3, 64, 64)}  # noqa: E731
        yield name, model, inputs
    try:
        import torchvision

        yield ("torchvision resnet18", torchvision.models.resnet18(num_classes=10),
               lambda: {"x": torch.randn(8, 3, 64, 64)})
    except ImportError:
        pass


def _to(inputs, dev):
    return {k: v.to(dev) for k, v in inputs.items()}


def _step(compiled, model, inputs):
    model.zero_grad(set_to_none=True)
    out = output_tensor(compiled(**inputs)).float()
    (out.logsumexp(-1).mean() + 1e-3 * out.square().mean()).backward()
    return out.detach(), {k: p.grad.detach().float().clone() for k, p in model.named_parameters() if p.grad is not None}


def _rel(a, b, floor=1e-30):
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def _grad_errors(got_g, want_g):
    """Relative error of each gradient; a gradient that is zero in exact arithmetic (an attention key
    bias: softmax ignores a shift shared by a row) is rounding noise on both sides, so each is measured
    against at least 1e-4 of the largest gradient entry of the model."""
    floor = 1e-4 * max(g.abs().max().item() for g in want_g.values())
    return {k: _rel(got_g[k], want_g[k], floor) for k in want_g}


def check_architecture(name, model, make_inputs, emit):
    torch.manual_seed(0)
    model = model.to(DEV)
    for m in model.modules():  # both sides must compute the same function: no dropout draws
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):  # functional dropout (T5's attention)
            m.dropout = 0.0
    inputs = _to(make_inputs(), DEV)
    reference = torch.compile(model, backend="mhc", options=REFERENCE)
    with torch.no_grad():  # creates the mHC parameters (prepare() takes positional inputs only; T5 needs kwargs)
        reference(**inputs)
    perturb_mhc(model, scale=0.1)
    want, want_g = _step(reference, model, inputs)
    torch._dynamo.reset()
    t0 = time.time()
    fast = torch.compile(model, backend="mhc", options=FAST)
    got, got_g = _step(fast, model, inputs)
    compile_s = time.time() - t0
    report = [r for r in mhc_compile.REPORTS if r.sites][-1]
    ops = sorted({n.target._opname for n in report.gm.graph.nodes if getattr(n.target, "namespace", "") == "mhc_compile"})
    out_err = _rel(got, want)
    errors = _grad_errors(got_g, want_g)
    worst = max(errors, key=errors.get)
    grad_err = errors[worst]
    mhc_keys = [k for k, _ in model.named_parameters() if ".mhc_" in k or k.startswith("mhc_")]
    missing = [k for k in mhc_keys if k not in got_g]
    # bf16 autocast step through the same compiled model
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, g16 = _step(fast, model, inputs)
    finite16 = all(k in g16 and torch.isfinite(g16[k]).all() for k in mhc_keys)
    ok = out_err < TOL and grad_err < TOL and not missing and finite16 and report.impl == "triton"
    emit(f"| {name} | {len(report.sites)} | {report.impl}: {', '.join(ops)} | {out_err:.1e} | {grad_err:.1e} ({worst}) | "
         f"{'yes' if not missing else 'missing ' + str(missing[:2])} | {'yes' if finite16 else 'no'} | "
         f"{compile_s:.0f} | {'PASS' if ok else 'FAIL'} |")
    return ok


def check_generate(emit):
    import test_usage as usage

    ok_all = True
    for arch in ("gpt2", "llama"):
        torch.manual_seed(0)
        model = (usage._gpt2 if arch == "gpt2" else usage._llama)().to(DEV).eval()
        ids = torch.randint(1, 50, (2, 5), device=DEV)
        mhc_compile.prepare(model, ids, n=4)
        perturb_mhc(model, scale=0.1)
        torch._dynamo.reset()
        want = usage._greedy_reference(model, ids, 8)
        torch._dynamo.reset()
        backend = usage.CountingBackend(n=4)
        model.forward = torch.compile(model.forward, backend=backend)
        got = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0, min_new_tokens=8)
        del model.forward
        ok = torch.equal(got, want) and backend.calls <= 3
        ok_all &= ok
        emit(f"| generate {arch} (KV cache, 8 tokens) | same tokens as the reference run eagerly: "
             f"{torch.equal(got, want)}; graphs compiled: {backend.calls} | {'PASS' if ok else 'FAIL'} |")
    return ok_all


def check_dynamic(emit):
    import test_usage as usage

    torch.manual_seed(0)
    model = NanoGPT(layers=2, block=64).to(DEV)
    mhc_compile.prepare(model, torch.randint(0, 64, (2, 8), device=DEV), n=4)
    torch._dynamo.reset()
    backend = usage.CountingBackend(n=4)
    compiled = torch.compile(model, backend=backend)
    for b, t in [(2, 8), (3, 12), (4, 20), (5, 33), (2, 64)]:
        compiled(torch.randint(0, 64, (b, t), device=DEV)).sum().backward()
    ok = backend.calls <= 2
    emit(f"| dynamic shapes (5 batch x length pairs) | graphs compiled: {backend.calls} | {'PASS' if ok else 'FAIL'} |")
    return ok


def check_modes(emit):
    """torch.compile modes and fullgraph on the GPU, where reduce-overhead means CUDA graphs and
    max-autotune benchmarks Inductor's templates: three training steps each (the CUDA graph is recorded,
    then replayed) against the reference kernels under aot_eager, same mHC parameters."""
    torch.manual_seed(0)
    model = NanoGPT(layers=2).to(DEV)
    idx = torch.randint(0, 64, (2, 16), device=DEV)
    mhc_compile.prepare(model, idx, n=4)
    perturb_mhc(model, scale=0.1)
    torch._dynamo.reset()
    want, want_g = _step(torch.compile(model, backend="mhc", options=REFERENCE), model, {"idx": idx})
    ok_all = True
    for label, kwargs in (("reduce-overhead", {"options": {**FAST, "compile_mode": "reduce-overhead"}}),
                          ("max-autotune", {"mode": "max-autotune"}),
                          ("fullgraph=True", {"options": FAST, "fullgraph": True})):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="mhc", **kwargs)
        errs = []
        for _ in range(3):
            torch.compiler.cudagraph_mark_step_begin()
            got, got_g = _step(compiled, model, {"idx": idx})
            errs.append(max([_rel(got, want), *_grad_errors(got_g, want_g).values()]))
        ok = max(errs) < TOL and set(got_g) == set(want_g)
        ok_all &= ok
        emit(f"| mode {label} (3 training steps, nanogpt) | worst rel err of output and grads: {max(errs):.1e} | "
             f"{'PASS' if ok else 'FAIL'} |")
    return ok_all


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--only", nargs="*", default=None, help="model names to check (default: all)")
    ap.add_argument("--skip-usage", action="store_true")
    ap.add_argument("--usage-only", action="store_true", help="skip the architectures")
    ap.add_argument("--tag", default="", help="output file gpu_check-TAG.md (parallel processes)")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    # fp32 means fp32 on both sides: no TF32 convolutions or matmuls picked differently by each compiler
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    warnings.filterwarnings("ignore")
    import transformers
    import triton

    path = os.path.join(os.environ.get("OUT", "."), f"gpu_check{'-' + args.tag if args.tag else ''}.md")
    lines = [
        f"# GPU usage check — {datetime.date.today()}",
        "",
        f"- device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"transformers {transformers.__version__}",
        f"- `backend=\"mhc\"` defaults (Triton kernels, Inductor) against reference kernels under aot_eager, "
        f"fp32, n = 4, mHC parameters off their init; tolerance {TOL} relative to the largest entry",
        "",
        "| model | sites | kernels: ops | out rel err | worst grad rel err | every mHC param has a grad | "
        "bf16 autocast grads finite | compile s | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def emit(line):
        lines.append(line)
        print(line, flush=True)
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")

    results = []
    for name, model, make_inputs in _models():
        if args.usage_only or (args.only and name not in args.only):
            continue
        if time.time() > deadline:
            emit(f"| {name} | skipped: time budget | | | | | | | |")
            continue
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ok = check_architecture(name, model, make_inputs, emit)
            results.append(ok)
            if not ok:  # what the backend said about this model
                for w in {str(w.message) for w in caught if "mhc" in str(w.message)}:
                    emit(f"<!-- {name}: {w[:600]} -->")
        except Exception as e:
            results.append(False)
            emit(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | | | | | FAIL |")
            traceback.print_exc()
    emit("")
    emit("| usage | what | result |")
    emit("|---|---|---|")
    for check in (check_generate, check_dynamic, check_modes):
        if args.skip_usage:
            break
        if time.time() > deadline:
            emit(f"| {check.__name__} | skipped: time budget | |")
            continue
        try:
            results.append(check(emit))
        except Exception as e:
            results.append(False)
            emit(f"| {check.__name__} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | FAIL |")
            traceback.print_exc()
    emit("")
    emit(f"{sum(results)} of {len(results)} checks passed")


if __name__ == "__main__":
    main()
