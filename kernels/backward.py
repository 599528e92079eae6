"""Backward kernels. With gcol[m, (k, c)] = sum_o grad_out[m, o] * Wt[(k, c), o] (the gradient of
the sampled columns: one GEMM per launch of the data kernel, over the few kernel points that
launch takes, so that at most GCOL_BUDGET bytes of it exist at a time):

  data kernel, one program per (voxel block, offset group):
    grad_input  += scatter of mask * corner_weight * gcol into the 8 corners (fp32 atomics,
                   channel-contiguous)
    grad_mask    = sum_c gcol * value
    grad_offset  = mask * sum_c gcol * dvalue/dposition, or for D²Conv directly
    grad_size    = sum_k (index - centre) * dilation * grad_position_k (no offset tensor)
  weight kernel, one program per (output-channel block, channel block, voxel split):
    grad_weight[k, c, o] = sum_m A[m, (k, c)] * grad_out[m, o]  (A re-gathered as in the
                   forward), grad_bias = sum_m grad_out; fp32 atomics across voxel splits.
"""
import os
import warnings

import torch
import triton
import triton.language as tl

from . import configs
from .forward import kernel_args
from .sampling import (class_point, class_points, gather_dot, gather_tile, kernel_point,
                       load_sizes, scatter_tile)


