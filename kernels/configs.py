"""Autotuning: the candidate configs of each kernel, their pruning, how to pin one, and the
launch (kernels/tuning.py times the candidates and remembers the pick).

Autotune keys are the channel counts, kernel size, stride, dilation, mode, groups and a
power-of-two bucket of the number of output voxels (``M_BUCKET``), never the exact T x H x W,
so a new video size reuses the tuned config of its bucket; ``tune_key`` adds the input's dtype.
The data kernel's key (``DATA_KEY``) also holds which gradients a launch computes; the pull's
(``INPUT_GRAD_KEY``) drops what its kernel does not take.

``kernels.settings`` turns tuning off (each kernel's first candidate of its class is launched)
or pins one config of a kernel. The Triton interpreter cannot tune: it runs ``INTERPRETER``'s
small configs.
"""
import torch
import triton

from . import settings, tuning
from .launch import next_power_of_2

# the launch parameters of a config (the rest of its parameters are the kernel's meta-parameters);
# maxnreg caps the registers per thread (more programs per SM, at the cost of spills)
_LAUNCH = ("num_warps", "num_stages", "maxnreg")

KEY = ["C", "Cog", "Cg", "SEG", "G", "KD", "KH", "KW", "SD", "SH", "SW", "DD", "DH", "DW",
       "IS_OFFSET", "SZ_CH", "SY_CH", "SX_CH", "HAS_MASK", "DOT_PRECISION", "M_BUCKET"]
# the data kernel's best config depends on the gradients asked for (rf2 bf16, H200: the sampled
# columns alone run fastest in 64-voxel tiles, 1.57 ms against 1.85; the whole backward in
# 32-voxel tiles, 3.05 against 3.76): each set is tuned apart
DATA_KEY = KEY + ["NEED_INPUT", "NEED_COORD", "NEED_MASK", "NEED_COLUMN", "FIXED_POINT"]
# the pulled input gradient has no output-channel axis and serves D²Conv modes only
INPUT_GRAD_KEY = [name for name in KEY if name not in ("Cog", "IS_OFFSET")]


def _cfg(num_warps, num_stages, maxnreg=None, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# candidates per precision class, kept short: every config is a 4-20 s compile. Ordered by
# their time at rf2 on an H100 (bench/ablate.py, 2026-11-24; docs/design.md#autotuning), but for
# the last 16-bit one of the forward, the best at the early shape (64 channels; the data
# kernel's first is best there and within 1% of the best at rf2); the first of a class is what
# launches with autotuning off. "16-bit": bf16/fp16 on tensor cores; "tf32": fp32 inputs with TF32
# allowed (tiles twice the bytes: smaller channel blocks); "tf32x3": strict fp32 on the tensor
# cores (three TF32 products, more registers); "ieee": strict fp32, whose tl.dot is FMA code
# without tensor cores (small tiles, or the unrolled product spills).
FWD = {"16-bit": [_cfg(8, 1, BLOCK_M=64, BLOCK_N=256, BLOCK_C=64),
                  _cfg(8, 1, BLOCK_M=64, BLOCK_N=256, BLOCK_C=32),
                  _cfg(16, 1, BLOCK_M=128, BLOCK_N=256, BLOCK_C=32),
                  _cfg(4, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_C=32),
                  _cfg(4, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_C=32)],
       "tf32": [_cfg(8, 1, BLOCK_M=64, BLOCK_N=256, BLOCK_C=32),
                _cfg(4, 2, BLOCK_M=64, BLOCK_N=128, BLOCK_C=32),
                _cfg(8, 1, BLOCK_M=64, BLOCK_N=128, BLOCK_C=32)],
       "tf32x3": [_cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_C=32),
                  _cfg(8, 1, BLOCK_M=64, BLOCK_N=128, BLOCK_C=32)],
       "ieee": [_cfg(8, 1, BLOCK_M=64, BLOCK_N=128, BLOCK_C=16),
                _cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_C=16)]}
