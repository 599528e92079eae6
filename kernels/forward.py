"""Forward kernel: implicit GEMM over (output voxels) x (output channels), the trilinear gather
fused into the loading of the A tile. No column buffer; for D²Conv no offset tensor (positions
come from the size map inside the kernel).

    out[m, o] = bias[o] + sum_{k, c} A[m, (k, c)] * Wt[(k, c), o]
    A[m, (k, c)] = mask[m, k, g(c)] * trilinear(input[n(m), c], position(m, k, g(c)))
"""
import math
import os

import torch
import triton
import triton.language as tl

from . import configs
from .checks import SIZE_AXES
from .sampling import class_point, class_points, gather_tile, kernel_point, load_sizes


@triton.jit
def d2conv_fwd_kernel(
    x_ptr,      # input, channels-last (N, T, H, W, C)
    coord_ptr,  # offset (N, G*K*3, To, Ho, Wo) or size (N, G*NS, To, Ho, Wo), contiguous
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n = offs_m // L
    sp = offs_m % L
    wo = sp % Wo
    ho = sp // Wo % Ho
    to = sp // (Wo * Ho)
    n64 = n.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # the conv group's channels in segments that each sit inside one offset group
    for seg in range(0, Cg // SEG):
        c_first = gr * Cg + seg * SEG           # first input channel of the segment
        g = c_first // Cpg                      # its offset group
        coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
        mask_row = (n64 * (G * K) + g * K) * L + sp
        s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, m_ok, SZ_CH, SY_CH, SX_CH)
        for TAPS in tl.static_range(8):
            for r in range(class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)):
                i, j, l = class_point(r, TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
                k = (i * KH + j) * KW + l
                row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale = kernel_point(
                    coord_ptr, coord_row, mask_ptr, mask_row, L, m_ok, n64, i, j, l, to, ho, wo,
                    s_z, s_y, s_x, C, T, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                    IS_OFFSET, HAS_MASK, TAPS)
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


d2conv_fwd_tuned = triton.autotune(configs.all_candidates("FWD"), key=configs.KEY,
                                   prune_configs_by={"early_config_prune": configs.pruner("FWD")})(
    d2conv_fwd_kernel)


def dot_precision(dtype):
    """tl.dot's input_precision for fp32 inputs: "tf32" when PyTorch allows TF32 for matmuls
    (``torch.backends.cuda.matmul.allow_tf32``, or a float32 matmul precision other than
    "highest"), like the backward's cuBLAS GEMMs. Otherwise fp32 accuracy: "ieee" (FMA code on
    the CUDA cores, the faster of two ways on an H100: bench/NOTES.md), or "tf32x3" (three TF32
    products per product on the tensor cores, as accurate: bench/precision.py) when
    D2CONV_FP32_DOT=tf32x3. Irrelevant for 16-bit inputs."""
    if dtype != torch.float32:
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    strict = os.environ.get("D2CONV_FP32_DOT", "")
    if strict not in ("", "ieee", "tf32x3"):
        raise ValueError(f"D2CONV_FP32_DOT must be 'ieee' or 'tf32x3', got {strict!r}")
    return strict or "ieee"


def kernel_args(geo, input, coords, weight, mask, mode, backward=False):
    """Arguments shared by the forward and the backward's data kernel (``backward``), and the
    channels-last input / reshaped weight.

    Returns (args, x_cl, w_r): x_cl (N, T, H, W, C); w_r (groups, K, Cg, Cog), or (groups, K,
    Cog, Cg) for a forward with TF32 products (``args["W_C_MAJOR"]``, see ``d2conv_fwd``).
    """
    N, C, T, H, W = input.shape
    To, Ho, Wo = geo.out
    Co, K, groups, G = geo.Co, geo.K, geo.groups, geo.offset_groups
    Cg, Cog, Cpg = C // groups, Co // groups, C // G
    M = N * To * Ho * Wo
    x_cl = input.permute(0, 2, 3, 4, 1).contiguous()
    precision = dot_precision(input.dtype)
    # TF32 tensor-core products in the forward take the weight tile with its reduction axis
    # (input channels) contiguous, else Triton transposes each tile through shared memory (rf2,
    # H100: 5.4 -> 2.6 ms); 16-bit and FMA products keep the layout they were tuned with (Cog
    # contiguous), and so does the backward (its GEMMs take it either way)
    w_c_major = not backward and precision in ("tf32", "tf32x3")    # never for 16-bit dtypes
    w_r = weight.reshape(groups, Cog, Cg, K)
    w_r = (w_r.permute(0, 3, 1, 2) if w_c_major else w_r.permute(0, 3, 2, 1)).contiguous()
    axes = (-1, -1, -1) if mode == "offset" else tuple(-1 if a is None else a for a in SIZE_AXES[mode])
    args = dict(
        x_ptr=x_cl, coord_ptr=coords.contiguous(),
        mask_ptr=mask.contiguous() if mask is not None else x_cl,
        M=M, C=C, T=T, H=H, W=W, To=To, Ho=Ho, Wo=Wo, Co=Co, Cg=Cg, Cog=Cog, Cpg=Cpg,
        SEG=math.gcd(Cg, Cpg), G=G, COORD_CH=coords.shape[1],
        M_BUCKET=triton.next_power_of_2(M),
        KD=geo.kernel[0], KH=geo.kernel[1], KW=geo.kernel[2],
        SD=geo.stride[0], SH=geo.stride[1], SW=geo.stride[2],
        PD=geo.padding[0], PH=geo.padding[1], PW=geo.padding[2],
        DD=geo.dilation[0], DH=geo.dilation[1], DW=geo.dilation[2],
        IS_OFFSET=mode == "offset", SZ_CH=axes[0], SY_CH=axes[1], SX_CH=axes[2],
        HAS_MASK=mask is not None, DOT_PRECISION=precision,
    )
    if not backward:
        args["W_C_MAJOR"] = w_c_major
    return args, x_cl, w_r


def d2conv_fwd(geo, input, coords, weight, bias, mask, mode):
    """Forward of deform_conv3d (mode "offset") / d2conv3d; returns (N, Co, To, Ho, Wo) in the
    channels_last_3d memory format."""
    args, x_cl, w_r = kernel_args(geo, input, coords, weight, mask, mode)
    # channels-last memory, (N, To, Ho, Wo, Co) in the kernel's eyes; a tensor, not a view, so
    # that callers may modify it in place (an inplace ReLU after the op)
    out = torch.empty((input.shape[0], geo.Co, *geo.out), device=input.device, dtype=input.dtype,
                      memory_format=torch.channels_last_3d)
    args.update(w_ptr=w_r, b_ptr=bias if bias is not None else w_r, out_ptr=out,
                HAS_BIAS=bias is not None)

    def grid(meta):
        return (triton.cdiv(args["M"], meta["BLOCK_M"]),
                geo.groups * triton.cdiv(args["Cog"], meta["BLOCK_N"]))

    configs.launch(d2conv_fwd_kernel, d2conv_fwd_tuned, "FWD", grid, args)
    return out