@triton.jit(do_not_specialize=["K_FIRST", "KC"])
def d2conv_bwd_data_kernel(
    x_ptr,       # input, channels-last (N, T, H, W, C)
    coord_ptr,   # offset (N, G*K*3, To, Ho, Wo) or size (N, G*NS, To, Ho, Wo)
    mask_ptr,    # (N, G*K, To, Ho, Wo), or any pointer when not HAS_MASK
    gcol_ptr,    # column gradient of kernel points K_FIRST .. K_FIRST+KC-1: (groups, M, KC, Cg)
    gx_ptr,      # fp32 (N, T, H, W, C), zeroed, accumulated with atomics (when NEED_INPUT)
    gcoord_ptr,  # like coord_ptr (when NEED_COORD); fp32 and accumulated for sizes when K_FIRST > 0
    gmask_ptr,   # like mask_ptr (when NEED_MASK)
    M, C, T, H, W, To, Ho, Wo, Co, Cg, Cog, Cpg, SEG, G, COORD_CH, M_BUCKET,
    K_FIRST, KC,                # this launch's kernel points
    GCOL_M, GCOL_G,             # gcol's strides per voxel (KC*Cg) and per conv group (M*KC*Cg)
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr, SX_CH: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_COORD: tl.constexpr,
    NEED_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,    # unused here (the product is the GEMM before the launch);
                                    # it picks the config class
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    K: tl.constexpr = KD * KH * KW
    pid_m = tl.program_id(0)
    g = tl.program_id(1)                        # offset group

    L = To * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n = offs_m // L
    sp = offs_m % L
    wo = sp % Wo
    ho = sp // Wo % Ho
    to = sp // (Wo * Ho)
    n64 = n.to(tl.int64)
    gcol_m = offs_m.to(tl.int64) * GCOL_M
    offs_c = tl.arange(0, BLOCK_C)

    coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
    mask_row = (n64 * (G * K) + g * K) * L + sp
    s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, m_ok, SZ_CH, SY_CH, SX_CH)
    gs_z = tl.zeros((BLOCK_M,), tl.float32)     # D²Conv: gradient of each axis' scale
    gs_y = tl.zeros((BLOCK_M,), tl.float32)
    gs_x = tl.zeros((BLOCK_M,), tl.float32)
    for TAPS in tl.static_range(8):
        for r in range(class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)):
            i, j, l = class_point(r, TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
            k = (i * KH + j) * KW + l
            if (k >= K_FIRST) & (k < K_FIRST + KC):
                row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, mk = kernel_point(
                    coord_ptr, coord_row, mask_ptr, mask_row, L, m_ok, n64, i, j, l, to, ho, wo,
                    s_z, s_y, s_x, C, T, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                    IS_OFFSET, HAS_MASK, TAPS)
                # unreduced d loss / d mask and d loss / d position (before the mask)
                t_m = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                t_z = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                t_y = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                t_x = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                # the offset group's channels in segments that each sit inside one conv group
                for seg in range(0, Cpg // SEG):
                    c_first = g * Cpg + seg * SEG
                    gr = c_first // Cg
                    gcol_row = (gr.to(tl.int64) * GCOL_G + gcol_m
                                + ((k - K_FIRST) * Cg + c_first - gr * Cg))
                    for c0 in range(0, SEG, BLOCK_C):
                        ch_ok = c0 + offs_c < SEG
                        gcol = tl.load(gcol_ptr + gcol_row[:, None] + (c0 + offs_c)[None, :],
                                       mask=m_ok[:, None] & ch_ok[None, :],
                                       other=0.0).to(tl.float32)
                        if NEED_COORD or NEED_MASK:
                            t_m, t_z, t_y, t_x = gather_dot(
                                x_ptr, row0, c_first + c0 + offs_c, ch_ok, H * W * C, W * C, C,
                                gcol, t_m, t_z, t_y, t_x, fz, fy, fx, okz0, okz1, oky0, oky1,
                                okx0, okx1, TAPS)
                        if NEED_INPUT:
                            scatter_tile(gx_ptr, row0, c_first + c0 + offs_c, ch_ok, H * W * C,
                                         W * C, C, gcol, fz, fy, fx, okz0, okz1, oky0, oky1,
                                         okx0, okx1, mk, TAPS)
                g_m = tl.sum(t_m, axis=1)
                g_z = tl.sum(t_z, axis=1)
                g_y = tl.sum(t_y, axis=1)
                g_x = tl.sum(t_x, axis=1)
                if NEED_COORD:
                    if IS_OFFSET:
                        tl.store(gcoord_ptr + coord_row + (k * 3 + 0) * L, g_z * mk, mask=m_ok)
                        tl.store(gcoord_ptr + coord_row + (k * 3 + 1) * L, g_y * mk, mask=m_ok)
                        tl.store(gcoord_ptr + coord_row + (k * 3 + 2) * L, g_x * mk, mask=m_ok)
                    else:
                        # d position / d s = (index - centre) * dilation
                        gs_z += g_z * mk * ((i - KD // 2) * DD).to(tl.float32)
                        gs_y += g_y * mk * ((j - KH // 2) * DH).to(tl.float32)
                        gs_x += g_x * mk * ((l - KW // 2) * DW).to(tl.float32)
                if NEED_MASK:
                    tl.store(gmask_ptr + mask_row + k * L, g_m, mask=m_ok)

    if NEED_COORD and not IS_OFFSET:
        # size channel ch collects the axes it scales (mode x: y and x share channel 0)
        for ch in tl.static_range(SX_CH + 1):
            g_s = tl.zeros((BLOCK_M,), tl.float32)
            if SZ_CH == ch:
                g_s += gs_z
            if SY_CH == ch:
                g_s += gs_y
            if SX_CH == ch:
                g_s += gs_x
            if K_FIRST > 0:                     # the earlier launches' kernel points
                g_s += tl.load(gcoord_ptr + coord_row + ch * L, mask=m_ok, other=0.0)
            tl.store(gcoord_ptr + coord_row + ch * L, g_s, mask=m_ok)


@triton.jit
def d2conv_bwd_weight_kernel(
    x_ptr,       # input, channels-last (N, T, H, W, C)
    coord_ptr,   # offset (N, G*K*3, To, Ho, Wo) or size (N, G*NS, To, Ho, Wo)
    mask_ptr,    # (N, G*K, To, Ho, Wo), or any pointer when not HAS_MASK
    go_ptr,      # grad of the output, channels-last (N, To, Ho, Wo, Co)
    gw_ptr,      # fp32 (groups, K, Cg, Cog), zeroed, accumulated with atomics
    gb_ptr,      # fp32 (Co,), zeroed, accumulated with atomics (when HAS_BIAS)
    M, C, T, H, W, To, Ho, Wo, Co, Cg, Cog, Cpg, SEG, G, COORD_CH, M_BUCKET,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr, SX_CH: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    K: tl.constexpr = KD * KH * KW
    o_tiles = tl.cdiv(Cog, BLOCK_O)
    c_tiles = tl.cdiv(SEG, BLOCK_C)
    gr = tl.program_id(0) // o_tiles            # conv group
    offs_o = tl.program_id(0) % o_tiles * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < Cog
    seg = tl.program_id(1) // c_tiles
    c0 = tl.program_id(1) % c_tiles * BLOCK_C
    offs_c = c0 + tl.arange(0, BLOCK_C)         # within the segment
    ch_ok = offs_c < SEG
    c_first = gr * Cg + seg * SEG
    g = c_first // Cpg                          # offset group

    # this program's share of the voxel blocks
    m_blocks = tl.cdiv(M, BLOCK_M)
    per_split = tl.cdiv(m_blocks, tl.num_programs(2))
    b_begin = tl.program_id(2) * per_split
    b_end = tl.minimum(b_begin + per_split, m_blocks)
    L = To * Ho * Wo

    for TAPS in tl.static_range(8):
        for r in range(class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)):
            i, j, l = class_point(r, TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
            k = (i * KH + j) * KW + l
            acc = tl.zeros((BLOCK_C, BLOCK_O), tl.float32)
            for b in range(b_begin, b_end):
                offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
                m_ok = offs_m < M
                n = offs_m // L
                sp = offs_m % L
                n64 = n.to(tl.int64)
                coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
                mask_row = (n64 * (G * K) + g * K) * L + sp
                s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, m_ok, SZ_CH, SY_CH, SX_CH)
                row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale = kernel_point(
                    coord_ptr, coord_row, mask_ptr, mask_row, L, m_ok, n64, i, j, l,
                    sp // (Wo * Ho), sp // Wo % Ho, sp % Wo, s_z, s_y, s_x, C, T, H, W,
                    KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW, IS_OFFSET, HAS_MASK, TAPS)
                a = gather_tile(x_ptr, row0, c_first + offs_c, ch_ok, H * W * C, W * C, C,
                                fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale, TAPS)
                go = tl.load(go_ptr + offs_m.to(tl.int64)[:, None] * Co
                             + (gr * Cog + offs_o)[None, :],
                             mask=m_ok[:, None] & o_ok[None, :], other=0.0)
                acc = tl.dot(tl.trans(a.to(go.dtype)), go, acc, input_precision=DOT_PRECISION)
            w_row = (gr * K + k) * Cg + seg * SEG
            tl.atomic_add(gw_ptr + (w_row + offs_c)[:, None] * Cog + offs_o[None, :], acc,
                          mask=ch_ok[:, None] & o_ok[None, :], sem="relaxed")
    if HAS_BIAS:
        if tl.program_id(1) == 0:               # the first channel block sums grad_out
            g_b = tl.zeros((BLOCK_O,), tl.float32)
            for b in range(b_begin, b_end):
                offs_m = b * BLOCK_M + tl.arange(0, BLOCK_M)
                go = tl.load(go_ptr + offs_m.to(tl.int64)[:, None] * Co
                             + (gr * Cog + offs_o)[None, :],
                             mask=(offs_m < M)[:, None] & o_ok[None, :], other=0.0)
                g_b += tl.sum(go.to(tl.float32), axis=0)
            tl.atomic_add(gb_ptr + gr * Cog + offs_o, g_b, mask=o_ok, sem="relaxed")


d2conv_bwd_data_tuned = triton.autotune(
    configs.all_candidates("BWD_DATA"), key=configs.KEY, restore_value=["gx_ptr", "gcoord_ptr"],
    prune_configs_by={"early_config_prune": configs.pruner("BWD_DATA")})(d2conv_bwd_data_kernel)
d2conv_bwd_weight_tuned = triton.autotune(
    configs.all_candidates("BWD_WEIGHT"), key=configs.KEY, reset_to_zero=["gw_ptr", "gb_ptr"],
    prune_configs_by={"early_config_prune": configs.pruner("BWD_WEIGHT")})(d2conv_bwd_weight_kernel)


def _programs_per_device(device):
    """Programs to aim for in the weight kernel: two per SM. More programs mean shorter voxel
    ranges and more fp32 atomics of partial sums (at rf2 on an H100: 1 per SM 2.31 ms, 2 1.89 ms,
    4 2.05 ms)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2    # the interpreter: enough to exercise the split


# bytes of column gradient per data-kernel launch (at least one kernel point's; environment
# D2CONV_GCOL_MIB). Fewer launches are faster (rf2, bf16, H100, one kernel point is 25 MiB: 27
# launches 4.80 ms, 14 3.93, 6 3.40, 1 3.17) but hold more memory: with 128 MiB rf2's extra
# peak is predicted at ~210 MiB, dense cuDNN's 157 (bench/NOTES.md, session 9)
GCOL_BUDGET = int(os.environ.get("D2CONV_GCOL_MIB", "128")) * 2**20


def points_per_launch(M, C, K, itemsize):
    """Kernel points per data-kernel launch: as many as GCOL_BUDGET holds, at least one."""
    return max(1, min(K, GCOL_BUDGET // (M * C * itemsize)))


def deterministic(device, need_input):
    """Whether the backward must be deterministic (``torch.use_deterministic_algorithms``) on a
    GPU. The weight and bias gradients then take one program per weight tile (no atomics across
    programs: bitwise reproducible, slower); the input gradient, a scatter with fp32 atomics, has
    no deterministic implementation: RuntimeError (a warning in warn_only mode). The size, offset
    and mask gradients are plain stores, the forward has no atomics: both always reproducible.
    Under the Triton interpreter programs run one after another, so everything is reproducible.
    """
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return False
    if need_input:
        message = ("deform_conv3d / d2conv3d backward: the input gradient is accumulated with "
                   "fp32 atomics and has no deterministic implementation (the weight, bias, "
                   "offset/size and mask gradients do); detach the input, or turn off "
                   "torch.use_deterministic_algorithms for this op")
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message)
        else:
            raise RuntimeError(message)
    return True


def d2conv_bwd(geo, grad_out, input, coords, weight, mask, mode, has_bias,
               need_input, need_coords, need_mask, need_weight):
    """Gradients of deform_conv3d / d2conv3d.

    Returns (grad_input, grad_coords, grad_mask, grad_weight, grad_bias); a gradient that is not
    needed (or has no input, as grad_bias without bias) is None. See ``deterministic`` for
    ``torch.use_deterministic_algorithms(True)``.
    """
    args, x_cl, w_r = kernel_args(geo, input, coords, weight, mask, mode, backward=True)
    dev, dtype = input.device, input.dtype
    reproducible = deterministic(dev, need_input)
    go = grad_out.permute(0, 2, 3, 4, 1).contiguous()
    N, C, T, H, W = input.shape
    groups, K, Cg, Cog = w_r.shape
    grad_input = grad_coords = grad_mask = grad_weight = grad_bias = None
    need_mask = need_mask and mask is not None

    if need_input or need_coords or need_mask:
        # channels-last memory: (N, T, H, W, C) in the kernel's eyes
        gx = (torch.empty((N, C, T, H, W), device=dev, dtype=torch.float32,
                          memory_format=torch.channels_last_3d).zero_() if need_input else None)
        # sizes are summed over kernel points, across launches when there are several: fp32
        gcoord = (torch.empty_like(args["coord_ptr"],
                                   dtype=torch.float32 if mode != "offset" else None)
                  if need_coords else None)
        gmask = torch.empty_like(args["mask_ptr"]) if need_mask else None
        unused = torch.empty(1, device=dev, dtype=torch.float32)
        data_args = dict(args, gx_ptr=gx if need_input else unused,
                         gcoord_ptr=gcoord if need_coords else unused,
                         gmask_ptr=gmask if need_mask else unused,
                         NEED_INPUT=need_input, NEED_COORD=need_coords, NEED_MASK=need_mask)
        M = args["M"]
        go_g = go.view(M, groups, Cog).transpose(0, 1)      # (groups, M, Cog)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), geo.offset_groups)

        step = points_per_launch(M, C, K, go.element_size())
        for k0 in range(0, K, step):
            kc = min(step, K - k0)
            # the column gradient of kernel points k0 .. k0+kc-1, (groups, M, kc*Cg): one GEMM
            w_t = w_r[:, k0:k0 + kc].reshape(groups, kc * Cg, Cog).transpose(1, 2)
            gcol = torch.matmul(go_g, w_t).contiguous()
            data_args.update(gcol_ptr=gcol, K_FIRST=k0, KC=kc, GCOL_M=kc * Cg,
                             GCOL_G=M * kc * Cg)
            configs.launch(d2conv_bwd_data_kernel, d2conv_bwd_data_tuned, "BWD_DATA", grid,
                           data_args)
            del gcol, data_args["gcol_ptr"]     # free before the next GEMM: one chunk at a time
        if need_input:
            grad_input = gx.to(dtype)
        if need_coords:
            grad_coords = gcoord.to(coords.dtype)
        grad_mask = gmask

    if need_weight or has_bias:
        gw = torch.zeros((groups, K, Cg, Cog), device=dev, dtype=torch.float32)
        gb = torch.zeros((geo.Co,), device=dev, dtype=torch.float32)
        weight_args = dict(args, go_ptr=go, gw_ptr=gw, gb_ptr=gb, HAS_BIAS=has_bias)
        # deterministic: one program per weight tile, so every element gets exactly one atomic
        target = 1 if reproducible else _programs_per_device(dev)

        def grid(meta):
            base = (groups * triton.cdiv(Cog, meta["BLOCK_O"])
                    * (Cg // args["SEG"]) * triton.cdiv(args["SEG"], meta["BLOCK_C"]))
            split = max(1, min(triton.cdiv(args["M"], meta["BLOCK_M"]), triton.cdiv(target, base)))
            return (groups * triton.cdiv(Cog, meta["BLOCK_O"]),
                    (Cg // args["SEG"]) * triton.cdiv(args["SEG"], meta["BLOCK_C"]), split)

        configs.launch(d2conv_bwd_weight_kernel, d2conv_bwd_weight_tuned, "BWD_WEIGHT", grid,
                       weight_args)
        if need_weight:
            grad_weight = gw.permute(0, 3, 2, 1).reshape(weight.shape).to(dtype).contiguous()
        if has_bias:
            grad_bias = gb.to(dtype)
    return grad_input, grad_coords, grad_mask, grad_weight, grad_bias