# the data kernel has no product of its own (its column gradient comes from a GEMM before it):
# its classes differ by the bytes of the gathered input only. It lives on the loads in flight
# per SM: capped at 168 registers, 4-warp programs run 3 to an SM instead of 2. In 64-voxel
# tiles (112 B of spills) that ran 6% faster at rf2 and 9% at early on an H200 (2026-12-01);
# in 32-voxel tiles (no spills) the whole backward at rf2 took 3.05 ms against 3.76 (H200,
# 2026-12-02; docs/design.md#register-caps). Capped at 128 the 64-voxel tile gains nothing; caps
# slow the fp32 tiles: the capped 32x16 tile made the whole fp32 backward 1 ms slower (rf2: TF32
# 6.74 against 5.75 ms, strict 13.26 against 12.31, H200, 2026-12-02), though the autotuner,
# timing the kernel alone, took it in strict fp32
BWD_DATA = {"16-bit": [_cfg(4, 1, maxnreg=168, BLOCK_M=32, BLOCK_C=16),
                       _cfg(4, 1, maxnreg=168, BLOCK_M=64, BLOCK_C=16),
                       _cfg(4, 1, BLOCK_M=64, BLOCK_C=16),
                       _cfg(4, 1, BLOCK_M=32, BLOCK_C=64),
                       _cfg(8, 1, BLOCK_M=64, BLOCK_C=32),
                       _cfg(8, 1, BLOCK_M=64, BLOCK_C=64)]}
BWD_DATA["tf32"] = BWD_DATA["tf32x3"] = BWD_DATA["ieee"] = [
    _cfg(8, 1, BLOCK_M=64, BLOCK_C=32), _cfg(4, 1, BLOCK_M=32, BLOCK_C=32),
    _cfg(4, 1, BLOCK_M=64, BLOCK_C=16)]
# the pulled input gradient (kernels/input_grad.py; deterministic mode's): bricks of BZ x BY x BX
# input voxels, BLOCK_P candidate outputs a step; the fp32 accumulator is BZ*BY*BX*BLOCK_C /
# (32 * num_warps) registers a thread. On an H200 (bf16, 2026-12-01) the first ran rf2 in 2.39 ms
# (64-wide steps 2.53; bricks of 2x16x16 or 4x8x16 over 3 ms), the second early in 9.28 (2x8x8
# bricks with 64-wide steps 11.7: early's 8 frames do not bound the window in t as rf2's 4 do).
# 4x8x8 bricks with 128 channels ran rf2 in 2.59 but spill 432 B. The fp32 ones are untimed guesses
BWD_INPUT = {"16-bit": [_cfg(8, 1, BZ=2, BY=8, BX=8, BLOCK_P=128, BLOCK_C=128),
                        _cfg(8, 1, BZ=4, BY=8, BX=8, BLOCK_P=64, BLOCK_C=64)]}
BWD_INPUT["tf32"] = BWD_INPUT["tf32x3"] = BWD_INPUT["ieee"] = [
    _cfg(8, 1, BZ=1, BY=8, BX=8, BLOCK_P=32, BLOCK_C=128),
    _cfg(8, 1, BZ=2, BY=8, BX=8, BLOCK_P=32, BLOCK_C=32)]
# the Gluon forward for Hopper (kernels/hopper.py), 16-bit inputs only. It is not autotuned: its
# tile follows the output channels (FWD_HOPPER_WIDE, FWD_HOPPER_NARROW), the best of these
# candidates at every bench shape on an H200 (2026-12-02): two 4-warp programs an SM with a
# 64 x 256 fp32 accumulator (128 registers a thread) at rf2, rf2_in512 and rf3; 128 x 64 tiles
# for early's 64 output channels (docs/design.md#the-hopper-forward). The others can be pinned
FWD_HOPPER = {"16-bit": [_cfg(4, 1, BLOCK_M=64, BLOCK_N=256, BLOCK_C=32),
                         _cfg(4, 1, BLOCK_M=128, BLOCK_N=64, BLOCK_C=32),
                         _cfg(4, 1, BLOCK_M=64, BLOCK_N=256, BLOCK_C=16),
                         _cfg(8, 1, BLOCK_M=64, BLOCK_N=256, BLOCK_C=64),
                         _cfg(8, 1, BLOCK_M=128, BLOCK_N=256, BLOCK_C=32),
                         _cfg(4, 1, BLOCK_M=64, BLOCK_N=64, BLOCK_C=32),
                         _cfg(8, 1, BLOCK_M=256, BLOCK_N=64, BLOCK_C=32)]}
FWD_HOPPER_WIDE, FWD_HOPPER_NARROW = FWD_HOPPER["16-bit"][:2]
CANDIDATES = {"FWD": FWD, "BWD_DATA": BWD_DATA, "BWD_INPUT": BWD_INPUT, "FWD_HOPPER": FWD_HOPPER}


def _identity(config):
    """What makes two configs the same launch."""
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages,
            config.maxnreg)


