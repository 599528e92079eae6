"""Compile the kernels for a GPU target without a GPU (Triton's bundled compiler) and print each
config's registers, spills and shared memory: a quick check of a kernel edit on a CPU machine
before it runs on a GPU. Arguments are specialised as a launch specialises them
(alignment and divisibility by 16, integers equal to 1 as constants): without that, loads
compile scalar.

    python bench/compile_check.py [--shape rf2] [--dtype bfloat16 float32-tf32 ...] [--first]
                                  [--kernel FWD BWD_DATA FWD_HOPPER]

FWD_HOPPER, the Gluon forward (kernels/hopper.py, 16-bit dtypes only), is compiled from Gluon's
source; its lines give its wgmma and TMA instructions in place of atomics.

tests/test_compile.py runs it on a tiny shape in CI, where the kernels otherwise only run under
the interpreter, which does not compile them.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

from kernels import backward, configs, forward, settings
from kernels.checks import check_args

from test_kernel_speed import SHAPES as BENCH_SHAPES     # bench/ is this script's directory

# name: (N, C_in, C_out, T, H, W); "tiny" has 16 channels, enough for 16-byte channel vectors
SHAPES = {**BENCH_SHAPES, "tiny": (1, 16, 16, 2, 4, 5)}
TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32",
         torch.int64: "*i64"}


def captured_launches(shape, dtype, mode="xyz", deterministic=False, pull=False, gluon=False):
    """(kernel name, jit function, args, pre_hook) of each launch of a forward and backward,
    captured; ``deterministic``: the backward of torch.use_deterministic_algorithms on a GPU;
    ``pull``: with the pulled input gradient (settings input_grad "pull", kernels/input_grad.py);
    ``gluon``: with the Gluon forward's launch too (FWD_HOPPER, 16-bit dtypes; the forward takes
    it on an sm_90 GPU only). Raises ImportError where this Triton cannot build the Gluon
    forward."""
    N, C, Co, T, H, W = shape
    x = torch.zeros(N, C, T, H, W, dtype=dtype)
    coords = torch.ones(N, 3, T, H, W, dtype=dtype)
    weight = torch.zeros(Co, C, 3, 3, 3, dtype=dtype)
    mask = torch.ones(N, 27, T, H, W, dtype=dtype)
    geo = check_args(x, coords, weight, None, 1, 1, 1, mask, 1, mode)
    seen = []

    def launch(kernel_fn, name, grid, args, config=None, pre_hook=None):
        if name not in [n for n, _, _, _ in seen]:      # the data kernel's later launches alike
            seen.append((name, kernel_fn, dict(args), pre_hook))

    gluon = gluon and dtype in (torch.bfloat16, torch.float16)
    if gluon:
        from kernels import hopper

    real, real_deterministic = configs.launch, backward.deterministic
    configs.launch = launch
    backward.deterministic = lambda device: deterministic
    try:
        with settings.override(input_grad="pull" if pull else "scatter", forward="triton",
                               autotune=False):
            forward.d2conv_fwd(geo, x, coords, weight, None, mask, mode)
            if gluon:
                hopper.d2conv_fwd_hopper(geo, x, coords, weight, None, mask, mode)
            go = torch.zeros(N, Co, *geo.out, dtype=dtype)
            backward.d2conv_bwd(geo, go, x, coords, weight, mask, mode, need_input=True,
                                need_coords=True, need_weight=True, need_bias=False,
                                need_mask=True)
    finally:
        configs.launch, backward.deterministic = real, real_deterministic
    return seen


def _gluon_source(fn):
    """Gluon's ASTSource class where ``fn`` is a Gluon kernel, else None."""
    try:
        from triton.experimental.gluon import _runtime
    except ImportError:
        return None
    return _runtime.GluonASTSource if isinstance(fn, _runtime.GluonJITFunction) else None


