"""Hardware counters of each kernel of one forward+backward, d2conv3d against dense cuDNN
(Nsight Compute): achieved TFLOP/s, L2 and DRAM bytes, tensor-pipe and issue-slot use, stalls.

    PYTHONPATH=. python bench/ncu_profile.py [--shape rf2] [--dtype bfloat16] [--ops dense,d2conv3d]
                                            [--out FILE.csv]

Runs itself under `ncu` (clocks not locked, so times are the card's own): a warm-up that
compiles, then one forward+backward of each op inside cudaProfilerStart/Stop. Kernel configs are
the first candidates of kernels/configs.py (autotuning off), the autotuner's pick at rf2.
Prints one row per kernel longer than 20 us; TFLOP/s are the convolution's 2·M·C·Co·27 over
the time of d2conv3d's forward and of each of cuDNN's three kernels (d2conv3d's backward is
its data kernel between cuBLAS GEMMs, a pair per few kernel points: those rows are chunks).
"""
import argparse
import csv
import io
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))     # for test_kernel_speed

WANTED = [  # (column, metric); metrics this ncu does not know are left out with a notice
    ("ms", "gpu__time_duration.sum"),
    ("regs", "launch__registers_per_thread"),
    ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("issue busy %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("tensor pipe %", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"),
    ("tensor pipe %", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("tensor pipe %", "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    ("L1 %", "l1tex__throughput.avg.pct_of_peak_sustained_active"),
    ("L2 %", "lts__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("L2 GB", "lts__t_bytes.sum"),
    ("L2 hit %", "lts__t_sector_hit_rate.pct"),
    ("DRAM GB", "dram__bytes.sum"),
    ("Ginst", "smsp__inst_executed.sum"),
    ("stall long sb %", "smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct"),
    ("stall mio %", "smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct"),
    ("stall lg %", "smsp__warp_issue_stalled_lg_throttle_per_warp_active.pct"),
    ("stall barrier %", "smsp__warp_issue_stalled_barrier_per_warp_active.pct"),
    ("stall short sb %", "smsp__warp_issue_stalled_short_scoreboard_per_warp_active.pct"),
    ("stall wait %", "smsp__warp_issue_stalled_wait_per_warp_active.pct"),
    ("stall math %", "smsp__warp_issue_stalled_math_pipe_throttle_per_warp_active.pct"),
    # waiting for instructions to be fetched (code larger than the instruction cache)
    ("stall no inst %", "smsp__warp_issue_stalled_no_instruction_per_warp_active.pct"),
]
SCALE = {"ms": 1e-6, "L2 GB": 1e-9, "DRAM GB": 1e-9, "Ginst": 1e-9}   # ncu base units: ns, bytes


def run_ops(shape, dtype_name, ops):
    """The warm-up, then one profiled forward+backward of each op (bench/test_kernel_speed.py's)."""
    import torch

    from kernels import settings
    from test_kernel_speed import DTYPES, SHAPES, make, timed

    settings.configure(autotune=False)

    tf32 = dtype_name == "float32-tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    runs = [timed(*make(SHAPES[shape], DTYPES[dtype_name], op), "fwdbwd")
            for op in ops]
    for run in runs:
        run()                     # compiles
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for run in runs:
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def known_metrics(ncu):
    out = subprocess.run([ncu, "--query-metrics", "--chip", "gh100"], capture_output=True,
                         text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="rf2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ncu", default=os.environ.get("NCU", "ncu"))
    parser.add_argument("--ops", default="dense,d2conv3d",
                        help="ops of bench/test_kernel_speed.py, in this order")
    parser.add_argument("--out", help="also write ncu's raw CSV here")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return run_ops(args.shape, args.dtype, args.ops.split(","))

    known = known_metrics(args.ncu)
    columns, metrics = [], []
    for column, metric in WANTED:
        if known and not metric.startswith("launch__") and metric.split(".")[0] not in known:
            print(f"(ncu does not know {metric}: left out)")
            continue
        if column in columns:
            continue
        columns.append(column)
        metrics.append(metric)
    cmd = [args.ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv",
           "--print-units", "base", "--metrics", ",".join(metrics), sys.executable,
           os.path.abspath(__file__), "--inner", "--shape", args.shape, "--dtype", args.dtype,
           "--ops", args.ops]
    done = subprocess.run(cmd, capture_output=True, text=True)
    text = done.stdout[done.stdout.find('"ID"'):]
    if done.returncode or not text:
        sys.exit(f"ncu failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)

    kernels = {}            # ID -> (name, {metric: value})
    for row in csv.DictReader(io.StringIO(text)):
        name, values = kernels.setdefault(row["ID"], (row["Kernel Name"], {}))
        try:
            values[row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
        except ValueError:
            pass

    from test_kernel_speed import SHAPES
    N, C, Co, T, H, W = SHAPES[args.shape]
    flops = 2 * N * T * H * W * C * Co * 27
    header = ["kernel"] + columns + ["TFLOP/s"]
    print(f"{args.shape} {args.dtype}, one forward+backward; conv FLOPs per pass "
          f"{flops / 1e9:.0f} G")
    print(" | ".join(header))
    for name, values in kernels.values():
        ms = values.get("gpu__time_duration.sum", 0) * 1e-6
        if ms < 0.02:
            continue
        cells = [name[:40]]
        for column, metric in zip(columns, metrics):
            value = values.get(metric)
            cells.append("" if value is None else f"{value * SCALE.get(column, 1):.3g}")
        is_conv = name.startswith("d2conv_fwd") or any(
            s in name.lower() for s in ("conv", "dgrad", "wgrad", "fprop"))
        cells.append(f"{flops / (ms * 1e-3) / 1e12:.0f}" if is_conv else "")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
