"""Where the time goes: each kernel alone at one shape of bench/test_kernel_speed.py (default
rf2; bf16, mode xyz, with a mask), per candidate config, and split by the gradients each launch
computes. Prints a table.

    PYTHONPATH=. python bench/ablate.py [--shape rf2] [--only FWD,BWD_DATA[,BWD_INPUT]]
        [--dtype bfloat16] [--configs "KERNEL:NAME=INT,...;..."] [--extra-only] [--l2]

Everything is steered through the library's own switches, no edited kernel source:
  1. each candidate config of kernels/configs.py (and --configs), pinned with
     ``kernels.settings.override(config_<kernel>=...)``;
  2. with the fastest config of each kernel: the backward asked for one set of gradients at a
     time (the data kernel's NEED_* flags follow ``d2conv_bwd``'s need_* arguments), the input
     gradient scattered, pulled (``settings`` input_grad) and in deterministic mode (int64 fixed
     point, or the pull);
  3. with --l2: the L2 cache's read, store and atomic-add bandwidth (GB/s).
"""
import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import configs, settings
from kernels.backward import d2conv_bwd
from kernels.checks import check_args
from kernels.forward import d2conv_fwd
from kernels.launch import dot_precision
from test_kernel_speed import SHAPES     # bench/ is this script's directory


