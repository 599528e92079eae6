"""Backward: one Triton kernel between two cuBLAS GEMMs, over a few kernel points at a time (at
most GCOL_BUDGET bytes of columns exist at once). With A[m, (k, c)] = mask * value, the sampled
columns of the forward, and gcol = grad_out @ Wt, their gradient:

  gcol = grad_out @ Wt[points]        (GEMM) into a buffer col, (groups, M, points*Cg)
  data kernel, one program per (voxel block, offset group):
    grad_input  += scatter of mask * corner_weight * gcol into the 8 corners (fp32 atomics,
                   channel-contiguous; int64 fixed point in deterministic mode)
    grad_mask    = sum_c gcol * value
    grad_offset  = mask * sum_c gcol * dvalue/dposition, or for D²Conv directly
    grad_size    = sum_k (index - centre) * dilation * grad_position_k (no offset tensor)
    col          = A[:, points]       (overwriting gcol in place, tile by tile, once read)
  grad_weight[points] = col^T @ grad_out   (GEMM);  grad_bias = sum_m grad_out
The columns are gathered once, by the kernel that already loads their corners, and both
products run on cuBLAS (docs/design.md#data-kernel). In deterministic mode (D²Conv modes), or with
settings.input_grad() "pull", the input gradient is made instead, from the same column gradient and
before the data kernel overwrites it, by kernels/input_grad.py without atomics.
"""
import torch
import triton
import triton.language as tl

from . import configs, input_grad, settings, tuning
from .checks import OFFSET_AXES
from .launch import LaunchGeometry, cdiv, channels_last, weight_tiles
from .sampling import (class_point, class_points, gather_dot, gather_tile, kernel_point,
                       load_sizes, output_voxels, scatter_tile)


