"""Where a kernel's warps stall, per SASS instruction, from Nsight Compute's source page.

    ncu --set full --import-source yes -k regex:KERNEL --launch-skip 2 --launch-count 1 -o prof \\
        python benchmarks/ncu_case.py post_res_proj fwd
    ncu -i prof.ncu-rep --page source --csv --print-source sass > prof.csv
    python benchmarks/ncu_stalls.py prof.csv [--top 12]

Prints the share of stall samples by opcode, the share spent spinning on shared-memory barriers (a
``SYNCS.PHASECHK`` try-wait and the branch that retries it: TMA loads not landed yet), what spills cost
(local loads and stores executed, their samples), and the instructions
with the most samples, each with the one before it (a branch's samples belong to the wait it retries) and its
top stall reasons. Session 20 used it on post_res_proj and proj's backward (session20 results).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import Counter
from dataclasses import dataclass, field

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


@dataclass
class Instruction:
    address: str
    source: str
    samples: int
    executed: int = 0  # warp-level executions
    stalls: dict = field(default_factory=dict)  # reason -> samples

    @property
    def opcode(self) -> str:
        words = [w for w in self.source.split() if not w.startswith("@")]
        return words[0].split(".")[0] if words else "?"


def read(path: str) -> list[Instruction]:
    """The instructions of the first kernel in ncu's source-page CSV (a kernel-name row, then a header row)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    start = next(i for i, row in enumerate(rows) if SAMPLES in row)
    header = rows[start]
    src, smp, ex = header.index("Source"), header.index(SAMPLES), header.index(EXECUTED)
    reasons = [(j, h[len("stall_"):]) for j, h in enumerate(header) if h.startswith("stall_") and "(" not in h]
    out = []
    for row in rows[start + 1:]:
        if len(row) != len(header) or not row[smp].isdigit():
            break  # the next kernel's block
        stalls = {name: int(row[j]) for j, name in reasons if row[j].isdigit() and int(row[j])}
        out.append(Instruction(row[0], row[src].strip(), int(row[smp]), int(row[ex] or 0), stalls))
    return out


def barrier_wait_share(code: list[Instruction]) -> float:
    """Samples on shared-memory barrier try-waits and on the branches right after them, over all samples."""
    total = sum(i.samples for i in code) or 1
    spin = 0
    for k, ins in enumerate(code):
        if "SYNCS.PHASECHK" in ins.source:
            spin += ins.samples
            if k + 1 < len(code) and code[k + 1].opcode == "BRA":
                spin += code[k + 1].samples
    return spin / total


def report(code: list[Instruction], top: int) -> list[str]:
    total = sum(i.samples for i in code) or 1
    spills = [i for i in code if i.opcode in ("LDL", "STL")]
    by_op = Counter()
    for ins in code:
        by_op[ins.opcode] += ins.samples
    lines = [f"stall samples: {total}",
             "by opcode: " + ", ".join(f"{op} {100 * v / total:.1f} %" for op, v in by_op.most_common(10)),
             f"barrier waits (SYNCS.PHASECHK and its retry branch): {100 * barrier_wait_share(code):.1f} %",
             f"spills (LDL / STL): {sum(i.executed for i in spills)} executed, "
             f"{100 * sum(i.samples for i in spills) / total:.1f} % of the samples",
             "| share | instruction | the one before | top stalls |", "|---|---|---|---|"]
    order = sorted(range(len(code)), key=lambda k: -code[k].samples)[:top]
    for k in order:
        ins, prev = code[k], code[k - 1].source if k else ""
        reasons = ", ".join(f"{r} {v}" for r, v in sorted(ins.stalls.items(), key=lambda kv: -kv[1])[:2])
        lines.append(f"| {100 * ins.samples / total:.1f} % | `{ins.source[:60]}` | `{prev[:50]}` | {reasons} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    print("\n".join(report(read(args.csv), args.top)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
