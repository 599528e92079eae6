"""D²Conv's input gradient without atomics, for deterministic mode (or D2CONV_INPUT_GRAD=pull).

The data kernel scatters mask * corner_weight * gcol into each sample's 8 corners with fp32
atomics. Here each program owns a brick of input voxels and pulls instead: for each kernel point
k it visits every output voxel p whose sample could land within a voxel of the brick (a window
bounded by the size map's smallest and largest value along each axis) and adds

    grad_input[x, c] += sum_p w[x, p] * gcol[p, k, c],
    w[x, p] = mask[p, k] * prod_axes max(0, 1 - |position(p, k) - x|)

as a tl.dot of the [brick, candidates] weight tile (mostly zero) with the candidates' column
gradient: the scatter becomes a small matrix multiply on the tensor cores, each input element is
written by one program, and the result does not depend on any order (deterministic). The cost
grows with the spread of the sizes (the window); free offsets have no such bound and keep the
scatter. At rf2 (bf16, H200, sizes in [0.5, 3]) it takes 2.4 ms with the column-gradient GEMMs,
against 2.3 for the fp32 scatter and ~10.5 for the fixed-point one (measured 2026-12-01,
docs/design.md#pulled-input-gradient): the default in deterministic mode only (``choose``).
"""
import torch
import triton
import triton.language as tl

from . import configs, settings
from .checks import OFFSET_AXES, SIZE_CHANNELS
from .launch import cdiv
from .sampling import load_sizes, size_delta


@triton.jit
def _window(lo0, extent, idx, KSIZE: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
            D: tl.constexpr, SCALED: tl.constexpr, s_lo, s_hi, OUT):
    """The output indices (first, count) along one axis whose kernel index ``idx`` can sample
    within one voxel of input indices lo0 .. lo0 + extent - 1: position p * S - P + idx * D +
    (s - 1) * (idx - centre) * D with s in [s_lo, s_hi] (s = 1 when the axis is not SCALED) in
    (lo0 - 1, lo0 + extent). A margin of 1e-3 voxel on each side covers the rounding of the
    positions (the weights of the extra indices are 0)."""
    base = (idx * D - P).to(tl.float32)
    d_min = 0.0
    d_max = 0.0
    if SCALED:
        a = size_delta(s_lo, idx, KSIZE, D)
        b = size_delta(s_hi, idx, KSIZE, D)
        d_min = tl.minimum(a, b)
        d_max = tl.maximum(a, b)
    # p * S > lo0 - 1 - base - d_max and p * S < lo0 + extent - base - d_min
    first = tl.floor((lo0.to(tl.float32) - 1.0 - base - d_max) / S - 1e-3) + 1.0
    last = tl.ceil(((lo0 + extent).to(tl.float32) - base - d_min) / S + 1e-3) - 1.0
    # clamped before the conversion, so that huge or non-finite sizes cannot overflow it
    first = tl.minimum(tl.maximum(first, 0.0), OUT * 1.0)     # OUT may be a constexpr
    last = tl.minimum(tl.maximum(last, -1.0), OUT - 1.0)
    first_i = first.to(tl.int32)
    return first_i, tl.maximum(last.to(tl.int32) - first_i + 1, 0)


@triton.jit
def _axis_weight(p, x, idx, s, KSIZE: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
                 D: tl.constexpr, SCALED: tl.constexpr):
    """[BLOCK_X, BLOCK_P] trilinear weight along one axis of input indices x ([BLOCK_X]) for the
    samples of output indices p ([BLOCK_P], scales s), with the float ops of kernel_point."""
    position = (p * S - P + idx * D).to(tl.float32)
    if SCALED:
        position = position + size_delta(s, idx, KSIZE, D)
    return tl.maximum(1.0 - tl.abs(position[None, :] - x.to(tl.float32)[:, None]), 0.0)


