"""Where the time goes: each kernel alone at one shape of bench/test_kernels.py (default rf2;
bf16, xyz, mask), per config, and with parts of its work removed. One device call; prints a
table (bench/NOTES.md quotes it).

    PYTHONPATH=. python bench/ablate.py [--shape rf2] [--only FWD,BWD_DATA[,BWD_INPUT]]

Ablations are built by copying ``kernels/`` to a temporary package with one piece of source
replaced (all but tma-weights give wrong results on purpose: only their time means something):
  one-corner   the gather reads corner (0,0,0) only, unblended (the cost of the 8-corner blend)
  no-gather    the A tile is the mask broadcast over channels, no input loads (index math + dot)
  no-dot       forward: the tl.dot replaced by a row sum (gather alone)
  store        the input gradient's atomics replaced by plain stores (racy; write traffic only)
  tma-weights  the forward's weight tiles loaded by TMA (a tensor descriptor) rather than through
               pointers; the same result (checked), e.g. with
               --only FWD --ablations tma-weights --extra-only --configs "FWD:...,num_stages=2"
"""
import argparse
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from test_kernels import SHAPES     # bench/ is this script's directory

REPO = Path(__file__).resolve().parents[1]

_GATHER_ONE = '''    value = tl.load(x_ptr + row0[:, None] + ch[None, :],
                    mask=(okz0 & oky0 & okx0)[:, None] & ch_ok[None, :], other=0.0)
    return value.to(tl.float32) * scale[:, None]
'''
_GATHER_NONE = '''    return tl.zeros((row0.shape[0], ch.shape[0]), tl.float32) + scale[:, None]
'''


def _replace_body(source, name, body):
    """Replace the body of ``def name`` (after its docstring) with ``body``."""
    start = source.index(f"def {name}(")
    doc_end = source.index('"""', source.index('"""', start) + 3) + 3
    end = source.index("\n\n\n", doc_end)
    return source[:doc_end] + "\n" + body.rstrip("\n") + source[end:]


def _tma_weights(source):
    """The forward's weight tiles through a TMA tensor descriptor instead of pointer loads: the
    (groups, K, Cg, Cog) weight as a (K * C, Cog) matrix, or for TF32 products the (groups, K,
    Cog, Cg) one as (K * Co, Cg), its tile transposed in shared memory. A tile that runs past its
    segment reads the next segment's or kernel point's weights, which meet the gather's zeros or
    land in output channels that are not stored."""
    load = """                    if W_C_MAJOR:   # channels contiguous
                        w_off = (c0 + offs_c)[:, None] + offs_o[None, :] * Cg
                    else:
                        w_off = (c0 + offs_c)[:, None] * Cog + offs_o[None, :]
                    w_tile = tl.load(w_ptr + w_kc + w_off, mask=ch_ok[:, None] & o_ok[None, :],
                                     other=0.0)
"""
    assert load in source, "tma-weights: the forward's weight load has changed"
    source = source.replace(load, """\
                    if W_C_MAJOR:
                        w_tile = w_desc.load([w_kc // Cg + (pid_n % n_tiles) * BLOCK_N,
                                              w_kc % Cg + c0]).T
                    else:
                        w_tile = w_desc.load([w_kc // Cog + c0, (pid_n % n_tiles) * BLOCK_N])
""")
    return source.replace("""    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
""", """    if W_C_MAJOR:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K * Co, Cg], strides=[Cg, 1],
                                           block_shape=[BLOCK_N, BLOCK_C])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K * C, Cog], strides=[Cog, 1],
                                           block_shape=[BLOCK_C, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
""", 1)


# variants that compute the same result another way (checked against the full kernels, not wrong
# on purpose like the others)
EXACT = {"tma-weights"}

