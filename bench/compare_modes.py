"""d2conv3d (mode xyz) against deform_conv3d (the same sampling as free offsets) piece by piece:
the forward and the backward whole, without the input gradient and with it alone, autotuned or
with pinned data-kernel configs (bench/NOTES.md, session 12, uses it on the TF32 gap).

    PYTHONPATH=. python bench/compare_modes.py rf2 float32-tf32 ["BLOCK_M=64,BLOCK_C=32,..." ...]

No config, or "", means autotuned. Prints a table of medians (ms).
"""
import os
import sys

import torch
import triton

import kernels
from kernels import backward, checks, forward
from test_kernels import SHAPES, make     # bench/ is this script's directory


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main(shape, dtype, data_configs):
    torch.backends.cuda.matmul.allow_tf32 = dtype == "float32-tf32"
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    N, C, Co, T, H, W = SHAPES[shape]
    torch.manual_seed(0)
    _, (x, size, w, _, mask) = make(SHAPES[shape], dt, "d2conv3d")     # the bench's inputs
    go = torch.randn(N, Co, T, H, W, device="cuda", dtype=dt).to(
        memory_format=torch.channels_last_3d)
    rows = []
    for config in data_configs:
        if config:
            os.environ["D2CONV_CONFIG_BWD_DATA"] = config
        else:
            os.environ.pop("D2CONV_CONFIG_BWD_DATA", None)
        for mode, coords in (("xyz", size), ("offset", kernels.offsets_from_size(size, 3))):
            geo = checks.check_args(x, coords, w, None, 1, 1, 1, mask, 1, mode)

            def bwd(need_input, need_others):
                return lambda: backward.d2conv_bwd(geo, go, x, coords, w, mask, mode, False,
                                                   need_input, need_others, need_others,
                                                   need_others)
            parts = {"bwd all": bwd(True, True), "bwd no input": bwd(False, True),
                     "bwd input only": bwd(True, False)}
            if not config:      # the forward has no data-kernel config
                parts = {"fwd": lambda: forward.d2conv_fwd(geo, x, coords, w, None, mask, mode),
                         **parts}
            for name, fn in parts.items():
                rows.append((mode, name, config or "autotuned", bench(fn)))
    print(f"{shape} {dtype} ({torch.cuda.get_device_name()}), median ms")
    for mode, name, config, ms in rows:
        print(f"{mode:7} {name:15} {ms:7.3f}  {config}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:] or [""])