@triton.jit(do_not_specialize=["K_FIRST", "KC"])
def d2conv_input_grad_kernel(
    coord_ptr,   # size (N, G*NS, To, Ho, Wo) contiguous
    mask_ptr,    # (N, G*K, To, Ho, Wo) contiguous, or any pointer when not HAS_MASK
    col_ptr,     # (groups, M, KC, Cg): the column gradient of kernel points K_FIRST.. (read)
    gx_ptr,      # fp32 (N, T, H, W, C): accumulated (each element by one program)
    bounds_ptr,  # fp32 (NS, 2): the smallest and largest size of each size channel
    # LaunchGeometry.args() (M, Co, Cog and IS_OFFSET unused: no output-channel axis, no offsets)
    M, C, T, H, W, To, Ho, Wo, Co, Cg, Cog, Cpg, SEG, G, COORD_CH,
    M_BUCKET,                       # read by the tuning key only
    K_FIRST, KC, COL_M, COL_G,      # this launch's kernel points; col's strides (voxel, group)
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr, SX_CH: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BZ: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    K: tl.constexpr = KD * KH * KW
    BLOCK_X: tl.constexpr = BZ * BY * BX
    # the brick: input voxels z0 .. z0+BZ-1, y0 .., x0 .. of sample n
    nbx = tl.cdiv(W, BX)
    nby = tl.cdiv(H, BY)
    nbz = tl.cdiv(T, BZ)
    brick = tl.program_id(0)
    x0 = brick % nbx * BX
    y0 = brick // nbx % nby * BY
    z0 = brick // (nbx * nby) % nbz * BZ
    n = brick // (nbx * nby * nbz)
    offs_x = tl.arange(0, BLOCK_X)
    xz = z0 + offs_x // (BY * BX)
    xy = y0 + offs_x // BX % BY
    xx = x0 + offs_x % BX
    x_ok = (xz < T) & (xy < H) & (xx < W)
    # the channel block, inside one segment (one offset group, one conv group)
    seg_blocks = tl.cdiv(SEG, BLOCK_C)
    c_in_seg = tl.program_id(1) % seg_blocks * BLOCK_C
    c_first = tl.program_id(1) // seg_blocks * SEG + c_in_seg
    offs_c = tl.arange(0, BLOCK_C)
    ch_ok = c_in_seg + offs_c < SEG
    g = c_first // Cpg
    gr = c_first // Cg

    L = To * Ho * Wo
    n64 = n.to(tl.int64)
    s_lo_z = 1.0
    s_hi_z = 1.0
    s_lo_y = 1.0
    s_hi_y = 1.0
    s_lo_x = 1.0
    s_hi_x = 1.0
    if SZ_CH >= 0:
        s_lo_z = tl.load(bounds_ptr + 2 * SZ_CH)
        s_hi_z = tl.load(bounds_ptr + 2 * SZ_CH + 1)
    if SY_CH >= 0:
        s_lo_y = tl.load(bounds_ptr + 2 * SY_CH)
        s_hi_y = tl.load(bounds_ptr + 2 * SY_CH + 1)
    if SX_CH >= 0:
        s_lo_x = tl.load(bounds_ptr + 2 * SX_CH)
        s_hi_x = tl.load(bounds_ptr + 2 * SX_CH + 1)
    acc = tl.zeros((BLOCK_X, BLOCK_C), tl.float32)
    for k in range(K_FIRST, K_FIRST + KC):
        i = k // (KH * KW)
        j = k // KW % KH
        l = k % KW
        pz0, nz = _window(z0, BZ, i, KD, SD, PD, DD, SZ_CH >= 0, s_lo_z, s_hi_z, To)
        py0, ny = _window(y0, BY, j, KH, SH, PH, DH, SY_CH >= 0, s_lo_y, s_hi_y, Ho)
        px0, nx = _window(x0, BX, l, KW, SW, PW, DW, SX_CH >= 0, s_lo_x, s_hi_x, Wo)
        col_k = (k - K_FIRST) * Cg + c_first - gr * Cg
        for p_first in range(0, nz * ny * nx, BLOCK_P):
            offs_p = p_first + tl.arange(0, BLOCK_P)
            p_ok = offs_p < nz * ny * nx
            pz = pz0 + offs_p // (ny * nx)
            py = py0 + offs_p // nx % ny
            px = px0 + offs_p % nx
            sp = (pz * Ho + py) * Wo + px
            coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
            s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, p_ok, False, SZ_CH, SY_CH, SX_CH)
            if HAS_MASK:
                scale = tl.load(mask_ptr + (n64 * (G * K) + g * K + k) * L + sp, mask=p_ok,
                                other=0.0).to(tl.float32)
            else:
                scale = tl.where(p_ok, 1.0, 0.0)
            w = (_axis_weight(pz, xz, i, s_z, KD, SD, PD, DD, SZ_CH >= 0)
                 * _axis_weight(py, xy, j, s_y, KH, SH, PH, DH, SY_CH >= 0)
                 * _axis_weight(px, xx, l, s_x, KW, SW, PW, DW, SX_CH >= 0)
                 * scale[None, :])
            rows = gr.to(tl.int64) * COL_G + (n64 * L + sp) * COL_M + col_k
            gcol = tl.load(col_ptr + rows[:, None] + offs_c[None, :],
                           mask=p_ok[:, None] & ch_ok[None, :], other=0.0)
            acc = tl.dot(w.to(gcol.dtype), gcol, acc, input_precision=DOT_PRECISION)
    out = gx_ptr + ((((n64 * T + xz) * H + xy) * W + xx) * C + c_first)[:, None] + offs_c[None, :]
    ok = x_ok[:, None] & ch_ok[None, :]
    tl.store(out, tl.load(out, mask=ok, other=0.0) + acc, mask=ok)