def compile_one(kernel, args, config, arch, pre_hook=None):
    """``kernel`` compiled for sm_``arch`` with ``config``; ``pre_hook`` runs on the arguments
    with the config's first, as a launch runs it (the Gluon forward's sets its weight
    descriptor's block)."""
    values = {**args, **config.kwargs}
    if pre_hook is not None:
        pre_hook(values)
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):        # through triton.heuristics
        for name, rule in getattr(fn, "values", {}).items():
            values[name] = rule(values)
        fn = fn.fn
    unknown = set(args) - {p.name for p in fn.params}
    if unknown:     # a real launch refuses them (the interpreter does not)
        raise TypeError(f"{fn.__name__}: arguments it does not take: {sorted(unknown)}")
    source = _gluon_source(fn) or ASTSource
    for name in ("num_warps", "num_stages"):     # launch options a kernel declares as constexprs
        values.setdefault(name, getattr(config, name))
    # specialised as a launch would: integers equal to 1 become constants, pointers (torch's
    # allocations) and integers divisible by 16 are marked so (what lets loads vectorise), but
    # for the kernel's do_not_specialize arguments
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        plain = getattr(p, "do_not_specialize", False)
        if p.is_constexpr or (type(v) is int and v == 1 and not plain):
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif not isinstance(v, int):                # a TMA descriptor
            signature[p.name] = mangle_type(v)
        else:
            signature[p.name] = "i32" if abs(int(v)) < 2**31 else "i64"
            if int(v) % 16 == 0 and not plain:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = source(fn, signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled):
    """(registers, stack + local bytes a thread: spills land there) from cuobjdump -res-usage on
    the cubin (loading it, for n_regs, needs a GPU)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    return ((int(found.group(1)), int(found.group(2)) + int(found.group(3))) if found
            else (-1, -1))


def vector_ops(compiled):
    """(vector global loads, vector atomic adds) in the PTX: channel rows (gathers, weights,
    grad_out, the input gradient's atomics) load and add several channels per instruction when
    Triton can prove them aligned (16 bytes at the paper's 256 channels; less on small tiles)."""
    ptx = compiled.asm["ptx"]
    copies = re.findall(r"cp\.async\.\w+\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
    return (len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]\.", ptx))
            + sum(int(size, 0) >= 8 for size in copies),      # pipelined loads: async copies
            len(re.findall(r"(?:red|atom)\.global(?:\.\w+)*\.v[248]\.", ptx)))


def hopper_ops(compiled):
    """What the Gluon forward's PTX issues: (wgmma products, whether a wait leaves one product in
    flight (``wgmma.wait_group 1``: the next tile is gathered meanwhile), TMA loads,
    setmaxnreg instructions, whether its TTGIR is warp-specialized)."""
    ptx = compiled.asm["ptx"]
    return (len(re.findall(r"wgmma\.mma_async", ptx)),
            bool(re.search(r"wgmma\.wait_group\.sync\.aligned 1;", ptx)),
            len(re.findall(r"cp\.async\.bulk\.tensor\.\w+\.shared::\w+\.global", ptx)),
            len(re.findall(r"setmaxnreg\.", ptx)),
            "ttg.warp_specialize" in compiled.asm.get("ttgir", ""))


def stores_in_place(compiled):
    """Whether every tile store goes through the very pointer tile, in the very layout, of a load
    (meant for the data kernel, whose only tile stores write its columns over the column
    gradient it has just read): then each thread stores the elements it loaded itself (in
    another layout a warp could overwrite elements that another warp has yet to load). False
    when it stores no tile."""
    ttgir = compiled.asm["ttgir"]
    tile = r"(%[\w.]+)[^:\n]* : (tensor<\d+x\d+x[^>]*>, #[\w.]+)"    # pointer, type and layout
    loaded = set(re.findall(r"= tt\.load " + tile, ttgir))
    stored = set(re.findall(r"tt\.store " + tile, ttgir))
    return bool(stored) and stored <= loaded


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="rf2", choices=SHAPES)
    p.add_argument("--dtype", nargs="+", default=["bfloat16"],
                   choices=["bfloat16", "float16", "float32", "float32-tf32"],
                   help="float32: strict (TF32 off), float32-tf32: TF32 allowed")
    p.add_argument("--first", action="store_true",
                   help="only each kernel's default config (the first of its class)")
    p.add_argument("--kernel", nargs="+", choices=list(configs.CANDIDATES),
                   help="which kernels to compile (default: all; FWD_HOPPER for 16-bit dtypes "
                        "only)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--deterministic", action="store_true",
                   help="the backward of torch.use_deterministic_algorithms (fixed-point input "
                        "gradient)")
    p.add_argument("--pull", action="store_true",
                   help="the backward with the pulled input gradient (BWD_INPUT, no atomics)")
    a = p.parse_args()
    explicit = a.kernel is not None
    a.kernel = a.kernel or list(configs.CANDIDATES)
    if settings.interpreting():
        sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    for name_of_dtype in a.dtype:
        torch.backends.cuda.matmul.allow_tf32 = name_of_dtype == "float32-tf32"
        dtype = getattr(torch, name_of_dtype.split("-")[0])
        try:
            launches = captured_launches(SHAPES[a.shape], dtype, deterministic=a.deterministic,
                                         pull=a.pull, gluon="FWD_HOPPER" in a.kernel)
        except (ImportError, AttributeError) as error:     # no Gluon Hopper API
            if explicit:
                sys.exit(f"compile_check: FWD_HOPPER: cannot import kernels.hopper ({error})")
            print(f"compile_check: FWD_HOPPER left out: cannot import kernels.hopper ({error})",
                  file=sys.stderr)
            launches = captured_launches(SHAPES[a.shape], dtype, deterministic=a.deterministic,
                                         pull=a.pull)
        for name, kernel, args, pre_hook in launches:
            if name not in a.kernel:
                continue
            candidates = configs.CANDIDATES[name][configs.precision_class(args)]
            for config in candidates[:1] if a.first else candidates:
                config = configs._fit(config, args)
                compiled = compile_one(kernel, args, config, a.arch, pre_hook)
                regs, local = resources(compiled)
                loads, atomics = vector_ops(compiled)
                line = (f"{name_of_dtype:12} {name:10} {args['DOT_PRECISION']:6} "
                        f"{str(config.kwargs):50} w{config.num_warps} s{config.num_stages}"
                        f"{f' maxnreg={config.maxnreg}' if config.maxnreg else ''}: "
                        f"{regs} regs, {local} B stack/local (spills), "
                        f"{compiled.metadata.shared} B shared, {loads} vector loads, ")
                if name == "FWD_HOPPER":
                    products, in_flight, tma_loads, maxnreg, specialized = hopper_ops(compiled)
                    line += (f"{products} wgmma, "
                             f"wait_group 1 {'present' if in_flight else 'ABSENT'}, "
                             f"{tma_loads} TMA loads, {maxnreg} setmaxnreg, "
                             f"{'' if specialized else 'not '}warp-specialized")
                else:
                    line += (f"{atomics} vector atomics"
                             + ("" if name != "BWD_DATA" else ", tile stores in place"
                                if stores_in_place(compiled) else ", tile stores NOT IN PLACE"))
                print(line, flush=True)


if __name__ == "__main__":
    main()
