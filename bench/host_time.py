"""Host time against GPU time per call: is a shape bounded by the host? For each op and pass,
three do_bench medians (GPU events), then 200 back-to-back calls timed on the host without
synchronising (host / call) and after one synchronise (wall / call). Where wall / call exceeds
the GPU median, the host is the slower side (bench/NOTES.md, session 7).

    PYTHONPATH=. python bench/host_time.py [--shapes rf3 rf2] [--dtype bfloat16]
"""
import argparse
import time

import torch
import triton

from test_kernels import DTYPES, SHAPES, make, timed     # bench/ is this script's directory


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["rf3", "rf2"], choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--calls", type=int, default=200)
    a = p.parse_args()
    # float32: strict (TF32 off for cuDNN and the kernels), float32-tf32: TF32 allowed
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = \
        a.dtype == "float32-tf32"
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, a.dtype)
    for shape in a.shapes:
        for op in ["dense", "d2conv3d", "deform_conv3d"]:
            for pass_ in ["fwd", "fwdbwd"]:
                torch.manual_seed(0)
                fn, inputs = make(SHAPES[shape], DTYPES[a.dtype], op)
                run = timed(fn, inputs, pass_)
                run()                           # autotune / compile first
                torch.cuda.synchronize()
                gpu = [triton.testing.do_bench(run, warmup=100, rep=500, return_mode="median")
                       for _ in range(3)]
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(a.calls):
                    run()
                host = (time.perf_counter() - start) / a.calls * 1e3
                torch.cuda.synchronize()
                wall = (time.perf_counter() - start) / a.calls * 1e3
                print(f"{shape:9} {op:14} {pass_:7} do_bench {' '.join(f'{m:.3f}' for m in gpu)}"
                      f"  host/call {host:.3f}  wall/call {wall:.3f}", flush=True)


if __name__ == "__main__":
    main()
