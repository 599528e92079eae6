"""Forward kernel: implicit GEMM over (output voxels) x (output channels), the trilinear gather
fused into the loading of the A tile. No column buffer; for D²Conv no offset tensor (positions
come from the size map inside the kernel).

    out[m, o] = bias[o] + sum_{k, c} A[m, (k, c)] * Wt[(k, c), o]
    A[m, (k, c)] = mask[m, k, g(c)] * trilinear(input[n(m), c], position(m, k, g(c)))
"""
import torch
import triton
import triton.language as tl

from . import configs, settings
from .launch import LaunchGeometry, cdiv, channels_last, weight_tiles
from .sampling import (class_point, class_points, gather_tile, kernel_point, load_sizes,
                       output_voxels)


@triton.jit
def d2conv_fwd_kernel(
    x_ptr,      # input, channels-last (N, T, H, W, C)
    coord_ptr,  # offset (N, G*K*P, To, Ho, Wo) (P = SX_CH + 1 components) or size (N, G*NS,
                # To, Ho, Wo), contiguous
    mask_ptr,   # (N, G*K, To, Ho, Wo) contiguous, or any pointer when not HAS_MASK
    w_ptr,      # weight (groups, K, Cg, Cog), or (groups, K, Cog, Cg) when W_C_MAJOR
    b_ptr,      # bias (Co,), or any pointer when not HAS_BIAS
    out_ptr,    # (N, To, Ho, Wo, Co)
    M, C, T, H, W, To, Ho, Wo, Co, Cg, Cog, Cpg, SEG, G, COORD_CH, M_BUCKET,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr, SX_CH: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    W_C_MAJOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    K: tl.constexpr = KD * KH * KW
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_tiles = tl.cdiv(Cog, BLOCK_N)
    gr = pid_n // n_tiles                       # conv group
    offs_o = (pid_n % n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = offs_o < Cog

    L = To * Ho * Wo
    offs_m, m_ok, n64, sp, to, ho, wo = output_voxels(pid_m, M, To, Ho, Wo, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # the conv group's channels in segments that each sit inside one offset group
    for seg in range(0, Cg // SEG):
        c_first = gr * Cg + seg * SEG           # first input channel of the segment
        g = c_first // Cpg                      # its offset group
        coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
        mask_row = (n64 * (G * K) + g * K) * L + sp
        s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, m_ok, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
        for TAPS in tl.static_range(8):
            for r in range(class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)):
                i, j, l = class_point(r, TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
                k = (i * KH + j) * KW + l
                row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale = kernel_point(
                    coord_ptr, coord_row, mask_ptr, mask_row, L, m_ok, n64, i, j, l, to, ho, wo,
                    s_z, s_y, s_x, C, T, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                    IS_OFFSET, SZ_CH, SY_CH, SX_CH, HAS_MASK, TAPS)
                w_kc = (gr * K + k) * Cg * Cog + seg * SEG * (1 if W_C_MAJOR else Cog)
                for c0 in range(0, SEG, BLOCK_C):
                    ch_ok = c0 + offs_c < SEG
                    a = gather_tile(x_ptr, row0, c_first + c0 + offs_c, ch_ok, H * W * C, W * C, C,
                                    fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale, TAPS)
                    if W_C_MAJOR:   # channels contiguous
                        w_off = (c0 + offs_c)[:, None] + offs_o[None, :] * Cg
                    else:
                        w_off = (c0 + offs_c)[:, None] * Cog + offs_o[None, :]
                    w_tile = tl.load(w_ptr + w_kc + w_off, mask=ch_ok[:, None] & o_ok[None, :],
                                     other=0.0)
                    acc = tl.dot(a.to(w_tile.dtype), w_tile, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + gr * Cog + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * Co + (gr * Cog + offs_o)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & o_ok[None, :])


def _gluon(geo, input):
    """Whether the forward takes the Gluon kernel (kernels/hopper.py): settings.forward()."""
    choice = settings.forward()
    if choice == "triton" or (choice == "auto" and not input.is_cuda):
        return False
    try:
        from . import hopper
    except (ImportError, AttributeError) as error:     # a Triton without Gluon's Hopper API
        if choice == "gluon":
            raise RuntimeError(f"D2CONV_FORWARD=gluon: this Triton cannot build the Gluon "
                               f"forward ({error})") from None
        return False
    why_not = hopper.refusal(geo, input, tested_only=choice == "auto")
    if why_not and choice == "gluon":
        raise ValueError(f"D2CONV_FORWARD=gluon cannot take this call: {why_not}")
    return not why_not


def d2conv_fwd(geo, input, coords, weight, bias, mask, mode):
    """Forward of the free-offset modes ("offset", "offset_yx") and the D²Conv modes; returns
    (N, Co, To, Ho, Wo) in the channels_last_3d memory format."""
    if _gluon(geo, input):
        from .hopper import d2conv_fwd_hopper
        return d2conv_fwd_hopper(geo, input, coords, weight, bias, mask, mode)
    shape = LaunchGeometry.of(geo, mode, coords, mask, input.dtype)
    # TF32 tensor-core products take the weight tile with its reduction axis (input channels)
    # contiguous, else Triton transposes each tile through shared memory (rf2, H100: 5.4 -> 2.6
    # ms); 16-bit and FMA products keep the layout they were tuned with (Cog contiguous)
    w_c_major = shape.precision in ("tf32", "tf32x3")      # never for 16-bit dtypes
    x_cl = channels_last(input)
    w_r = weight_tiles(weight, geo.groups, c_major=w_c_major)
    # channels-last memory, (N, To, Ho, Wo, Co) in the kernel's eyes; a tensor, not a view, so
    # that callers may modify it in place (an inplace ReLU after the op)
    out = torch.empty((input.shape[0], geo.Co, *geo.out), device=input.device, dtype=input.dtype,
                      memory_format=torch.channels_last_3d)
    args = dict(shape.args(), x_ptr=x_cl, coord_ptr=coords.contiguous(),
                mask_ptr=mask.contiguous() if mask is not None else x_cl, w_ptr=w_r,
                b_ptr=bias if bias is not None else w_r, out_ptr=out,
                HAS_BIAS=bias is not None, W_C_MAJOR=w_c_major)

    def grid(meta):
        return (cdiv(shape.M, meta["BLOCK_M"]),
                geo.groups * cdiv(shape.Cog, meta["BLOCK_N"]))

    configs.launch(d2conv_fwd_kernel, "FWD", grid, args)
    return out