# the pull's window grows with the spread of the sizes (hi - lo, times the dilation and the
# kernel's half width): its work goes as the product over the axes of (brick + 1 + spread). At
# sizes in [0.5, 3] (spread 2.5) it took 2.4 ms at rf2 against ~10.5 for the fixed-point scatter
# of deterministic mode (bf16, H200, 2026-12-01); by that model it stays ahead up to a spread of
# about 8 (modelled, not measured)
AUTO_MAX_SPREAD = 8.0


def capturing(tensor):
    """Whether a CUDA graph is being captured on the tensor's device (no host syncs then)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def choose(mode, deterministic, coords, geo):
    """Whether to pull the input gradient: its size bounds (size_bounds), or None to scatter.

    settings.input_grad() (D2CONV_INPUT_GRAD) "pull" or "scatter" decides; "auto" takes the pull
    in deterministic mode, whose scatter needs int64 fixed point (the whole backward at rf2, bf16,
    H200 on 2026-12-02: 7.92 ms against 4.64 with the pull, 3.12 for the plain backward;
    docs/design.md#deterministic-mode), unless the sizes spread wider than AUTO_MAX_SPREAD (read
    with one host sync; not while a CUDA graph is being captured, where the pull is taken: right
    for any spread, only slower). Free offsets have no
    window: always the scatter."""
    choice = settings.input_grad()
    if mode in OFFSET_AXES or choice == "scatter" or (choice == "auto" and not deterministic):
        return None
    bounds = size_bounds(coords, geo.offset_groups, SIZE_CHANNELS[mode])
    reach = max(d * (k // 2) for d, k in zip(geo.dilation, geo.kernel))
    if (choice == "auto" and not capturing(coords)
            and (bounds[:, 1] - bounds[:, 0]).max().item() * reach > AUTO_MAX_SPREAD):
        return None
    return bounds


def size_bounds(coords, offset_groups, size_channels):
    """(size_channels, 2) fp32: each size channel's smallest and largest value (no host sync)."""
    sizes = coords.reshape(coords.shape[0], offset_groups, size_channels, -1).transpose(1, 2)
    sizes = sizes.reshape(size_channels, -1).float()
    return torch.stack([sizes.amin(1), sizes.amax(1)], dim=1).contiguous()


def launch(shape, coords, mask, col, gx, bounds, k_first, kc, config):
    """Add the input gradient of kernel points k_first .. k_first+kc-1 into gx.

    shape: the call's LaunchGeometry; coords, mask contiguous; col (groups, M, kc*Cg) their column
    gradient; gx fp32 channels-last (N, T, H, W, C); bounds from size_bounds; config the kernel's
    (the backward picks it, kernels/backward.py)."""
    geo = shape.geo
    args = dict(shape.args(), coord_ptr=coords, mask_ptr=mask if mask is not None else coords,
                col_ptr=col, gx_ptr=gx, bounds_ptr=bounds, K_FIRST=k_first, KC=kc,
                COL_M=kc * shape.Cg, COL_G=shape.M * kc * shape.Cg)

    def grid(meta):
        return (geo.N * cdiv(geo.T, meta["BZ"]) * cdiv(geo.H, meta["BY"])
                * cdiv(geo.W, meta["BX"]),
                geo.C // shape.SEG * cdiv(shape.SEG, meta["BLOCK_C"]))

    configs.launch(d2conv_input_grad_kernel, "BWD_INPUT", grid, args, config=config)
