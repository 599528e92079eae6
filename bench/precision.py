"""How accurate each fp32 product is: d2conv3d (xyz, mask, sizes in [0.5, 3]) in fp32 with the
forward's tl.dot in "ieee" (FMA, the default) or "tf32x3" (three TF32 products) and the
backward's GEMMs in cuBLAS fp32, then everything in TF32 (TF32 allowed), and the PyTorch
reference in fp32, against the float64 reference: max |error| / max |reference| of the output
and of every gradient. One device call; prints a table (bench/NOTES.md quotes it).

    PYTHONPATH=. python bench/precision.py [--channels 256] [--size 4,30,54] [--seeds 3]
"""
import argparse
import os

import torch

import kernels
from kernels import naive


def outputs(fn, x, s, w, b, m, go):
    """The output and the gradients of (input, size, weight, bias, mask) of one op."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, s, w, b, m)]
    out = fn(leaves[0], leaves[1], leaves[2], leaves[3], stride=1, padding=1, dilation=1,
             mask=leaves[4], groups=1, mode="xyz")
    grads = torch.autograd.grad(out, leaves, go)
    return [out.detach()] + list(grads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", default="4,30,54", help="T,H,W")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    os.environ["D2CONV_AUTOTUNE"] = "0"
    T, H, W = map(int, args.size.split(","))
    C, dev = args.channels, "cuda" if torch.cuda.is_available() else "cpu"
    names = ["output", "input grad", "size grad", "weight grad", "bias grad", "mask grad"]
    worst = {}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        x = torch.randn(2, C, T, H, W, device=dev, dtype=torch.float64)
        s = torch.rand(2, 3, T, H, W, device=dev, dtype=torch.float64) * 2.5 + 0.5
        w = torch.randn(C, C, 3, 3, 3, device=dev, dtype=torch.float64) / (27 * C) ** 0.5
        b = torch.randn(C, device=dev, dtype=torch.float64)
        m = torch.rand(2, 27, T, H, W, device=dev, dtype=torch.float64)
        go = torch.randn(2, C, T, H, W, device=dev, dtype=torch.float64)
        # the same fp32-representable inputs for every op
        x, s, w, b, m, go = (t.float().double() for t in (x, s, w, b, m, go))
        ref = outputs(naive.d2conv3d, x, s, w, b, m, go)
        f32 = [t.float() for t in (x, s, w, b, m, go)]
        runs = {"reference fp32 (PyTorch, TF32 off)": (naive.d2conv3d, False, "")}
        for precision in ("ieee", "tf32x3"):
            runs[f"d2conv3d fp32, forward dot {precision}"] = (kernels.d2conv3d, False,
                                                              precision)
        runs["d2conv3d fp32, dot tf32 (TF32 allowed)"] = (kernels.d2conv3d, True, "")
        for label, (fn, tf32, strict) in runs.items():
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            os.environ["D2CONV_FP32_DOT"] = strict
            got = outputs(fn, *f32)
            for name, a, r in zip(names, got, ref):
                err = ((a.double() - r).abs().max() / r.abs().max()).item()
                worst[label, name] = max(worst.get((label, name), 0.0), err)
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    print(where, torch.__version__, f"C={C}", f"T,H,W={T},{H},{W}", f"seeds={args.seeds}")
    print("| op | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label in dict.fromkeys(k[0] for k in worst):
        print(f"| {label} | " + " | ".join(f"{worst[label, n]:.1e}" for n in names) + " |")


if __name__ == "__main__":
    main()
