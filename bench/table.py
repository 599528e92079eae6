"""Print the markdown table of a `pytest bench` results file: each op's median ms and its ratio to
dense, and the extra peak memory of a forward+backward.

    python bench/table.py [bench/results/NVIDIA_H200.json]

Without an argument, the H200 file among the bench's records (records.py).
"""
import json
import sys
from pathlib import Path

from records import RESULTS

ORDER = {"rf3": 0, "rf2": 1, "rf2_in512": 2, "early": 3}
OPS = ["d2conv3d", "deform_conv3d", "reference"]


def table(rows):
    by = {(r["shape"], r["dtype"], r["op"], r["pass"]): r for r in rows}
    cases = sorted({(r["shape"], r["dtype"]) for r in rows},
                   key=lambda c: (c[1], ORDER.get(c[0], 9)))
    lines = ["| shape | dtype | pass | dense ms | " + " | ".join(f"{op} ms (× dense)" for op in OPS)
             + " | extra peak MiB (dense / d2conv3d) |",
             "|---|---|---|---|" + "---|" * len(OPS) + "---|"]
    for shape, dtype in cases:
        for pass_ in ("fwd", "fwdbwd"):
            dense = by.get((shape, dtype, "dense", pass_))
            if dense is None:
                continue
            cells = []
            for op in OPS:
                r = by.get((shape, dtype, op, pass_))
                cells.append("" if r is None else
                             f"{r['median_ms']:.3g} ({r['median_ms'] / dense['median_ms']:.1f}×)")
            peak = ""
            d2 = by.get((shape, dtype, "d2conv3d", pass_))
            if pass_ == "fwdbwd" and d2 is not None:
                peak = f"{dense['peak_extra_mib']:.0f} / {d2['peak_extra_mib']:.0f}"
            tuned = "" if all(by.get((shape, dtype, op, pass_), {}).get("autotuned", True)
                              for op in ("d2conv3d", "deform_conv3d")) else " (default configs)"
            lines.append(f"| {shape} | {dtype}{tuned} | {pass_} | {dense['median_ms']:.3g} | "
                         + " | ".join(cells) + f" | {peak} |")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "NVIDIA_H200.json"
    print(table(json.loads(path.read_text())))
