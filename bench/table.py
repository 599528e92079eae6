"""Print the markdown table of a `pytest bench` results file: each op's median ms and its ratio to
dense, and the extra peak memory of a forward+backward; for a 2D file (<gpu>-2d.json,
test_2d_speed.py) the 2D ops against dense bf16 and torchvision.

    python bench/table.py [bench/results/NVIDIA_H200.json]

Without an argument, the H200 file among the bench's records (records.py).
"""
import argparse
import json
import signal
import sys
from pathlib import Path

from d2conv.errors import BadInput, exit_status
from records import RESULTS

ORDER = {"rf3": 0, "rf2": 1, "rf2_in512": 2, "early": 3}
# d2conv3d: the default forward (rows without a "forward" field predate the Gluon forward and
# ran the Triton one); d2conv3d_triton: the Triton forward forced; d2conv3d_smooth: a smooth
# size map (bench/test_kernel_speed.py)
OPS = ["d2conv3d", "d2conv3d_triton", "d2conv3d_smooth", "deform_conv3d", "reference"]
LABELS = {"d2conv3d_triton": "d2conv3d, Triton forward",
          "d2conv3d_smooth": "d2conv3d, smooth sizes"}
ORDER_2D = {"det64": 0, "det128": 1, "res56": 2}
OPS_2D = ("deform_conv2d", "d2conv2d", "deform_conv3d_t1", "torchvision")
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def table(rows):
    by = {(r["shape"], r["dtype"], r["op"], r["pass"]): r for r in rows}
    cases = sorted({(r["shape"], r["dtype"]) for r in rows},
                   key=lambda c: (c[1], ORDER.get(c[0], 9)))
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    lines = ["| shape | dtype | pass | dense ms | "
             + " | ".join(f"{LABELS.get(op, op)} ms (× dense)" for op in ops)
             + " | extra peak MiB (dense / d2conv3d) |",
             "|---|---|---|---|" + "---|" * len(ops) + "---|"]
    for shape, dtype in cases:
        for pass_ in ("fwd", "fwdbwd"):
            dense = by.get((shape, dtype, "dense", pass_))
            if dense is None:
                continue
            cells = []
            for op in ops:
                r = by.get((shape, dtype, op, pass_))
                cells.append("" if r is None else
                             f"{r['median_ms']:.3g} ({r['median_ms'] / dense['median_ms']:.1f}×)")
            peak = ""
            d2 = by.get((shape, dtype, "d2conv3d", pass_))
            if pass_ == "fwdbwd" and d2 is not None:
                peak = f"{dense['peak_extra_mib']:.0f} / {d2['peak_extra_mib']:.0f}"
            tuned = "" if all(by.get((shape, dtype, op, pass_), {}).get("autotuned", True)
                              for op in ("d2conv3d", "deform_conv3d")) else " (not autotuned)"
            lines.append(f"| {shape} | {dtype}{tuned} | {pass_} | {dense['median_ms']:.3g} | "
                         + " | ".join(cells) + f" | {peak} |")
    return "\n".join(lines)


def is_2d(rows, name=""):
    """Whether rows come from test_2d_speed.py: by the file's name or the rows' ops."""
    return name.endswith("-2d.json") or any(r.get("op") in OPS_2D for r in rows)


def table_2d(rows):
    """One line per (shape, pass): dense bf16, torchvision fp32 / fp16, deform_conv2d fp32 / bf16,
    d2conv2d bf16 and deform_conv3d_t1 bf16 in ms (the kernels' × dense bf16), and the speed-up
    of deform_conv2d bf16 over torchvision fp32."""
    ours = [("deform_conv2d", "float32"), ("deform_conv2d", "bfloat16"), ("d2conv2d", "bfloat16"),
            ("deform_conv3d_t1", "bfloat16")]
    lines = ["| shape | pass | dense bf16 ms | torchvision fp32 ms | torchvision fp16 ms | "
             + " | ".join(f"{op} {SHORT[dtype]} ms (× dense)" for op, dtype in ours)
             + " | deform_conv2d bf16 speed-up over torchvision fp32 |",
             "|---|---|---|---|---|" + "---|" * len(ours) + "---|"]
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: (ORDER_2D.get(s, 9), s))
    for shape in shapes:
        for pass_ in ("fwd", "fwdbwd"):
            case = {(r["op"], r["dtype"]): r for r in rows
                    if (r["shape"], r["pass"]) == (shape, pass_)}
            if not case:
                continue
            ms = {k: r["median_ms"] for k, r in case.items()}
            dense = ms.get(("dense", "bfloat16"))
            cells = [ms.get(k) for k in [("dense", "bfloat16"), ("torchvision", "float32"),
                                         ("torchvision", "float16")]]
            cells = ["" if v is None else f"{v:.3g}" for v in cells]
            for k in ours:
                v = ms.get(k)
                untuned = "" if v is None or case[k].get("autotuned", True) else " d"
                cells.append("" if v is None else f"{v:.3g}{untuned}" if dense is None else
                             f"{v:.3g} ({v / dense:.1f}×){untuned}")
            tv, dc = ms.get(("torchvision", "float32")), ms.get(("deform_conv2d", "bfloat16"))
            cells.append("" if tv is None or dc is None else f"{tv / dc:.1f}×")
            lines.append(f"| {shape} | {pass_} | " + " | ".join(cells) + " |")
    if any(not r.get("autotuned", True) for r in rows if (r["op"], r["dtype"]) in ours):
        lines += ["", "d: the kernels' default configs, not autotuned"]
    return "\n".join(lines)


def main(argv):
    parser = argparse.ArgumentParser(description="Print the markdown table of a results file.")
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS / "NVIDIA_H200.json",
                        help="a results file (default: bench/results/NVIDIA_H200.json)")
    path = parser.parse_args(argv).results
    if hasattr(signal, "SIGPIPE"):      # quiet when piped into head
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BadInput(f"cannot read {path}: {error}") from None
    print(table_2d(rows) if is_2d(rows, path.name) else table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, sys.argv[1:]))