ABLATIONS = {
    "one-corner": {"sampling.py": lambda s: _replace_body(s, "gather_tile", _GATHER_ONE)},
    "no-gather": {"sampling.py": lambda s: _replace_body(s, "gather_tile", _GATHER_NONE)},
    "no-dot": {
        "forward.py": lambda s: s.replace(
            "acc = tl.dot(a.to(w_tile.dtype), w_tile, acc, input_precision=DOT_PRECISION)",
            "acc += tl.sum(a, axis=1)[:, None] + tl.sum(w_tile.to(tl.float32), axis=0)[None, :]"),
    },
    "tma-weights": {"forward.py": lambda s: _tma_weights(s)},
    "store": {"sampling.py": lambda s: s.replace(
        "tl.atomic_add(ptr, value, mask=ok[:, None] & ch_ok[None, :], sem=\"relaxed\")",
        "tl.store(ptr, value, mask=ok[:, None] & ch_ok[None, :])")},
}


def variant(name, tmp):
    """Import a copy of kernels/ with the ablation's edits as a package named kernels_<name>."""
    if name == "full":
        return importlib.import_module("kernels")
    pkg = f"kernels_{name.replace('-', '_')}"
    dst = Path(tmp) / pkg
    shutil.copytree(REPO / "kernels", dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "__init__.py").write_text("")    # no second registration of the torch.library ops
    for file, edit in ABLATIONS[name].items():
        text = (dst / file).read_text()
        edited = edit(text)
        assert edited != text, f"ablation {name}: nothing replaced in {file}"
        (dst / file).write_text(edited)
    if tmp not in sys.path:
        sys.path.insert(0, tmp)
    return importlib.import_module(pkg)


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
    parser.add_argument("--ablations", default="one-corner,no-gather,no-dot,store")
    parser.add_argument("--configs", default="",
                        help="extra configs to time, 'KERNEL:NAME=INT,...;...'")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float32-tf32"])
    parser.add_argument("--l2", action="store_true", help="also measure L2 bandwidth (GB/s)")
    parser.add_argument("--extra-only", action="store_true",
                        help="time only the --configs, not the candidates of kernels/configs.py")
    args = parser.parse_args()
    os.environ["D2CONV_AUTOTUNE"] = "0"
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

    def runs(kern):
        from importlib import import_module
        checks = import_module(kern.__name__ + ".checks")
        fwd = import_module(kern.__name__ + ".forward")
        bwd = import_module(kern.__name__ + ".backward")
        geo = checks.check_args(x, s, w, None, 1, 1, 1, m, 1, "xyz")
        return {
            "FWD": lambda: fwd.d2conv_fwd(geo, x, s, w, None, m, "xyz"),
            # input + size + mask gradients (atomics, gathers, the column gradient's GEMMs)
            "BWD_DATA": lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", False,
                                               True, True, True, False),
            "BWD_DATA(no input grad)": lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", False,
                                                              False, True, True, False),
            "BWD_DATA(input grad only)": lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", False,
                                                                True, False, False, False),
            # the whole backward: with the sampled columns and the weight GEMMs
            "BWD_DATA(all gradients)": lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", True,
                                                              True, True, True, True),
            "BWD_DATA(weight only)": lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", False,
                                                            False, False, False, True),
            # torch.use_deterministic_algorithms with the scatter: int64 fixed point
            "BWD_DATA(all, deterministic)": lambda: under(
                lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", True, True, True, True, True),
                "scatter", deterministic=True),
            # the input gradient pulled (kernels/input_grad.py, no atomics): alone (its GEMM and
            # the brick kernel; compare "BWD_DATA(input grad only)"), the whole backward, and
            # the whole backward in deterministic mode (whose default it is: no fixed point)
            "BWD_INPUT": lambda: under(
                lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", False, True, False, False,
                                       False), "pull"),
            "BWD_INPUT(all gradients)": lambda: under(
                lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", True, True, True, True, True),
                "pull"),
            "BWD_INPUT(all, deterministic)": lambda: under(
                lambda: bwd.d2conv_bwd(geo, go, x, s, w, m, "xyz", True, True, True, True, True),
                "auto", deterministic=True),
        }

    def under(call, input_grad, deterministic=False):
        """call() with D2CONV_INPUT_GRAD and torch.use_deterministic_algorithms set."""
        os.environ["D2CONV_INPUT_GRAD"] = input_grad
        torch.use_deterministic_algorithms(deterministic)
        try:
            return call()
        finally:
            del os.environ["D2CONV_INPUT_GRAD"]
            torch.use_deterministic_algorithms(False)

    from kernels import configs
    from kernels.forward import dot_precision
    kernels_of = {"FWD": ["FWD"], "BWD_DATA": ["BWD_DATA", "BWD_DATA(no input grad)",
                                               "BWD_DATA(input grad only)",
                                               "BWD_DATA(all gradients)", "BWD_DATA(weight only)",
                                               "BWD_DATA(all, deterministic)"],
                  "BWD_INPUT": ["BWD_INPUT", "BWD_INPUT(all gradients)",
                                "BWD_INPUT(all, deterministic)"]}
    only = [k for k in args.only.split(",") if k]
    extra = {}
    for item in filter(None, args.configs.split(";")):
        kernel, _, text = item.partition(":")
        extra.setdefault(kernel, []).append(text)

    def config_text(cfg):
        return ",".join([f"{k}={v}" for k, v in cfg.kwargs.items()]
                        + [f"num_warps={cfg.num_warps}", f"num_stages={cfg.num_stages}"]
                        + ([f"maxnreg={cfg.maxnreg}"] if cfg.maxnreg else []))

    # 1. every candidate config of each kernel, on the full kernels
    full = runs(variant("full", None))
    best = {}
    for kernel in only:
        cls = configs.precision_class({"x_ptr": x, "DOT_PRECISION": dot_precision(dt)})
        texts = ([] if args.extra_only else
                 [config_text(c) for c in configs.CANDIDATES[kernel][cls]])
        texts += extra.get(kernel, [])
        for text in texts:
            os.environ[f"D2CONV_CONFIG_{kernel}"] = text
            try:
                ms = bench(full[kernel])
            except Exception as error:     # out of resources, say
                print(f"{kernel} {text}: {type(error).__name__}: {str(error)[:120]}", flush=True)
                continue
            rows.append((kernel, "config", text, ms))
            print(rows[-1], flush=True)
            if kernel not in best or ms < best[kernel][1]:
                best[kernel] = (text, ms)
        os.environ[f"D2CONV_CONFIG_{kernel}"] = best[kernel][0]

    # 2. with the best config of each kernel: the parts, and the ablations
    tmp = tempfile.mkdtemp()
    if "tma-weights" in args.ablations:
        # in-kernel TMA descriptors live in global scratch memory that Triton asks for
        triton.set_allocator(lambda size, alignment, stream:
                             torch.empty(size, device="cuda", dtype=torch.int8))
    for name in ["full"] + [a for a in args.ablations.split(",") if a]:
        fns = runs(variant(name, tmp))
        if name in EXACT and "FWD" in only:    # a faster way to the same result: check it
            got, want = fns["FWD"]().float(), full["FWD"]().float()
            print(f"{name}: forward max |difference| / max |output| = "
                  f"{((got - want).abs().max() / want.abs().max()).item():.1e}", flush=True)
        for kernel in only:
            for label in kernels_of[kernel]:
                if name == "store" and label not in ("BWD_DATA", "BWD_DATA(input grad only)"):
                    continue
                if name != "full" and name != "store" and kernel != "FWD":
                    continue            # its gather is gather_dot's (gather_tile only when
                                        # the weight alone is asked for), and it has no dot
                rows.append((label, name, best[kernel][0], bench(fns[label])))
                print(rows[-1], flush=True)

    print(f"\n{args.shape}, {args.dtype}, xyz + mask, median ms ({torch.cuda.get_device_name()})")
    for label, what, text, ms in rows:
        print(f"{label:27} {what:10} {ms:8.3f}  {text}")


if __name__ == "__main__":
    main()