@triton.jit
def _l2_traffic(buf_ptr, out_ptr, ROWS, REPEAT, MODE: tl.constexpr, BLOCK: tl.constexpr,
                WIDTH: tl.constexpr):
    """Each program walks REPEAT times over its slice of an L2-resident buffer (ROWS x WIDTH fp32)
    reading it (MODE 0), storing to it (1) or adding to it atomically (2)."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK)
    offs_w = tl.arange(0, WIDTH)
    acc = tl.zeros((BLOCK, WIDTH), tl.float32)
    for it in range(REPEAT):
        rows = (pid * 7919 + it * BLOCK + offs_r) % ROWS
        ptr = buf_ptr + rows[:, None].to(tl.int64) * WIDTH + offs_w[None, :]
        if MODE == 0:
            acc += tl.load(ptr)
        elif MODE == 1:
            tl.store(ptr, acc + it)
        else:
            tl.atomic_add(ptr, acc + 1.0, sem="relaxed")
    tl.store(out_ptr + pid, tl.sum(acc))


def l2_bandwidth(mib=16, width=64, block=64, repeat=256):
    """Achieved GB/s reading, storing and atomically adding fp32 rows of ``width`` (channels) in a
    buffer of ``mib`` MiB (inside the 50 MB L2), 4 programs per SM."""
    rows = mib * 2**20 // (4 * width)
    buf = torch.zeros(rows, width, device="cuda")
    programs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(programs, device="cuda")
    result = {}
    for mode, name in enumerate(("read", "store", "atomic add")):
        ms = bench(lambda: _l2_traffic[(programs,)](buf, out, rows, repeat, MODE=mode,
                                                     BLOCK=block, WIDTH=width, num_warps=8))
        result[name] = programs * repeat * block * width * 4 / ms / 1e6
    return result


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="rf2", choices=sorted(SHAPES))
    parser.add_argument("--only", default="FWD,BWD_DATA")
    parser.add_argument("--configs", default="",
                        help="extra configs to time, 'KERNEL:NAME=INT,...;...'")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float32-tf32"])
    parser.add_argument("--l2", action="store_true", help="also measure L2 bandwidth (GB/s)")
    parser.add_argument("--extra-only", action="store_true",
                        help="time only the --configs, not the candidates of kernels/configs.py")
    args = parser.parse_args()
    settings.configure(autotune=False)
    torch.manual_seed(0)
    N, C, Co, T, H, W = SHAPES[args.shape]
    dev, dt = "cuda", torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = \
        args.dtype == "float32-tf32"
    x = torch.randn(N, C, T, H, W, device=dev, dtype=dt).to(memory_format=torch.channels_last_3d)
    w = (torch.randn(Co, C, 3, 3, 3, device=dev) * 0.02).to(dt)
    s = (torch.rand(N, 3, T, H, W, device=dev) * 2.5 + 0.5).to(dt)
    m = torch.rand(N, 27, T, H, W, device=dev, dtype=dt)
    go = torch.randn(N, Co, T, H, W, device=dev, dtype=dt).to(memory_format=torch.channels_last_3d)
    wd = w.to(memory_format=torch.channels_last_3d)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, args.shape,
          args.dtype, flush=True)
    dense_f = bench(lambda: F.conv3d(x, wd, None, padding=1))
    xg, wg = x.detach().requires_grad_(), wd.detach().requires_grad_()
    dense_fb = bench(lambda: torch.autograd.grad(F.conv3d(xg, wg, None, padding=1), [xg, wg], go))
    rows = [("dense cuDNN", "fwd", "", dense_f), ("dense cuDNN", "fwd+bwd", "", dense_fb)]
    if args.l2:
        for name, gbs in l2_bandwidth().items():
            print(f"L2 {name}: {gbs:.0f} GB/s (fp32 rows of 64 channels)", flush=True)

    geo = check_args(x, s, w, None, 1, 1, 1, m, 1, "xyz")

    def backward(input=False, coords=False, weight=False, bias=False, mask=False, **setting):
        """The backward asked for some gradients, under kernels.settings values and
        torch.use_deterministic_algorithms(deterministic)."""
        deterministic = setting.pop("deterministic", False)

        def call():
            with settings.override(**setting):
                torch.use_deterministic_algorithms(deterministic)
                try:
                    return d2conv_bwd(geo, go, x, s, w, m, "xyz", need_input=input,
                                      need_coords=coords, need_weight=weight, need_bias=bias,
                                      need_mask=mask)
                finally:
                    torch.use_deterministic_algorithms(False)
        return call

    everything = dict(input=True, coords=True, weight=True, bias=True, mask=True)
    # the launches each kernel takes part in; the first is the one its configs are timed with
    parts = {
        "FWD": {"FWD": lambda: d2conv_fwd(geo, x, s, w, None, m, "xyz")},
        "BWD_DATA": {
            # input + size + mask gradients: the scatter's atomics, gathers, column-gradient GEMMs
            "BWD_DATA": backward(input=True, coords=True, mask=True, input_grad="scatter"),
            "BWD_DATA(no input grad)": backward(coords=True, mask=True),
            "BWD_DATA(input grad only)": backward(input=True, input_grad="scatter"),
            # the whole backward: with the sampled columns and the weight GEMMs
            "BWD_DATA(all gradients)": backward(**everything, input_grad="scatter"),
            "BWD_DATA(weight only)": backward(weight=True),
            # deterministic mode with the scatter: int64 fixed point
            "BWD_DATA(all, deterministic)": backward(**everything, input_grad="scatter",
                                                     deterministic=True)},
        "BWD_INPUT": {
            # the input gradient pulled (kernels/input_grad.py, no atomics): alone (its GEMM and
            # the brick kernel; compare "BWD_DATA(input grad only)"), the whole backward, and the
            # whole backward in deterministic mode (whose default it is: no fixed point)
            "BWD_INPUT": backward(input=True, input_grad="pull"),
            "BWD_INPUT(all gradients)": backward(**everything, input_grad="pull"),
            "BWD_INPUT(all, deterministic)": backward(**everything, input_grad="auto",
                                                      deterministic=True)},
    }
    only = [k for k in args.only.split(",") if k]
    extra = {}
    for item in filter(None, args.configs.split(";")):
        kernel, _, text = item.partition(":")
        extra.setdefault(kernel, []).append(text)

    def config_text(cfg):
        return ",".join([f"{k}={v}" for k, v in cfg.kwargs.items()]
                        + [f"num_warps={cfg.num_warps}", f"num_stages={cfg.num_stages}"]
                        + ([f"maxnreg={cfg.maxnreg}"] if cfg.maxnreg else []))

    # 1. every candidate config of each kernel
    best = {}
    cls = configs.precision_class({"x_ptr": x, "DOT_PRECISION": dot_precision(dt)})
    for kernel in only:
        texts = ([] if args.extra_only else
                 [config_text(c) for c in configs.CANDIDATES[kernel][cls]])
        texts += extra.get(kernel, [])
        first = next(iter(parts[kernel].values()))
        for text in texts:
            try:
                with settings.override(**{"config_" + kernel.lower(): text}):
                    ms = bench(first)
            except Exception as error:     # out of resources, say
                print(f"{kernel} {text}: {type(error).__name__}: {str(error)[:120]}", flush=True)
                continue
            rows.append((kernel, "config", text, ms))
            print(rows[-1], flush=True)
            if kernel not in best or ms < best[kernel][1]:
                best[kernel] = (text, ms)

    # 2. with the fastest config of each kernel: its launches, split by the gradients asked for
    pinned = {"config_" + kernel.lower(): text for kernel, (text, _) in best.items()}
    with settings.override(**pinned):
        for kernel in only:
            for label, call in parts[kernel].items():
                rows.append((label, "best", best[kernel][0], bench(call)))
                print(rows[-1], flush=True)

    print(f"\n{args.shape}, {args.dtype}, xyz + mask, median ms ({torch.cuda.get_device_name()})")
    for label, what, text, ms in rows:
        print(f"{label:30} {what:7} {ms:8.3f}  {text}")


if __name__ == "__main__":
    main()
