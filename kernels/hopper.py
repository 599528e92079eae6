"""The forward on Hopper (sm_90) in Gluon: the Triton forward's implicit GEMM (kernels/forward.py)
with its product made asynchronous, so that the tensor cores multiply one tile while the warps
gather the next.

Per step (kernel point, block of BLOCK_C channels), into one of two shared-memory slots:

    TMA:     weight tile [BLOCK_C, BLOCK_N] -> w_smem[s]      (no registers, no address math)
    warps:   gather_tile (kernels/sampling.py) -> bf16/fp16 -> a_smem[s]
    wgmma:   acc += a_smem[s] @ w_smem[s], issued async; the wait lets one product stay in flight

so the product of step i runs while step i + 1 gathers, and a slot is written again only after
the product that read it has finished. The Triton forward's tl.dot waits for its product before
the next gather.

Selected by ``kernels/forward.py`` where ``refusal`` finds nothing against it (16-bit inputs on an
sm_90 GPU, a Triton version it was tested with, output channels a TMA descriptor tiles);
``kernels.settings`` (D2CONV_FORWARD) forces either path. Its tile follows the output channels
(``configs.pinned``), not an autotuner. Gluon kernels do not run under the Triton interpreter;
tests/test_compile.py compiles this one for sm_90 without a GPU.
"""
import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                              warpgroup_mma, warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import configs
from .launch import LaunchGeometry, cdiv, channels_last, weight_tiles
from .sampling import class_point, class_points, gather_tile, kernel_point, load_sizes

# Gluon's names moved between Triton 3.6 and 3.9 (module-level aliases are legal in a kernel)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

# Triton versions (major.minor) whose Gluon this kernel was run and checked with on a GPU; others
# take the Triton forward unless D2CONV_FORWARD=gluon (CI compiles it with its own Triton)
TESTED_TRITON = ("3.6",)


@triton.constexpr_function
def _a_layout(BLOCK_M, BLOCK_C, bitwidth):
    """Shared layout of the gathered tile, as wgmma reads it (128-byte swizzle for 64 channels)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=min(128, BLOCK_C * bitwidth // 8),
                                element_bitwidth=bitwidth, rank=2)


@triton.constexpr_function
def _gather_layout(BLOCK_C, num_warps):
    """Threads along a channel row of the gathered tile, 8 channels (16 bytes) each."""
    along = max(1, min(32, BLOCK_C // 8))
    return gl.BlockedLayout([1, BLOCK_C // along], [32 // along, along], [num_warps, 1], [1, 0])


@triton.constexpr_function
def _acc_layout(BLOCK_M, BLOCK_N, num_warps):
    """wgmma's accumulator: warpgroups split the rows while each has 64 of them, then columns."""
    warps = [4, 1]
    while warps[0] * warps[1] < num_warps:
        if BLOCK_M >= 16 * warps[0] * 2:
            warps[0] *= 2
        else:
            warps[1] *= 2
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                     instr_shape=[16, BLOCK_N // warps[1], 16])


@gluon.jit
def d2conv_fwd_hopper_kernel(
    x_ptr, coord_ptr, mask_ptr,     # as d2conv_fwd_kernel's
    w_desc,     # TMA descriptor of the weight as (groups * K * Cg, Cog), block [BLOCK_C, BLOCK_N]
    b_ptr, out_ptr,
    M, C, T, H, W, To, Ho, Wo, Co, Cg, Cog, Cpg, SEG, G, COORD_CH, M_BUCKET,
    KD: gl.constexpr, KH: gl.constexpr, KW: gl.constexpr,
    SD: gl.constexpr, SH: gl.constexpr, SW: gl.constexpr,
    PD: gl.constexpr, PH: gl.constexpr, PW: gl.constexpr,
    DD: gl.constexpr, DH: gl.constexpr, DW: gl.constexpr,
    IS_OFFSET: gl.constexpr, SZ_CH: gl.constexpr, SY_CH: gl.constexpr, SX_CH: gl.constexpr,
    HAS_MASK: gl.constexpr, HAS_BIAS: gl.constexpr, DOT_PRECISION: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_C: gl.constexpr,
    num_warps: gl.constexpr,
):
    K: gl.constexpr = KD * KH * KW
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    gather_l: gl.constexpr = _gather_layout(BLOCK_C, num_warps)
    acc_l: gl.constexpr = _acc_layout(BLOCK_M, BLOCK_N, num_warps)
    a_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_C],
                                       _a_layout(BLOCK_M, BLOCK_C, dtype.primitive_bitwidth))
    w_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_C, BLOCK_N], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(ready.index(0), count=1)
    mbarrier.init(ready.index(1), count=1)

    pid_m = gl.program_id(0)
    pid_n = gl.program_id(1)
    n_tiles = gl.cdiv(Cog, BLOCK_N)
    gr = pid_n // n_tiles                       # conv group
    n0 = (pid_n % n_tiles) * BLOCK_N            # first output channel of the tile, in the group

    L = To * Ho * Wo
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gather_l))
    m_ok = offs_m < M
    n64 = (offs_m // L).to(gl.int64)
    sp = offs_m % L
    to = sp // (Wo * Ho)
    ho = sp // Wo % Ho
    wo = sp % Wo
    offs_c = gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, gather_l))

    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    step = 0                                    # slot step % 2, its barrier's phase step // 2
    for seg in range(0, Cg // SEG):
        c_first = gr * Cg + seg * SEG
        g = c_first // Cpg
        coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
        mask_row = (n64 * (G * K) + g * K) * L + sp
        s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, m_ok, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
        for TAPS in gl.static_range(8):
            for r in range(class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)):
                i, j, l = class_point(r, TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
                k = (i * KH + j) * KW + l
                row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale = kernel_point(
                    coord_ptr, coord_row, mask_ptr, mask_row, L, m_ok, n64, i, j, l, to, ho, wo,
                    s_z, s_y, s_x, C, T, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                    IS_OFFSET, SZ_CH, SY_CH, SX_CH, HAS_MASK, TAPS)
                w_row = (gr * K + k) * Cg + seg * SEG
                for c0 in range(0, SEG, BLOCK_C):
                    slot = step % 2
                    # the product that read this slot (step - 2) has finished: see the wait below
                    mbarrier.expect(ready.index(slot), w_desc.block_type.nbytes)
                    _tma_load(w_desc, [w_row + c0, n0], ready.index(slot), w_smem.index(slot))
                    a = gather_tile(x_ptr, row0, c_first + c0 + offs_c, c0 + offs_c < SEG,
                                    H * W * C, W * C, C, fz, fy, fx, okz0, okz1, oky0, oky1,
                                    okx0, okx1, scale, TAPS, BLEND_16=True)
                    a_smem.index(slot).store(a.to(dtype))
                    fence_async_shared()
                    _barrier()                  # every warp's rows are in the slot
                    mbarrier.wait(ready.index(slot), (step // 2) % 2)
                    acc = warpgroup_mma(a_smem.index(slot), w_smem.index(slot), acc,
                                        is_async=True)
                    # at most this product in flight: step - 1's slot is free for step + 1
                    acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                    if num_warps > 4:
                        _barrier()              # ... in every warpgroup
                    step += 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.invalidate(ready.index(0))
    mbarrier.invalidate(ready.index(1))

    offs_o = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_l))
    o_ok = offs_o < Cog
    if HAS_BIAS:
        acc += gl.load(b_ptr + gr * Cog + offs_o, mask=o_ok, other=0.0).to(gl.float32)[None, :]
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_l))
    out = out_ptr + rows.to(gl.int64)[:, None] * Co + (gr * Cog + offs_o)[None, :]
    gl.store(out, acc.to(dtype), mask=(rows < M)[:, None] & o_ok[None, :])


