"""Autotuned against default configs, interleaved in one process: what tuning buys at the bench's
shapes.

    PYTHONPATH=. python bench/tuned_vs_default.py [--cases rf2/d2conv3d det64/deform_conv2d]
                                                  [--dtype bfloat16] [--rounds 7]

A case is a shape and op of the kernel bench (test_kernel_speed.py: rf3, rf2, rf2_in512, early
with d2conv3d, d2conv3d_triton or deform_conv3d) or of the 2D bench (test_2d_speed.py: det64,
det128, res56 with deform_conv2d or d2conv2d), timed forward and forward+backward. Per case and
pass: one call with autotuning on tunes what it has not seen (or reads the cache file; the
seconds are reported), then ``--rounds`` rounds each time the pass with the default configs
(``settings.override(autotune=False)``) and with the tuned ones (``triton.testing.do_bench``
median), the order alternating from round to round, so that both see the same clocks and the
same neighbours; the row is the median over rounds of each, their ratio and the picks. Between
processes one config's time moves by more than configs differ (docs/design.md#autotuning); within
a round it does not. Before timing, the tuned output is compared with the default's.

Prints a table and writes <GPU>-tuned-vs-default.json among the bench's records (records.py).
"""
import argparse
import statistics
import time

import torch

from kernels import settings, tuning
from records import gpu_name, merge
import test_2d_speed
import test_kernel_speed

SHAPES_2D, SHAPES_3D = test_2d_speed.SHAPES, test_kernel_speed.SHAPES
OPS_2D = ("deform_conv2d", "d2conv2d")
OPS_3D = ("d2conv3d", "d2conv3d_triton", "deform_conv3d")
DEFAULT_CASES = ["rf3/d2conv3d", "rf2/d2conv3d", "rf2_in512/d2conv3d", "early/d2conv3d",
                 "rf2/d2conv3d_triton", "det64/deform_conv2d", "det128/deform_conv2d",
                 "res56/deform_conv2d"]


def make(case, dtype):
    """(fn, inputs) of a case "shape/op"."""
    shape, op = case.split("/")
    if shape in SHAPES_2D and op in OPS_2D:
        return test_2d_speed.make(SHAPES_2D[shape], dtype, op)
    if shape in SHAPES_3D and op in OPS_3D:
        return test_kernel_speed.make(SHAPES_3D[shape], test_kernel_speed.DTYPES[dtype], op)
    raise SystemExit(f"error: unknown case {case!r}: a shape of {list(SHAPES_3D)} with an op of "
                     f"{list(OPS_3D)}, or one of {list(SHAPES_2D)} with one of {list(OPS_2D)}")


def bench(run):
    import triton

    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def compare(case, dtype, pass_, rounds):
    """One row: the case's pass timed with default and tuned configs, interleaved."""
    torch.manual_seed(0)
    fn, inputs = make(case, dtype)
    before, start = set(tuning._memory), time.perf_counter()
    run = test_kernel_speed.timed(fn, inputs, pass_)
    run()                                                   # tunes, or reads the cache file
    torch.cuda.synchronize()
    tune_s = time.perf_counter() - start
    picks = {"|".join(map(str, (kernel, *key))): tuning._to_dict(config)
             for (kernel, key), config in tuning._memory.items() if (kernel, key) not in before}
    with torch.no_grad():
        tuned_out = fn(*inputs).float()
        with settings.override(autotune=False):
            default_out = fn(*inputs).float()
    rel = ((tuned_out - default_out).norm() / default_out.norm()).item()
    times = {"default": [], "tuned": []}
    for r in range(rounds):
        for mode in (("default", "tuned") if r % 2 == 0 else ("tuned", "default")):
            with settings.override(autotune=mode == "tuned"):
                times[mode].append(bench(run))
    default, tuned = (statistics.median(times[m]) for m in ("default", "tuned"))
    shape, op = case.split("/")
    return dict(shape=shape, op=op, dtype=dtype, **{"pass": pass_}, default_ms=default,
                tuned_ms=tuned, tuned_over_default=tuned / default, rounds=rounds,
                spread_ms={m: [min(t), max(t)] for m, t in times.items()},
                first_call_s=tune_s, picks=picks, rel_diff_to_default=rel)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, metavar="SHAPE/OP")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"],
                        choices=["fwd", "fwdbwd"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: tuned_vs_default.py times kernels on a GPU; none is visible")
    for case in args.cases:
        if case.count("/") != 1:
            raise SystemExit(f"error: --cases takes SHAPE/OP, got {case!r}")
    import triton

    print(f"{gpu_name()}, torch {torch.__version__}, Triton {triton.__version__}, {args.dtype}, "
          f"cache {tuning.cache_file()}")
    print(f"{'case':<24} {'pass':<7} {'default ms':>10} {'tuned ms':>9} {'ratio':>6} "
          f"{'first call s':>12} {'rel diff':>9}")
    for case in args.cases:
        for pass_ in args.passes:
            row = compare(case, args.dtype, pass_, args.rounds)
            print(f"{case:<24} {pass_:<7} {row['default_ms']:>10.3f} {row['tuned_ms']:>9.3f} "
                  f"{row['tuned_over_default']:>6.3f} {row['first_call_s']:>12.1f} "
                  f"{row['rel_diff_to_default']:>9.1e}", flush=True)
            if not args.no_record:
                merge(f"{gpu_name()}-tuned-vs-default.json",
                      dict(gpu=gpu_name(), **row, torch=torch.__version__,
                           triton=triton.__version__, date=time.strftime("%Y-%m-%d")),
                      key=("shape", "op", "dtype", "pass"))


if __name__ == "__main__":
    main()