def precision_class(args):
    """ "16-bit", "tf32", "tf32x3" or "ieee" for a launch's arguments (the input's dtype,
    DOT_PRECISION)."""
    if args.get("x_ptr", args.get("col_ptr")).dtype != torch.float32:   # BWD_INPUT: no x_ptr
        return "16-bit"
    return args["DOT_PRECISION"]


# under the interpreter: small blocks, so that tests with a few dozen channels run every loop
# (several channel and output-channel blocks, several voxel blocks, masked tails)
INTERPRETER = {"FWD": _cfg(4, 1, BLOCK_M=32, BLOCK_N=16, BLOCK_C=16),
               "BWD_DATA": _cfg(4, 1, BLOCK_M=32, BLOCK_C=16),
               "BWD_INPUT": _cfg(4, 1, BZ=2, BY=4, BX=4, BLOCK_P=32, BLOCK_C=16)}

# what each block dimension tiles (its extent is the named kernel argument); tl.dot needs >= 16
_EXTENT = {"BLOCK_N": "Cog", "BLOCK_C": "SEG"}


def _fit(config, args):
    """Shrink a config's channel blocks to the problem (next power of two, at least 16)."""
    meta = dict(config.kwargs)
    for name, extent in _EXTENT.items():
        if name in meta:
            meta[name] = min(meta[name], max(16, next_power_of_2(args[extent])))
    return triton.Config(meta, num_warps=config.num_warps, num_stages=config.num_stages,
                         maxnreg=config.maxnreg)


def prune(configs, args, fit=None):
    """Fit every config to the shape (``fit(config, args)``, by default the D²Conv kernels'
    ``_fit``) and drop the duplicates this makes."""
    seen, kept = set(), []
    for config in configs:
        config = (fit or _fit)(config, args)
        key = _identity(config)
        if key not in seen:
            seen.add(key)
            kept.append(config)
    return kept


def _parse(text, kernel):
    meta, launch = {}, {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if not value.strip().isdigit():
            raise ValueError(f"{settings.variable('config_' + kernel.lower())}: cannot read "
                             f"{item!r} (want NAME=INT,...)")
        (launch if name in _LAUNCH else meta)[name] = int(value)
    return triton.Config(meta, **launch)


def pinned(kernel, args):
    """The config to launch ``kernel`` with when not autotuning (or for a kernel that is never
    tuned), else None."""
    text = settings.pinned_config(kernel)
    if text:
        return _parse(text, kernel)
    if settings.interpreting():
        return INTERPRETER[kernel]
    if kernel == "FWD_HOPPER":        # by its output channels a program: 64 or fewer, or more
        wide = _fit(FWD_HOPPER_WIDE, args)
        return wide if wide.kwargs["BLOCK_N"] > 64 else _fit(FWD_HOPPER_NARROW, args)
    if not settings.autotune():
        return _fit(CANDIDATES[kernel][precision_class(args)][0], args)
    return None


# what a kernel's pick depends on besides its tensors' dtype: the autotune keys above
KEYS = {"FWD": KEY, "BWD_DATA": DATA_KEY, "BWD_INPUT": INPUT_GRAD_KEY}


def candidates(kernel, args):
    """The candidates of ``kernel`` for a launch with these arguments: its precision class's,
    fitted to the shape."""
    return prune(CANDIDATES[kernel][precision_class(args)], args)


def tune_key(kernel, args, *extra):
    """What a pick of ``kernel`` is remembered under: its KEYS' values, the input's dtype and
    ``extra`` (what else the timed pass depends on)."""
    tensor = args.get("x_ptr", args.get("col_ptr"))
    return (*(args[name] for name in KEYS[kernel]), str(tensor.dtype), *extra)


def launch(kernel_fn, name, grid, args, config=None, pre_hook=None):
    """Launch a kernel with ``config``; without one, with its pinned config (``pinned``), else
    with the one ``tuning.pick`` times fastest on this launch alone (the forward's case: there
    the launch is the whole pass; the backward picks its configs on the whole backward and passes
    them). ``pre_hook`` runs on the arguments with the config's before a launch."""
    if config is None:
        config = pinned(name, args)
    if config is None:
        config = tuning.pick(name, tune_key(name, args), lambda: candidates(name, args),
                             lambda c: _launch(kernel_fn, grid, args, c, pre_hook))
    _launch(kernel_fn, grid, args, config, pre_hook)


def _launch(kernel_fn, grid, args, config, pre_hook):
    if pre_hook is not None:
        pre_hook({**args, **config.kwargs})
    launch_options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg is not None:
        launch_options["maxnreg"] = config.maxnreg
    tuning.launch(kernel_fn, grid, **args, **config.kwargs, **launch_options)