@functools.lru_cache(maxsize=None)
def _weight_layout(dtype, block):
    """The weight tile's shared layout for a torch dtype and a (BLOCK_C, BLOCK_N) block. Cached:
    building one took 18 us on an Intel Xeon host (2026-12-03), and a launch asks for two."""
    return gl.NVMMASharedLayout.get_default_for(
        list(block), gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _set_block(nargs):
    """Run before every launch: the weight descriptor's block is the config's [BLOCK_C, BLOCK_N]
    tile."""
    desc = nargs["w_desc"]
    desc.block_shape = [nargs["BLOCK_C"], nargs["BLOCK_N"]]
    desc.layout = _weight_layout(desc.base.dtype, tuple(desc.block_shape))


def refusal(geo, input, tested_only=True):
    """Why the Gluon forward cannot take this call, or "" when it can: it takes bf16/fp16 inputs
    on an sm_90 GPU, output channels a TMA descriptor can tile (rows of a multiple of 16 bytes)
    and, with ``tested_only``, a Triton version it was tested with."""
    version = ".".join(triton.__version__.split(".")[:2])
    if input.dtype not in (torch.bfloat16, torch.float16):
        return f"it takes bf16 or fp16 inputs, not {input.dtype}"
    if not input.is_cuda or torch.cuda.get_device_capability(input.device) != (9, 0):
        return "it runs on sm_90 GPUs (Hopper) only"
    if (geo.Co // geo.groups) % 8:
        return f"output channels per group ({geo.Co // geo.groups}) must be a multiple of 8"
    if tested_only and version not in TESTED_TRITON:
        return f"not tested with Triton {triton.__version__}"
    return ""


def d2conv_fwd_hopper(geo, input, coords, weight, bias, mask, mode):
    """The forward (kernels/forward.py's d2conv_fwd) with the Gluon kernel; same result layout."""
    shape = LaunchGeometry.of(geo, mode, coords, mask, input.dtype)
    x_cl = channels_last(input)
    w2d = weight_tiles(weight, geo.groups).view(-1, shape.Cog)      # (groups * K * Cg, Cog)
    out = torch.empty((input.shape[0], geo.Co, *geo.out), device=input.device, dtype=input.dtype,
                      memory_format=torch.channels_last_3d)
    # its block is set per config by _set_block
    w_desc = TensorDescriptor(w2d, list(w2d.shape), list(w2d.stride()), [16, 16],
                              _weight_layout(w2d.dtype, (16, 16)))
    args = dict(shape.args(), x_ptr=x_cl, coord_ptr=coords.contiguous(),
                mask_ptr=mask.contiguous() if mask is not None else x_cl, w_desc=w_desc,
                b_ptr=bias if bias is not None else w2d, out_ptr=out, HAS_BIAS=bias is not None)

    def grid(meta):
        return (cdiv(shape.M, meta["BLOCK_M"]),
                geo.groups * cdiv(shape.Cog, meta["BLOCK_N"]))

    # not autotuned: configs.pinned picks the tile by output channels
    configs.launch(d2conv_fwd_hopper_kernel, "FWD_HOPPER", grid, args, pre_hook=_set_block)
    return out