@triton.jit(do_not_specialize=["K_FIRST", "KC"])
def d2conv_bwd_data_kernel(
    x_ptr,       # input, channels-last (N, T, H, W, C)
    coord_ptr,   # offset (N, G*K*P, To, Ho, Wo) (P = SX_CH + 1) or size (N, G*NS, To, Ho, Wo)
    mask_ptr,    # (N, G*K, To, Ho, Wo), or any pointer when not HAS_MASK
    col_ptr,     # (groups, M, KC, Cg) for kernel points K_FIRST .. K_FIRST+KC-1: holds the
                 # column gradient (read when NEED_INPUT, NEED_COORD or NEED_MASK), and is
                 # overwritten with the sampled columns mask * value (when NEED_COLUMN)
    gx_ptr,      # fp32 (N, T, H, W, C), zeroed, accumulated with atomics (when NEED_INPUT);
                 # int64 in fixed point when FIXED_POINT
    gx_scale_ptr,  # fp32 (1,): the fixed-point scale, a power of two (when FIXED_POINT)
    gcoord_ptr,  # like coord_ptr (when NEED_COORD); fp32 and accumulated for sizes when K_FIRST > 0
    gmask_ptr,   # like mask_ptr (when NEED_MASK)
    M, C, T, H, W, To, Ho, Wo, Co, Cg, Cog, Cpg, SEG, G, COORD_CH, M_BUCKET,
    K_FIRST, KC,                # this launch's kernel points
    COL_M, COL_G,               # col's strides per voxel (KC*Cg) and per conv group (M*KC*Cg)
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr, SX_CH: tl.constexpr,
    HAS_MASK: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_COORD: tl.constexpr,
    NEED_MASK: tl.constexpr, NEED_COLUMN: tl.constexpr, FIXED_POINT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,    # unused here (the products are GEMMs around the launch);
                                    # it picks the config class
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    K: tl.constexpr = KD * KH * KW
    pid_m = tl.program_id(0)
    g = tl.program_id(1)                        # offset group

    L = To * Ho * Wo
    offs_m, m_ok, n64, sp, to, ho, wo = output_voxels(pid_m, M, To, Ho, Wo, BLOCK_M)
    col_m = offs_m.to(tl.int64) * COL_M
    offs_c = tl.arange(0, BLOCK_C)

    coord_row = (n64 * COORD_CH + g * (COORD_CH // G)) * L + sp
    mask_row = (n64 * (G * K) + g * K) * L + sp
    s_z, s_y, s_x = load_sizes(coord_ptr, coord_row, L, m_ok, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
    gs_z = tl.zeros((BLOCK_M,), tl.float32)     # D²Conv: gradient of each axis' scale
    gs_y = tl.zeros((BLOCK_M,), tl.float32)
    gs_x = tl.zeros((BLOCK_M,), tl.float32)
    fixed_scale = 1.0
    if FIXED_POINT:
        fixed_scale = tl.load(gx_scale_ptr)
    for TAPS in tl.static_range(8):
        for r in range(class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)):
            i, j, l = class_point(r, TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH)
            k = (i * KH + j) * KW + l
            if (k >= K_FIRST) & (k < K_FIRST + KC):
                row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, mk = kernel_point(
                    coord_ptr, coord_row, mask_ptr, mask_row, L, m_ok, n64, i, j, l, to, ho, wo,
                    s_z, s_y, s_x, C, T, H, W, KD, KH, KW, SD, SH, SW, PD, PH, PW, DD, DH, DW,
                    IS_OFFSET, SZ_CH, SY_CH, SX_CH, HAS_MASK, TAPS)
                # unreduced d loss / d mask and d loss / d position (before the mask)
                t_m = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                t_z = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                t_y = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                t_x = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
                # the offset group's channels in segments that each sit inside one conv group
                for seg in range(0, Cpg // SEG):
                    c_first = g * Cpg + seg * SEG
                    gr = c_first // Cg
                    col_row = (gr.to(tl.int64) * COL_G + col_m
                               + ((k - K_FIRST) * Cg + c_first - gr * Cg))
                    for c0 in range(0, SEG, BLOCK_C):
                        ch_ok = c0 + offs_c < SEG
                        # one pointer tile for the load and the store below, so that each
                        # element is stored by the thread that loaded it (same layout)
                        col_tile = col_ptr + col_row[:, None] + (c0 + offs_c)[None, :]
                        tile_ok = m_ok[:, None] & ch_ok[None, :]
                        if NEED_INPUT or NEED_COORD or NEED_MASK:
                            gcol = tl.load(col_tile, mask=tile_ok, other=0.0).to(tl.float32)
                        if NEED_COORD or NEED_MASK:
                            t_m, t_z, t_y, t_x, value = gather_dot(
                                x_ptr, row0, c_first + c0 + offs_c, ch_ok, H * W * C, W * C, C,
                                gcol, t_m, t_z, t_y, t_x, fz, fy, fx, okz0, okz1, oky0, oky1,
                                okx0, okx1, TAPS)
                            column = value * mk[:, None]
                        elif NEED_COLUMN:
                            column = gather_tile(x_ptr, row0, c_first + c0 + offs_c, ch_ok,
                                                 H * W * C, W * C, C, fz, fy, fx, okz0, okz1,
                                                 oky0, oky1, okx0, okx1, mk, TAPS)
                        if NEED_COLUMN:
                            tl.store(col_tile, column.to(col_ptr.dtype.element_ty), mask=tile_ok)
                        if NEED_INPUT:
                            scatter_tile(gx_ptr, row0, c_first + c0 + offs_c, ch_ok, H * W * C,
                                         W * C, C, gcol, fz, fy, fx, okz0, okz1, oky0, oky1,
                                         okx0, okx1, mk, fixed_scale, FIXED_POINT, TAPS)
                g_m = tl.sum(t_m, axis=1)
                g_z = tl.sum(t_z, axis=1)
                g_y = tl.sum(t_y, axis=1)
                g_x = tl.sum(t_x, axis=1)
                if NEED_COORD:
                    if IS_OFFSET:   # channel k*(SX_CH + 1) + component, per moved axis
                        point_row = coord_row + k * (SX_CH + 1) * L
                        if SZ_CH >= 0:
                            tl.store(gcoord_ptr + point_row + SZ_CH * L, g_z * mk, mask=m_ok)
                        tl.store(gcoord_ptr + point_row + SY_CH * L, g_y * mk, mask=m_ok)
                        tl.store(gcoord_ptr + point_row + SX_CH * L, g_x * mk, mask=m_ok)
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


def points_per_launch(M, C, K, itemsize):
    """Kernel points per data-kernel launch: as many as settings.gcol_bytes() of columns hold (at
    least one). Fewer launches are faster but hold more memory: at rf2 in bf16 one kernel
    point's columns are 25 MiB; 128 MiB, the default, keeps the backward's extra peak near dense
    cuDNN's (docs/design.md#column-gradient-in-chunks)."""
    return max(1, min(K, settings.gcol_bytes() // (M * C * itemsize)))


def deterministic(device):
    """Whether the backward must be deterministic (``torch.use_deterministic_algorithms``): on a
    GPU, the input gradient is then pulled (D²Conv modes, kernels/input_grad.py: no atomics) or
    accumulated in fixed point (free offsets, or sizes spread too wide for the pull: int64
    atomics, whose sums do not depend on their order; twice the bytes of the fp32 atomics used
    otherwise). Everything else is reproducible anyway: the weight gradient (cuBLAS GEMMs, each
    writing its own kernel points), the bias gradient (a sum), the size, offset and mask
    gradients (plain stores) and the forward (no atomics). Under the Triton interpreter programs
    run one after another."""
    return device.type == "cuda" and torch.are_deterministic_algorithms_enabled()


def fixed_point_scale(go, weight, mask, samples):
    """The input gradient's fixed-point scale in deterministic mode, a power of two as a (1,) fp32
    tensor (no host synchronisation): 2^62 over a bound on every sum of the input gradient.
    Each column-gradient element is at most max_m ||grad_out[m]||_1 * max |weight|; an input
    element takes at most ``samples`` (voxels x kernel points) of them, times a corner weight
    <= 1 and the mask. With the sum bounded by 2^62 (int64 holds 2^63) each contribution keeps
    about 62 - log2(bound) fractional bits: finer than fp32's rounding of the sum. Non-finite
    gradients give a NaN scale, and so a NaN input gradient."""
    bound = go.abs().sum(dim=-1, dtype=torch.float32).amax() * weight.abs().amax().float()
    if mask is not None:
        bound = bound * mask.abs().amax().float()
    bound = bound * samples
    exponent = (62 - torch.ceil(torch.log2(bound))).clamp(-100, 100)     # bound 0: 2^100
    exponent = torch.where(torch.isfinite(bound), exponent, float("nan"))
    return torch.exp2(exponent).reshape(1)


def tuned_configs(data_args, pull, run_data_kernel, run):
    """(the data kernel's config, the pulled input gradient's or None) for one backward: pinned
    or each kernel's default when not tuning (``configs.pinned``); else picked by
    ``tuning.pick`` on the whole backward, ``run(data_config, input_config)``: the data kernel's
    first (with the pull's default), then the pull's with it."""
    data = configs.pinned("BWD_DATA", data_args)
    pulled = configs.pinned("BWD_INPUT", data_args) if pull else None
    if data is not None and (pulled is not None or not pull):
        return data, pulled
    extra = (settings.gcol_bytes(), pull)       # what else the whole backward's time depends on
    if data is None and not run_data_kernel:
        data = configs.candidates("BWD_DATA", data_args)[0]       # not launched: not timed
    elif data is None:
        first_pulled = (pulled or configs.candidates("BWD_INPUT", data_args)[0]) if pull else None
        data = tuning.pick("BWD_DATA", configs.tune_key("BWD_DATA", data_args, *extra),
                           lambda: configs.candidates("BWD_DATA", data_args),
                           lambda config: run(config, first_pulled))
    if pull and pulled is None:
        pulled = tuning.pick("BWD_INPUT", configs.tune_key("BWD_INPUT", data_args, *extra),
                             lambda: configs.candidates("BWD_INPUT", data_args),
                             lambda config: run(data, config))
    return data, pulled


def d2conv_bwd(geo, grad_out, input, coords, weight, mask, mode, *, need_input, need_coords,
               need_weight, need_bias, need_mask, data_config=None, input_config=None):
    """Gradients of deform_conv3d / d2conv3d, in the order of the op's arguments:
    (grad_input, grad_coords, grad_weight, grad_bias, grad_mask). A gradient that is not asked
    for (or has no argument: grad_mask without a mask) is None; grad_bias is the sum of grad_out.
    See ``deterministic`` for ``torch.use_deterministic_algorithms(True)``; the module's docstring
    for the steps. The kernels' configs: ``data_config`` and ``input_config`` where given, else
    ``tuned_configs``'s.
    """
    shape = LaunchGeometry.of(geo, mode, coords, mask, input.dtype)
    dev, dtype = input.device, input.dtype
    x_cl = channels_last(input)
    w_r = weight_tiles(weight, geo.groups)          # (groups, K, Cg, Cog)
    coords = coords.contiguous()
    mask = mask.contiguous() if mask is not None else None
    # the pulled input gradient has no atomics: deterministic without fixed point
    reproducible = deterministic(dev)
    bounds = input_grad.choose(mode, reproducible, coords, geo) if need_input else None
    pull = bounds is not None
    scatter = need_input and not pull       # by the data kernel's atomics
    fixed_point = scatter and reproducible
    go = channels_last(grad_out)
    N, C, T, H, W = input.shape
    groups, K, Cg, Cog = w_r.shape
    M = shape.M
    go_g = go.view(M, groups, Cog).transpose(0, 1)          # (groups, M, Cog)
    grad_input = grad_coords = grad_weight = grad_bias = grad_mask = None
    need_mask = need_mask and mask is not None
    need_gcol = need_input or need_coords or need_mask      # the column gradient is read

    if need_gcol or need_weight:
        # channels-last memory: (N, T, H, W, C) in the kernel's eyes
        gx = (torch.empty((N, C, T, H, W), device=dev,
                          dtype=torch.int64 if fixed_point else torch.float32,
                          memory_format=torch.channels_last_3d).zero_() if need_input else None)
        # sizes are summed over kernel points, across launches when there are several: fp32
        gcoord = (torch.empty_like(coords, dtype=None if mode in OFFSET_AXES else torch.float32)
                  if need_coords else None)
        gmask = torch.empty_like(mask) if need_mask else None
        step = points_per_launch(M, C, K, go.element_size())
        # in several chunks the weight GEMMs write into one buffer; in one, the GEMM's result is it
        gw = (torch.empty((groups, K, Cg, Cog), device=dev, dtype=dtype)
              if need_weight and step < K else None)
        unused = torch.empty(1, device=dev, dtype=torch.float32)
        # read by the kernel only in fixed point
        gx_scale = fixed_point_scale(go, weight, mask, M * K) if fixed_point else unused
        data_args = dict(shape.args(), x_ptr=x_cl, coord_ptr=coords,
                         mask_ptr=mask if mask is not None else x_cl,
                         gx_ptr=gx if need_input else unused, gx_scale_ptr=gx_scale,
                         gcoord_ptr=gcoord if need_coords else unused,
                         gmask_ptr=gmask if need_mask else unused,
                         NEED_INPUT=scatter, NEED_COORD=need_coords, NEED_MASK=need_mask,
                         NEED_COLUMN=need_weight, FIXED_POINT=fixed_point)
        run_data_kernel = scatter or need_coords or need_mask or need_weight
        if data_config is None or (pull and input_config is None):
            data_config, input_config = tuned_configs(
                data_args, pull, run_data_kernel,
                lambda data, pulled: d2conv_bwd(
                    geo, grad_out, input, coords, weight, mask, mode, need_input=need_input,
                    need_coords=need_coords, need_weight=need_weight, need_bias=need_bias,
                    need_mask=need_mask, data_config=data, input_config=pulled))

        def grid(meta):
            return (cdiv(M, meta["BLOCK_M"]), geo.offset_groups)

        for k0 in range(0, K, step):
            kc = min(step, K - k0)
            if need_gcol:   # the column gradient of kernel points k0 .. k0+kc-1: one GEMM
                w_t = w_r[:, k0:k0 + kc].reshape(groups, kc * Cg, Cog).transpose(1, 2)
                col = torch.matmul(go_g, w_t).contiguous()
            else:
                col = torch.empty((groups, M, kc * Cg), device=dev, dtype=dtype)
            if pull:        # before the data kernel overwrites col with the columns
                input_grad.launch(shape, coords, mask, col, gx, bounds, k0, kc, input_config)
            data_args.update(col_ptr=col, K_FIRST=k0, KC=kc, COL_M=kc * Cg, COL_G=M * kc * Cg)
            if run_data_kernel:
                configs.launch(d2conv_bwd_data_kernel, "BWD_DATA", grid, data_args,
                               config=data_config)
            if need_weight:     # col now holds the sampled columns
                part = torch.matmul(col.transpose(1, 2), go_g).view(groups, kc, Cg, Cog)
                if gw is None:
                    gw = part
                else:
                    gw[:, k0:k0 + kc] = part
            del col, data_args["col_ptr"]   # free before the next GEMM: one chunk at a time
        if need_input:
            grad_input = (gx.float() / gx_scale).to(dtype) if fixed_point else gx.to(dtype)
        if need_coords:
            grad_coords = gcoord.to(coords.dtype)
        grad_mask = gmask
        if need_weight:
            grad_weight = gw.permute(0, 3, 2, 1).reshape(weight.shape).contiguous()
    if need_bias:
        grad_bias = go.view(M, geo.Co).sum(0)       # accumulated in fp32 for 16-bit dtypes too
    return grad_input, grad_coords, grad_weight, grad_bias, grad_mask
