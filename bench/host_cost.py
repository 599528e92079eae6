"""Host time of one D²Conv call with the kernel launches stubbed out: what the CPU spends besides
the GPU's work.

    PYTHONPATH=. python bench/host_cost.py [--device cpu|cuda] [--calls 3000] [--profile]

Argument checks, geometry, the autograd graph, allocations, the config's choice and the torch
ops that lay out the kernels' operands, with every Triton and Gluon launch of the D²Conv ops
(``configs._launch``) a no-op; a launch itself is Triton's cost, apart. ``--tuned``: with
autotuning on, once each pick is remembered (the first call "times" every candidate at 1 ms). Shapes: the 2D det64 (8, 256 ->
256, 64x64, 3x3, padding 1, mask; ``kernels.deform_conv2d``) and the 3D rf3 (2, 256 -> 256,
2x30x54, 3x3x3, padding 1, mask; ``kernels.d2conv3d`` xyz), bf16. ``--device cuda`` runs them on
the GPU, whose torch ops only queue their kernels. ``--device cpu`` (the default without a GPU)
runs CPU tensors through the path CUDA tensors take, at one sample, 16 channels and a 1-voxel
(1-pixel) input, where the torch ops' arithmetic is negligible (the backward's column gradient is
one chunk, as at rf3; det64 makes two): the Python and dispatch cost alone. Prints the median
µs of a forward and of a forward+backward over ``--calls`` calls (after as many warm-up calls),
and with ``--profile`` the functions that take the most of it; writes <GPU or
CPU>-host-cost.json among the bench's records (records.py), with the CPU's model and the commit
measured.
"""
import argparse
import cProfile
import platform
import pstats
import time

import torch

import kernels
from kernels import configs, settings, tuning

SHAPES = {  # name: (op, N, C, Co, spatial size)
    "det64": ("deform_conv2d", 8, 256, 256, (64, 64)),
    "rf3": ("d2conv3d", 2, 256, 256, (2, 30, 54)),
}


def inputs(shape, device):
    """(function, leaves): one call of the shape's op on fresh bf16 tensors of ``device``."""
    op, N, C, Co, size = SHAPES[shape]
    if device == "cpu":
        N, C, Co, size = 1, 16, 16, (1,) * len(size)
    k = (3,) * len(size)
    K = 3 ** len(size)
    make = lambda *s: torch.rand(*s, device=device, dtype=torch.bfloat16)  # noqa: E731
    x, w, b = make(N, C, *size), make(Co, C, *k), make(Co)
    mask = make(N, K, *size)
    if op == "deform_conv2d":
        coords = make(N, 2 * K, *size)
        return (lambda x, c, w, b, m: kernels.deform_conv2d(x, c, w, b, padding=1, mask=m),
                [x, coords, w, b, mask])
    coords = make(N, 3, *size) + 0.5
    return (lambda x, c, w, b, m: kernels.d2conv3d(x, c, w, b, padding=1, mask=m, mode="xyz"),
            [x, coords, w, b, mask])


def one_call(fn, leaves, pass_):
    """A zero-argument callable running one forward, or one forward+backward."""
    if pass_ == "fwd":
        return lambda: fn(*leaves)
    leaves = [t.requires_grad_() for t in leaves]
    grad_out = torch.ones_like(fn(*leaves))
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)


def median_us(call, calls, device):
    """Median host µs of ``call`` over ``calls`` calls, after as many warm-up calls. On a GPU the
    stream is drained before each timed call: with work queued the host would wait for room in
    the launch queue, and time the GPU instead (det64's fwd+bwd read 1.36 ms so on an H100)."""
    for _ in range(calls):
        call()
    times = []
    for _ in range(calls):
        if device == "cuda":
            torch.cuda.synchronize()
        tick = time.perf_counter()
        call()
        times.append(time.perf_counter() - tick)
    return sorted(times)[len(times) // 2] * 1e6


class stubbed_launches:
    """``configs.launch``'s kernel launches no-ops, and CPU tensors on the kernels' path, for a
    while. ``tuned``: autotuning on, every candidate "timed" at 1 ms on its first call (on a CPU
    nothing can be timed), so later calls take the remembered pick, as a tuned process does;
    otherwise each kernel's default config."""

    def __init__(self, tuned):
        self.tuned = tuned

    def __enter__(self):
        self.saved = configs._launch, kernels._use_triton, tuning.bench
        configs._launch = lambda *args, **kwargs: None
        kernels._use_triton = lambda input: True
        tuning.bench = lambda fn: (fn(), 1.0)[1]
        settings.configure(autotune=self.tuned, tune_cache="off")
        return self

    def __exit__(self, *exc):
        configs._launch, kernels._use_triton, tuning.bench = self.saved
        settings.configure(autotune=None, tune_cache=None)
        tuning.forget()


def measure(device, calls, profile, tuned):
    rows = []
    with stubbed_launches(tuned):
        for shape in SHAPES:
            for pass_ in ("fwd", "fwdbwd"):
                call = one_call(*inputs(shape, device), pass_)
                us = median_us(call, calls, device)
                rows.append(dict(shape=shape, op=SHAPES[shape][0], **{"pass": pass_}, host_us=us,
                                 tuned=tuned))
                print(f"{shape:6} {pass_:7} {us:8.1f} µs", flush=True)
                if profile:
                    profiler = cProfile.Profile()
                    profiler.runcall(lambda: [call() for _ in range(200)])
                    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--profile", action="store_true",
                        help="print the functions taking the most host time")
    parser.add_argument("--tuned", action="store_true",
                        help="autotuning on (the picks remembered after the first call); "
                             "default: each kernel's default config")
    parser.add_argument("--no-record", action="store_true", help="print only")
    parser.add_argument("--commit", default="",
                        help="the code measured, as the record names it (default: "
                             "$D2CONV_COMMIT, else git's HEAD)")
    args = parser.parse_args()
    rows = measure(args.device, args.calls, args.profile, args.tuned)
    if args.no_record:
        return
    import triton

    from records import commit as records_commit
    from records import gpu_name, merge

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    name = gpu_name() if args.device == "cuda" else "CPU"
    commit = args.commit or records_commit()
    for row in rows:
        merge(f"{name}-host-cost.json",
              dict(row, device=args.device, cpu=cpu, commit=commit, torch=torch.__version__,
                   triton=triton.__version__, date=time.strftime("%Y-%m-%d")),
              key=("cpu", "device", "commit", "tuned", "shape", "pass"))
    print(f"wrote {name}-host-cost.json")


if __name__ == "__main__":
    main()
