"""GroupNorm forward and backward (``kernels.group_norm``), optionally of ReLU(input) and of the
input plus a per-channel input bias (a conv's bias), with every (sample, group) reduction split
over the spatial axis so that a few large groups (the refine units' GroupNorm(1, 256) on
(2, 256, 8, 120, 216)) still spread over the whole GPU.

The input is viewed as (N, C, S), S the product of the spatial sizes, in one of two layouts:
contiguous (positions contiguous, channel stride S) or channels-last (channels contiguous,
position stride C; also any input without spatial extent). Each kernel takes the layout as a
constexpr and moves tiles along the contiguous axis: [BLOCK_S, BLOCK_C] channels-last,
[BLOCK_C, BLOCK_S] contiguous. G groups of Cg = C / G channels; x below is input + input_bias[c]
in fp32 (HAS_INPUT_BIAS; each pass that reads the input adds it to every tile it loads), ReLU
applied with relu.

Forward, three launches (a program streams up to PROGRAM_BYTES of each tensor it reads):
  _gn_stats_kernel      one program per chunk of a group (n, g): C_CHUNK channels x S_CHUNK
                        positions -> their mean and M2 (sum of squared deviations), from per-lane
                        sums shifted by the lane's first value, the lanes merged exactly at the end
  _gn_combine_kernel    one per (n, g): Chan's formula over the chunks -> mean, rstd (N, G)
  _gn_normalise_kernel  one per (n, channel block, spatial chunk): y = (x - mean) * rstd * w + b
Backward (g = grad_out, xhat = (x - mean) * rstd, M = Cg * S), four launches (five with the
input bias's gradient):
  _gn_grad_sums_kernel      per (n, channel block, spatial chunk): sum_s g and sum_s g * xhat of
                            each channel -> partial sums (2, N, N_SC, C)
  _gn_grad_channels_kernel  per channel block: A = sum_s g, B = sum_s g * xhat (N, C);
                            grad_bias = sum_n A, grad_weight = sum_n B
  _gn_grad_groups_kernel    per (n, g): m1 = sum_c w A / M, m2 = sum_c w B / M
  _gn_grad_input_kernel     per (n, channel block, spatial chunk):
                            grad_input = rstd * (w * g - m1 - xhat * m2), times (x > 0 before
                            the ReLU) with relu; with the input bias's gradient, also the sum
                            of its fp32 grad_input over each channel -> partial sums (N, N_SC, C)
                            (grad_input itself stored only where needed)
  _gn_grad_channels_kernel  once more with the input bias's gradient, on those partial sums
                            alone: grad_input_bias = their sum over samples and chunks
Bytes moved per element (b bytes an element): the forward reads the input twice and writes the
output, 3b; the backward reads the input and grad_out twice and writes grad_input, 5b (3b
without grad_input). The input bias adds C values to each pass's reads and, for its gradient,
the partial sums (N, N_SC, C) fp32, written once and read once: in bf16 channels-last, 1.7 MB
(0.26% of the last pass's bytes) at (2, 256, 8, 120, 216), 0.2 MB (2.1%) at (2, 256, 2, 30, 54).
The elementwise passes take their programs in the reverse order of the reductions before them,
so that they start on what those left in L2. No atomics: every result is written once, the same
on every run.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from . import settings
from .launch import cdiv, next_power_of_2


@triton.jit
def _tile(ptr, c, s, c_end, s_end, stride_r, CHANNELS_LAST: tl.constexpr,
          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pointers and mask of the tile of channels c.. and positions s.. of one sample (``ptr`` at
    its channel 0, position 0; ``stride_r`` the stride of the non-contiguous axis)."""
    i_c = tl.arange(0, BLOCK_C)
    i_s = tl.arange(0, BLOCK_S)
    if CHANNELS_LAST:       # [BLOCK_S, BLOCK_C]
        p = ptr + (tl.cast(s, tl.int64) * stride_r + c)
        ptrs = p + (i_s[:, None] * stride_r + i_c[None, :])
        mask = (s + i_s < s_end)[:, None] & (c + i_c < c_end)[None, :]
    else:                   # [BLOCK_C, BLOCK_S]
        p = ptr + (tl.cast(c, tl.int64) * stride_r + s)
        ptrs = p + (i_c[:, None] * stride_r + i_s[None, :])
        mask = (c + i_c < c_end)[:, None] & (s + i_s < s_end)[None, :]
    return ptrs, mask


@triton.jit
def _per_channel(v, CHANNELS_LAST: tl.constexpr):
    """A [BLOCK_C] vector broadcast along a tile's positions."""
    if CHANNELS_LAST:
        return v[None, :]
    else:
        return v[:, None]


@triton.jit
def _block_of(pid, N_CB, N_SC, CHANNELS_LAST: tl.constexpr):
    """(sample, channel block, spatial chunk) of a program, numbered in memory order."""
    n = pid // (N_CB * N_SC)
    if CHANNELS_LAST:
        cb = pid % N_CB
        sc = (pid // N_CB) % N_SC
    else:
        sc = pid % N_SC
        cb = (pid // N_SC) % N_CB
    return n, cb, sc


@triton.jit
def _input_bias(ib_ptr, c, c_end, HAS_INPUT_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                BLOCK_C: tl.constexpr):
    """The input bias of channels c.. in fp32 (0 from c_end on), broadcast along a tile's
    positions; 0 without HAS_INPUT_BIAS."""
    if HAS_INPUT_BIAS:
        i_c = c + tl.arange(0, BLOCK_C)
        ib = tl.load(ib_ptr + i_c, mask=i_c < c_end, other=0.0).to(tl.float32)
        return _per_channel(ib, CHANNELS_LAST)
    else:
        return 0.0


@triton.jit
def _tile_zeros(CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """An fp32 accumulator of a tile's shape."""
    if CHANNELS_LAST:
        return tl.zeros((BLOCK_S, BLOCK_C), tl.float32)
    else:
        return tl.zeros((BLOCK_C, BLOCK_S), tl.float32)


@triton.jit
def _as_x(v, ib, RELU: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr):
    """A loaded input tile in fp32, plus ``ib`` (the input bias of its channels, broadcast along
    its positions) with HAS_INPUT_BIAS, ReLU applied with RELU."""
    x = v.to(tl.float32)
    if HAS_INPUT_BIAS:
        x += ib
    if RELU:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _chunk_tile(ptr, t, n_s, c_first, s_first, c_end, s_end, stride_r,
                CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pointers and mask of tile t of a chunk (channels c_first..c_end, positions
    s_first..s_end) taken n_s tiles along the positions per channel block."""
    cb = t // n_s
    return _tile(ptr, c_first + cb * BLOCK_C, s_first + (t - cb * n_s) * BLOCK_S, c_end, s_end,
                 stride_r, CHANNELS_LAST, BLOCK_C, BLOCK_S)


@triton.jit
def _gn_stats_kernel(
    x_ptr,      # input (N, C, S), contiguous or channels-last
    ib_ptr,     # input bias (C,), any float dtype (when HAS_INPUT_BIAS)
    part_ptr,   # fp32 (N*G, N_CC*N_SC, 2): mean and M2 of each chunk
    S, G, Cg_q,                 # Cg / CG_ALIGN (Cg, channels per group, in units of CG_ALIGN)
    TILES_C, TILES_S, N_CC, N_SC,   # a chunk's tiles along each axis; chunks along each axis
    stride_n_q, stride_r_q,     # strides of n and of the non-contiguous axis, in ALIGN elements
    RELU: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ALIGN: tl.constexpr, CG_ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # chunk (cc, sc) of group g: channels cc*C_CHUNK.. of the group, positions sc*S_CHUNK..;
    # programs numbered in memory order
    Cg = Cg_q * CG_ALIGN
    C_CHUNK = TILES_C * BLOCK_C
    S_CHUNK = TILES_S * BLOCK_S
    pid = tl.program_id(0)
    n = pid // (G * N_CC * N_SC)
    if CHANNELS_LAST:
        cc = pid % N_CC
        g = (pid // N_CC) % G
        sc = (pid // (N_CC * G)) % N_SC
    else:
        sc = pid % N_SC
        cc = (pid // N_SC) % N_CC
        g = (pid // (N_SC * N_CC)) % G
    stride_r = stride_r_q * ALIGN
    x_n = x_ptr + tl.cast(n, tl.int64) * stride_n_q * ALIGN
    c_first = g * Cg + cc * C_CHUNK
    c_len = tl.minimum(C_CHUNK, Cg - cc * C_CHUNK)
    s_first = sc * S_CHUNK
    s_len = tl.minimum(S_CHUNK, S - s_first)
    # the chunk's tiles, n_s per channel block; those past a last chunk's end are masked off
    n_s = TILES_S
    n_tiles = TILES_C * TILES_S

    c_end = c_first + c_len
    s_end = s_first + s_len

    # each lane sums its values shifted by its first one (a lane outside the chunk in the first
    # tile is outside it in every tile); the next tile is loaded before a tile is summed
    ptrs, mask = _tile(x_n, c_first, s_first, c_end, s_end, stride_r, CHANNELS_LAST,
                       BLOCK_C, BLOCK_S)
    shift = _as_x(tl.load(ptrs, mask=mask, other=0.0),
                  _input_bias(ib_ptr, c_first, c_end, HAS_INPUT_BIAS, CHANNELS_LAST, BLOCK_C),
                  RELU, HAS_INPUT_BIAS)
    s1 = tl.zeros_like(shift)
    s2 = tl.zeros_like(shift)
    ptrs, mask = _chunk_tile(x_n, 1, n_s, c_first, s_first, c_end, s_end, stride_r,
                             CHANNELS_LAST, BLOCK_C, BLOCK_S)
    v = tl.load(ptrs, mask=mask, other=0.0)
    for t in range(1, n_tiles):
        ptrs, next_mask = _chunk_tile(x_n, t + 1, n_s, c_first, s_first, c_end, s_end,
                                      stride_r, CHANNELS_LAST, BLOCK_C, BLOCK_S)
        next_v = tl.load(ptrs, mask=next_mask, other=0.0)
        ib = _input_bias(ib_ptr, c_first + (t // n_s) * BLOCK_C, c_end, HAS_INPUT_BIAS,
                         CHANNELS_LAST, BLOCK_C)      # of tile t's channels
        d = tl.where(mask, _as_x(v, ib, RELU, HAS_INPUT_BIAS) - shift, 0.0)
        s1 += d
        s2 += d * d
        v, mask = next_v, next_mask

    # values per lane: (channel blocks it is inside) x (spatial blocks it is inside); the lanes
    # merged by Chan's formula
    i_c = tl.arange(0, BLOCK_C)
    i_s = tl.arange(0, BLOCK_S)
    per_c = tl.maximum(c_len - i_c + BLOCK_C - 1, 0) // BLOCK_C
    per_s = tl.maximum(s_len - i_s + BLOCK_S - 1, 0) // BLOCK_S
    if CHANNELS_LAST:
        count = (per_s[:, None] * per_c[None, :]).to(tl.float32)
    else:
        count = (per_c[:, None] * per_s[None, :]).to(tl.float32)
    inv = tl.where(count > 0, 1.0 / tl.maximum(count, 1.0), 0.0)
    lane_mean = shift + s1 * inv
    lane_m2 = s2 - s1 * s1 * inv
    total = c_len.to(tl.float32) * s_len.to(tl.float32)
    mean = tl.sum(tl.sum(count * lane_mean, axis=1), axis=0) / total
    dev = lane_mean - mean
    m2 = tl.sum(tl.sum(lane_m2 + count * dev * dev, axis=1), axis=0)
    out = part_ptr + (tl.cast(n * G + g, tl.int64) * (N_CC * N_SC) + cc * N_SC + sc) * 2
    tl.store(out, mean)
    tl.store(out + 1, m2)


@triton.jit
def _chunk_count(p, Cg, S, C_CHUNK, S_CHUNK, N_SC):
    """Elements of chunk p = cc * N_SC + sc of a group."""
    cc = p // N_SC
    sc = p - cc * N_SC
    return (tl.minimum(C_CHUNK, Cg - cc * C_CHUNK).to(tl.float32)
            * tl.minimum(S_CHUNK, S - sc * S_CHUNK).to(tl.float32))


@triton.jit
def _gn_combine_kernel(
    part_ptr,   # fp32 (N*G, SPLIT, 2): mean and M2 of each chunk
    mean_ptr,   # fp32 (N*G,)
    rstd_ptr,   # fp32 (N*G,)
    S, Cg, C_CHUNK, S_CHUNK, N_SC, SPLIT, eps,
    BLOCK_P: tl.constexpr,
):
    ng = tl.program_id(0)
    part = part_ptr + tl.cast(ng, tl.int64) * SPLIT * 2
    i_p = tl.arange(0, BLOCK_P)
    total = tl.cast(Cg, tl.float32) * tl.cast(S, tl.float32)
    acc = tl.zeros((BLOCK_P,), tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        p = p0 + i_p
        ok = p < SPLIT
        count = _chunk_count(p, Cg, S, C_CHUNK, S_CHUNK, N_SC)
        acc += tl.where(ok, count * tl.load(part + p * 2, mask=ok, other=0.0), 0.0)
    mean = tl.sum(acc, axis=0) / total
    acc = tl.zeros((BLOCK_P,), tl.float32)
    for p0 in range(0, SPLIT, BLOCK_P):
        p = p0 + i_p
        ok = p < SPLIT
        count = _chunk_count(p, Cg, S, C_CHUNK, S_CHUNK, N_SC)
        dev = tl.load(part + p * 2, mask=ok, other=0.0) - mean
        acc += tl.where(ok, tl.load(part + p * 2 + 1, mask=ok, other=0.0) + count * dev * dev,
                        0.0)
    var = tl.maximum(tl.sum(acc, axis=0) / total, 0.0)
    tl.store(mean_ptr + ng, mean)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _gn_normalise_kernel(
    x_ptr,      # input (N, C, S), contiguous or channels-last
    y_ptr,      # output, same layout
    mean_ptr,   # fp32 (N, G)
    rstd_ptr,   # fp32 (N, G)
    w_ptr,      # (C,), any float dtype (when HAS_WEIGHT)
    b_ptr,      # (C,), any float dtype (when HAS_BIAS)
    ib_ptr,     # input bias (C,), any float dtype (when HAS_INPUT_BIAS)
    C, S, G, Cg, N_CB, N_SC, TILES_S,     # TILES_S tiles of BLOCK_S positions a chunk
    stride_n_q, stride_r_q,     # strides of n and of the non-contiguous axis, in ALIGN elements
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    HAS_INPUT_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)     # the statistics' last chunks first
    n, cb, sc = _block_of(pid, N_CB, N_SC, CHANNELS_LAST)
    stride_r = stride_r_q * ALIGN
    offset_n = tl.cast(n, tl.int64) * stride_n_q * ALIGN
    c = cb * BLOCK_C
    i_c = c + tl.arange(0, BLOCK_C)
    c_ok = i_c < C
    grp = n * G + i_c // Cg
    mean = tl.load(mean_ptr + grp, mask=c_ok, other=0.0)
    scale = tl.load(rstd_ptr + grp, mask=c_ok, other=0.0)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + i_c, mask=c_ok, other=0.0).to(tl.float32)
    shift = tl.zeros_like(scale)
    if HAS_BIAS:
        shift = tl.load(b_ptr + i_c, mask=c_ok, other=0.0).to(tl.float32)
    mean = _per_channel(mean, CHANNELS_LAST)
    scale = _per_channel(scale, CHANNELS_LAST)
    shift = _per_channel(shift, CHANNELS_LAST)
    ib = _input_bias(ib_ptr, c, C, HAS_INPUT_BIAS, CHANNELS_LAST, BLOCK_C)

    s_first = sc * TILES_S * BLOCK_S
    s_end = tl.minimum(s_first + TILES_S * BLOCK_S, S)
    ptrs, mask = _tile(x_ptr + offset_n, c, s_first, C, s_end, stride_r, CHANNELS_LAST,
                       BLOCK_C, BLOCK_S)
    v = tl.load(ptrs, mask=mask, other=0.0)
    for i in range(0, TILES_S):     # the next tile loaded before a tile is stored
        s = s_first + i * BLOCK_S       # tiles past S are masked off
        ptrs, next_mask = _tile(x_ptr + offset_n, c, s + BLOCK_S, C, s_end, stride_r,
                                CHANNELS_LAST, BLOCK_C, BLOCK_S)
        next_v = tl.load(ptrs, mask=next_mask, other=0.0)
        y = (_as_x(v, ib, RELU, HAS_INPUT_BIAS) - mean) * scale + shift
        out, _ = _tile(y_ptr + offset_n, c, s, C, s_end, stride_r, CHANNELS_LAST,
                       BLOCK_C, BLOCK_S)
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask)
        v, mask = next_v, next_mask


@triton.jit
def _gn_grad_sums_kernel(
    x_ptr,      # input (N, C, S), contiguous or channels-last
    g_ptr,      # grad_out, same layout
    mean_ptr,   # fp32 (N, G)
    rstd_ptr,   # fp32 (N, G)
    ib_ptr,     # input bias (C,), any float dtype (when HAS_INPUT_BIAS)
    part_ptr,   # fp32 (2, N, N_SC, C): sum of g and of g * xhat over each chunk
    N, C, S, G, Cg, N_CB, N_SC, TILES_S,  # TILES_S tiles of BLOCK_S positions a chunk
    stride_n_q, stride_r_q,     # strides of n and of the non-contiguous axis, in ALIGN elements
    RELU: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    n, cb, sc = _block_of(tl.program_id(0), N_CB, N_SC, CHANNELS_LAST)
    stride_r = stride_r_q * ALIGN
    offset_n = tl.cast(n, tl.int64) * stride_n_q * ALIGN
    c = cb * BLOCK_C
    i_c = c + tl.arange(0, BLOCK_C)
    c_ok = i_c < C
    grp = n * G + i_c // Cg
    mean = _per_channel(tl.load(mean_ptr + grp, mask=c_ok, other=0.0), CHANNELS_LAST)
    rstd = _per_channel(tl.load(rstd_ptr + grp, mask=c_ok, other=0.0), CHANNELS_LAST)
    ib = _input_bias(ib_ptr, c, C, HAS_INPUT_BIAS, CHANNELS_LAST, BLOCK_C)

    s_first = sc * TILES_S * BLOCK_S
    s_end = tl.minimum(s_first + TILES_S * BLOCK_S, S)
    sum_g = _tile_zeros(CHANNELS_LAST, BLOCK_C, BLOCK_S)
    sum_gx = tl.zeros_like(sum_g)
    ptrs, mask = _tile(x_ptr + offset_n, c, s_first, C, s_end, stride_r, CHANNELS_LAST,
                       BLOCK_C, BLOCK_S)
    g_ptrs, _ = _tile(g_ptr + offset_n, c, s_first, C, s_end, stride_r, CHANNELS_LAST,
                      BLOCK_C, BLOCK_S)
    v = tl.load(ptrs, mask=mask, other=0.0)
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    for i in range(0, TILES_S):     # the next tiles loaded before a tile is summed
        s = s_first + i * BLOCK_S       # tiles past S are masked off
        ptrs, next_mask = _tile(x_ptr + offset_n, c, s + BLOCK_S, C, s_end, stride_r,
                                CHANNELS_LAST, BLOCK_C, BLOCK_S)
        g_ptrs, _ = _tile(g_ptr + offset_n, c, s + BLOCK_S, C, s_end, stride_r,
                          CHANNELS_LAST, BLOCK_C, BLOCK_S)
        next_v = tl.load(ptrs, mask=next_mask, other=0.0)
        next_g = tl.load(g_ptrs, mask=next_mask, other=0.0)
        g32 = g.to(tl.float32)
        sum_g += g32
        sum_gx += g32 * ((_as_x(v, ib, RELU, HAS_INPUT_BIAS) - mean) * rstd)
        v, g, mask = next_v, next_g, next_mask
    axis: tl.constexpr = 0 if CHANNELS_LAST else 1
    out = part_ptr + (tl.cast(n, tl.int64) * N_SC + sc) * C + i_c
    tl.store(out, tl.sum(sum_g, axis=axis), mask=c_ok)
    tl.store(out + tl.cast(N, tl.int64) * N_SC * C, tl.sum(sum_gx, axis=axis), mask=c_ok)


@triton.jit
def _gn_grad_channels_kernel(
    part_ptr,   # fp32 (2, N, N_SC, C): sum of g and of g * xhat over each chunk; only the first
                # half when neither NEED_INPUT nor NEED_WEIGHT
    w_ptr,      # weight (C,), any float dtype (when HAS_WEIGHT)
    wsum_ptr,   # fp32 (2, N, C): w * A and w * B (when NEED_INPUT)
    gw_ptr,     # fp32 (C,): grad_weight = sum_n B (when NEED_WEIGHT)
    gb_ptr,     # fp32 (C,): grad_bias = sum_n A (when NEED_BIAS)
    N, C, N_SC,
    HAS_WEIGHT: tl.constexpr, NEED_INPUT: tl.constexpr, NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    i_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = i_c < C
    i_p = tl.arange(0, BLOCK_P)
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + i_c, mask=c_ok, other=0.0).to(tl.float32)
    second = tl.cast(N, tl.int64) * N_SC * C         # offset of the sums of g * xhat
    grad_w = tl.zeros((BLOCK_C,), tl.float32)
    grad_b = tl.zeros((BLOCK_C,), tl.float32)
    for n in range(N):
        acc_a = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        acc_b = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for p0 in range(0, N_SC, BLOCK_P):
            p = p0 + i_p
            ok = (p < N_SC)[:, None] & c_ok[None, :]
            ptrs = part_ptr + tl.cast(n * N_SC + p, tl.int64)[:, None] * C + i_c[None, :]
            acc_a += tl.load(ptrs, mask=ok, other=0.0)
            if NEED_INPUT or NEED_WEIGHT:
                acc_b += tl.load(ptrs + second, mask=ok, other=0.0)
        a = tl.sum(acc_a, axis=0)
        b = tl.sum(acc_b, axis=0)
        grad_b += a
        grad_w += b
        if NEED_INPUT:
            tl.store(wsum_ptr + n * C + i_c, w * a, mask=c_ok)
            tl.store(wsum_ptr + (N + n) * C + i_c, w * b, mask=c_ok)
    if NEED_WEIGHT:
        tl.store(gw_ptr + i_c, grad_w, mask=c_ok)
    if NEED_BIAS:
        tl.store(gb_ptr + i_c, grad_b, mask=c_ok)


@triton.jit
def _gn_grad_groups_kernel(
    wsum_ptr,   # fp32 (2, N, C): w * A and w * B
    m_ptr,      # fp32 (2, N*G): m1 = sum_c w A / M and m2 = sum_c w B / M of each group
    N, C, S, G, Cg,
    BLOCK_C: tl.constexpr,
):
    ng = tl.program_id(0)
    n = ng // G
    first = n * C + (ng % G) * Cg
    acc1 = tl.zeros((BLOCK_C,), tl.float32)
    acc2 = tl.zeros((BLOCK_C,), tl.float32)
    for c0 in range(0, Cg, BLOCK_C):
        i_c = c0 + tl.arange(0, BLOCK_C)
        ok = i_c < Cg
        acc1 += tl.load(wsum_ptr + first + i_c, mask=ok, other=0.0)
        acc2 += tl.load(wsum_ptr + N * C + first + i_c, mask=ok, other=0.0)
    total = tl.cast(Cg, tl.float32) * tl.cast(S, tl.float32)
    tl.store(m_ptr + ng, tl.sum(acc1, axis=0) / total)
    tl.store(m_ptr + N * G + ng, tl.sum(acc2, axis=0) / total)


@triton.jit
def _gn_grad_input_kernel(
    x_ptr,      # input (N, C, S), contiguous or channels-last
    g_ptr,      # grad_out, same layout
    dx_ptr,     # grad_input, same layout (when NEED_INPUT)
    mean_ptr,   # fp32 (N, G)
    rstd_ptr,   # fp32 (N, G)
    m_ptr,      # fp32 (2, N*G): m1, m2
    w_ptr,      # (C,), any float dtype (when HAS_WEIGHT)
    ib_ptr,     # input bias (C,), any float dtype (when HAS_INPUT_BIAS)
    dib_ptr,    # fp32 (N, N_SC, C): sum of grad_input over each chunk (when NEED_INPUT_BIAS)
    N, C, S, G, Cg, N_CB, N_SC, TILES_S,  # TILES_S tiles of BLOCK_S positions a chunk
    stride_n_q, stride_r_q,     # strides of n and of the non-contiguous axis, in ALIGN elements
    HAS_WEIGHT: tl.constexpr, RELU: tl.constexpr, HAS_INPUT_BIAS: tl.constexpr,
    NEED_INPUT: tl.constexpr, NEED_INPUT_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)     # the sums' last chunks first
    n, cb, sc = _block_of(pid, N_CB, N_SC, CHANNELS_LAST)
    stride_r = stride_r_q * ALIGN
    offset_n = tl.cast(n, tl.int64) * stride_n_q * ALIGN
    c = cb * BLOCK_C
    i_c = c + tl.arange(0, BLOCK_C)
    c_ok = i_c < C
    grp = n * G + i_c // Cg
    mean = _per_channel(tl.load(mean_ptr + grp, mask=c_ok, other=0.0), CHANNELS_LAST)
    rstd = tl.load(rstd_ptr + grp, mask=c_ok, other=0.0)
    w = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + i_c, mask=c_ok, other=0.0).to(tl.float32)
    # grad_input = rstd * w * g - rstd * m1 - (x - mean) * rstd^2 * m2
    w_rstd = _per_channel(w * rstd, CHANNELS_LAST)
    m1 = _per_channel(tl.load(m_ptr + grp, mask=c_ok, other=0.0) * rstd, CHANNELS_LAST)
    m2 = _per_channel(tl.load(m_ptr + N * G + grp, mask=c_ok, other=0.0) * rstd * rstd,
                      CHANNELS_LAST)
    ib = _input_bias(ib_ptr, c, C, HAS_INPUT_BIAS, CHANNELS_LAST, BLOCK_C)

    s_first = sc * TILES_S * BLOCK_S
    s_end = tl.minimum(s_first + TILES_S * BLOCK_S, S)
    sum_dx = _tile_zeros(CHANNELS_LAST, BLOCK_C, BLOCK_S)
    ptrs, mask = _tile(x_ptr + offset_n, c, s_first, C, s_end, stride_r, CHANNELS_LAST,
                       BLOCK_C, BLOCK_S)
    g_ptrs, _ = _tile(g_ptr + offset_n, c, s_first, C, s_end, stride_r, CHANNELS_LAST,
                      BLOCK_C, BLOCK_S)
    v = tl.load(ptrs, mask=mask, other=0.0)
    g = tl.load(g_ptrs, mask=mask, other=0.0)
    for i in range(0, TILES_S):     # the next tiles loaded before a tile is stored
        s = s_first + i * BLOCK_S       # tiles past S are masked off
        ptrs, next_mask = _tile(x_ptr + offset_n, c, s + BLOCK_S, C, s_end, stride_r,
                                CHANNELS_LAST, BLOCK_C, BLOCK_S)
        g_ptrs, _ = _tile(g_ptr + offset_n, c, s + BLOCK_S, C, s_end, stride_r,
                          CHANNELS_LAST, BLOCK_C, BLOCK_S)
        next_v = tl.load(ptrs, mask=next_mask, other=0.0)
        next_g = tl.load(g_ptrs, mask=next_mask, other=0.0)
        x = _as_x(v, ib, False, HAS_INPUT_BIAS)
        g32 = g.to(tl.float32)
        dx = w_rstd * g32 - m1 - (x - mean) * m2
        if RELU:    # where x > 0, ReLU(x) = x
            dx = tl.where(x > 0.0, dx, 0.0)
        if NEED_INPUT_BIAS:     # the masked-off lanes' dx is not 0
            sum_dx += tl.where(mask, dx, 0.0)
        if NEED_INPUT:
            out, _ = _tile(dx_ptr + offset_n, c, s, C, s_end, stride_r, CHANNELS_LAST,
                           BLOCK_C, BLOCK_S)
            tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        v, g, mask = next_v, next_g, next_mask
    if NEED_INPUT_BIAS:
        axis: tl.constexpr = 0 if CHANNELS_LAST else 1
        out = dib_ptr + (tl.cast(n, tl.int64) * N_SC + sc) * C + i_c
        tl.store(out, tl.sum(sum_dx, axis=axis), mask=c_ok)


# ---------------------------------------------------------------------------------------------
# host side

# bytes of a tile and 16-byte vectors a thread loads from each tensor per tile: the reductions
# keep fp32 accumulators per element, so they take one vector a thread, the elementwise passes
# two; each kernel loads the next tile before working on one
REDUCE_TILE_BYTES, REDUCE_VECTORS = 2048, 1
ELEMENTWISE_TILE_BYTES, ELEMENTWISE_VECTORS = 8192, 2
# bytes a program streams from each tensor it reads, at most; and the fewest programs wanted
# per SM where the tensor has that many tiles
PROGRAM_BYTES = 65536
PROGRAMS_PER_SM = 4
# the contiguous run of a tile along the positions of a contiguous layout, in bytes
ROW_BYTES = 2048
# the interpreter's tiles and tiles a program: small, so that test shapes run several chunks of
# several tiles, several channel blocks and masked tails
INTERPRETER_BLOCK_C, INTERPRETER_BLOCK_S, INTERPRETER_TILES = 8, 16, 3


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    """SMs of a CUDA device; an H100's or H200's 132 for other devices (launches captured on a
    machine without a GPU)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(kernel, programs, num_warps, **args):
    """One launch on a 1-D grid."""
    kernel[(programs,)](**args, num_warps=num_warps)


def _vector_block(n, largest):
    """A block over n values: n rounded up to a power of two, at most ``largest`` (at most
    INTERPRETER_BLOCK_C under the interpreter, so that tests run several blocks)."""
    if settings.interpreting():
        largest = INTERPRETER_BLOCK_C
    return min(next_power_of_2(n), largest)


def _tile_shape(channels_last, channels, S, itemsize, tile_bytes, vectors):
    """(BLOCK_C, BLOCK_S, num_warps) of a tile of about ``tile_bytes`` over ``channels``
    channels and S positions, ``vectors`` 16-byte vectors a thread."""
    if settings.interpreting():
        return (min(next_power_of_2(channels), INTERPRETER_BLOCK_C),
                min(next_power_of_2(S), INTERPRETER_BLOCK_S), 1)
    vector = 16 // itemsize
    elements = tile_bytes // itemsize
    if channels_last:
        block_c = min(next_power_of_2(channels), 256 // itemsize)
        block_s = min(next_power_of_2(S), max(1, elements // block_c))
    else:
        block_s = min(next_power_of_2(S), ROW_BYTES // itemsize)
        block_c = min(next_power_of_2(channels), max(1, elements // block_s))
    num_warps = max(1, min(8, block_c * block_s // (vectors * vector * 32)))
    return block_c, block_s, num_warps


def _program_tiles(tiles, tile_elements, itemsize, device):
    """Tiles a program streams: about PROGRAM_BYTES, fewer where that would leave under
    PROGRAMS_PER_SM programs an SM (``tiles`` in the whole launch)."""
    if settings.interpreting():
        return INTERPRETER_TILES
    k = PROGRAM_BYTES // (itemsize * tile_elements)
    return max(1, min(k, tiles // (PROGRAMS_PER_SM * _sm_count(device))))


def _chunks(channels, S, block_c, block_s, other, itemsize, device, channel_blocks=True):
    """(tiles along channels, tiles along positions, chunks along channels, chunks along
    positions) of the programs over
    ``channels`` x S elements (``other`` such ranges in the launch): a program takes
    _program_tiles tiles, along the positions first; with ``channel_blocks`` False, one channel
    block."""
    blocks_c, blocks_s = cdiv(channels, block_c), cdiv(S, block_s)
    k = _program_tiles(other * blocks_c * blocks_s, block_c * block_s, itemsize, device)
    k_s = min(k, blocks_s)
    k_c = min(max(1, k // k_s), blocks_c) if channel_blocks else 1
    return k_c, k_s, cdiv(blocks_c, k_c), cdiv(blocks_s, k_s)


def _alignment(stride):
    """The largest power of two up to 16 dividing ``stride``."""
    return math.gcd(int(stride), 16)


def _channels_last(t):
    """Whether the kernels take t with channels contiguous (True), positions contiguous (False),
    or not at all (None)."""
    if t.is_contiguous():
        return math.prod(t.shape[2:]) == 1
    if t.movedim(1, -1).is_contiguous():
        return True
    return None


def _geometry(t, channels_last):
    """(N, C, S, stride_n, stride of the non-contiguous axis) of a tensor the kernels take."""
    N, C = t.shape[:2]
    S = math.prod(t.shape[2:])
    return N, C, S, C * S, C if channels_last else S


def _like(t, like):
    """t with like's strides: itself when it has them, else a copy (like is dense)."""
    if t.stride() == like.stride() or t.numel() <= 1:
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def _dense(input):
    """(the tensor to compute on, the output's tensor, layout): the output is laid out as
    torch.empty_like(input) (the op's fake implementation); a layout the kernels do not take
    is computed on a contiguous copy, then copied into it."""
    out = torch.empty_like(input)
    layout = _channels_last(out)
    if layout is None:
        x = input.contiguous()
        return x, out, False
    return _like(input, out), out, layout


def group_norm_fwd(input, num_groups, weight, bias, eps, relu, input_bias=None):
    """(out, mean, rstd): GroupNorm of x = input (+ input_bias[c]), ReLU(x) with relu, with
    ``kernels.group_norm``'s shapes; mean and rstd = 1/sqrt(var + eps) fp32 (N, num_groups), of
    that x."""
    x, out, cl = _dense(input)
    weight, bias, input_bias = (None if t is None else t.contiguous()
                                for t in (weight, bias, input_bias))
    N, C, S, stride_n, stride_r = _geometry(x, cl)
    G = num_groups
    Cg = C // G
    dev = x.device
    mean = torch.empty((N, G), device=dev, dtype=torch.float32)
    rstd = torch.empty((N, G), device=dev, dtype=torch.float32)
    if x.numel() == 0:
        if N * G:
            mean.fill_(float("nan"))
            rstd.fill_(float("nan"))
        return out, mean, rstd
    y = out if out.stride() == x.stride() else torch.empty_like(x)
    align = _alignment(stride_r)
    layout = dict(stride_n_q=stride_n // align, stride_r_q=stride_r // align, CHANNELS_LAST=cl,
                  ALIGN=align)
    has_ib = input_bias is not None
    size = x.element_size()

    block_c, block_s, warps = _tile_shape(cl, Cg, S, size, REDUCE_TILE_BYTES,
                                          REDUCE_VECTORS)
    tiles_c, tiles_s, n_cc, n_sc = _chunks(Cg, S, block_c, block_s, N * G, size, dev)
    split = n_cc * n_sc
    part = torch.empty((N * G, split, 2), device=dev, dtype=torch.float32)
    # Cg in units of its alignment, for vector loads at each group's first channel
    cg_align = _alignment(Cg)
    _launch(_gn_stats_kernel, N * G * split, warps, x_ptr=x,
            ib_ptr=input_bias if has_ib else part, part_ptr=part, S=S, G=G,
            Cg_q=Cg // cg_align, TILES_C=tiles_c, TILES_S=tiles_s, N_CC=n_cc, N_SC=n_sc,
            RELU=relu, HAS_INPUT_BIAS=has_ib, CG_ALIGN=cg_align, BLOCK_C=block_c,
            BLOCK_S=block_s, **layout)
    _launch(_gn_combine_kernel, N * G, 4, part_ptr=part, mean_ptr=mean, rstd_ptr=rstd, S=S,
            Cg=Cg, C_CHUNK=tiles_c * block_c, S_CHUNK=tiles_s * block_s, N_SC=n_sc, SPLIT=split,
            eps=eps,
            BLOCK_P=_vector_block(split, 1024))

    block_c, block_s, warps = _tile_shape(cl, C, S, size, ELEMENTWISE_TILE_BYTES,
                                          ELEMENTWISE_VECTORS)
    _, tiles_s, n_cb, n_sc = _chunks(C, S, block_c, block_s, N, size, dev, channel_blocks=False)
    _launch(_gn_normalise_kernel, N * n_cb * n_sc, warps, x_ptr=x, y_ptr=y, mean_ptr=mean,
            rstd_ptr=rstd, w_ptr=weight if weight is not None else mean,
            b_ptr=bias if bias is not None else mean, ib_ptr=input_bias if has_ib else mean,
            C=C, S=S, G=G, Cg=Cg, N_CB=n_cb, N_SC=n_sc, TILES_S=tiles_s,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu,
            HAS_INPUT_BIAS=has_ib, BLOCK_C=block_c, BLOCK_S=block_s, **layout)
    if y is not out:
        out.copy_(y)
    return out, mean, rstd


def group_norm_bwd(grad_out, input, mean, rstd, weight, num_groups, relu, input_bias=None, *,
                   need_input, need_weight, need_bias, need_input_bias=False):
    """(grad_input, grad_weight, grad_bias, grad_input_bias) of ``group_norm_fwd``, None where
    not needed: grad_input in input's dtype and memory format (torch.empty_like(input)),
    grad_weight and grad_bias (C,) in weight's dtype (fp32 without a weight), grad_input_bias
    (C,) in input_bias's. ``weight`` None is a weight of 1."""
    need_input_bias = need_input_bias and input_bias is not None
    if not (need_input or need_weight or need_bias or need_input_bias):
        return None, None, None, None
    x, dx_out, cl = _dense(input)
    g = _like(grad_out, x)
    weight, input_bias = (None if t is None else t.contiguous() for t in (weight, input_bias))
    N, C, S, stride_n, stride_r = _geometry(x, cl)
    G = num_groups
    Cg = C // G
    dev = x.device
    has_ib = input_bias is not None
    # grad_input element by element: stored with need_input, summed over each channel into
    # grad_input_bias with need_input_bias
    need_dx = need_input or need_input_bias
    param_dtype = weight.dtype if weight is not None else torch.float32
    grad_w, grad_b, grad_ib = (torch.empty(C, device=dev, dtype=torch.float32) if need else None
                               for need in (need_weight, need_bias, need_input_bias))
    dtypes = (param_dtype, param_dtype, input_bias.dtype if has_ib else None)

    def in_dtypes(*grads):
        return tuple(None if t is None else t.to(d) for t, d in zip(grads, dtypes))

    if x.numel() == 0:
        for t in (grad_w, grad_b, grad_ib):
            if t is not None:
                t.zero_()
        return (dx_out if need_input else None,) + in_dtypes(grad_w, grad_b, grad_ib)
    align = _alignment(stride_r)
    layout = dict(stride_n_q=stride_n // align, stride_r_q=stride_r // align, CHANNELS_LAST=cl,
                  ALIGN=align)
    size = x.element_size()
    mean, rstd = mean.contiguous(), rstd.contiguous()

    block_c, block_s, warps = _tile_shape(cl, C, S, size, REDUCE_TILE_BYTES,
                                          REDUCE_VECTORS)
    _, tiles_s, n_cb, n_sc = _chunks(C, S, block_c, block_s, N, size, dev, channel_blocks=False)
    part = torch.empty((2, N, n_sc, C), device=dev, dtype=torch.float32)
    _launch(_gn_grad_sums_kernel, N * n_cb * n_sc, warps, x_ptr=x, g_ptr=g, mean_ptr=mean,
            rstd_ptr=rstd, ib_ptr=input_bias if has_ib else part, part_ptr=part, N=N, C=C, S=S,
            G=G, Cg=Cg, N_CB=n_cb, N_SC=n_sc, TILES_S=tiles_s, RELU=relu,
            HAS_INPUT_BIAS=has_ib, BLOCK_C=block_c, BLOCK_S=block_s, **layout)

    wsum = torch.empty((2, N, C), device=dev, dtype=torch.float32) if need_dx else part
    # 16 channels a program: C / 16 programs share the partial sums, 64-byte rows of them
    block = _vector_block(C, 16)
    _launch(_gn_grad_channels_kernel, cdiv(C, block), 4, part_ptr=part,
            w_ptr=weight if weight is not None else part, wsum_ptr=wsum,
            gw_ptr=grad_w if need_weight else part, gb_ptr=grad_b if need_bias else part,
            N=N, C=C, N_SC=n_sc, HAS_WEIGHT=weight is not None, NEED_INPUT=need_dx,
            NEED_WEIGHT=need_weight, NEED_BIAS=need_bias, BLOCK_P=_vector_block(n_sc, 64),
            BLOCK_C=block)
    grad_input = None
    if need_dx:
        m = torch.empty((2, N * G), device=dev, dtype=torch.float32)
        _launch(_gn_grad_groups_kernel, N * G, 4, wsum_ptr=wsum, m_ptr=m, N=N, C=C, S=S, G=G,
                Cg=Cg, BLOCK_C=_vector_block(Cg, 1024))
        dx = m
        if need_input:
            dx = dx_out if dx_out.stride() == x.stride() else torch.empty_like(x)
        block_c, block_s, warps = _tile_shape(cl, C, S, size, ELEMENTWISE_TILE_BYTES,
                                              ELEMENTWISE_VECTORS)
        _, tiles_s, n_cb, n_sc = _chunks(C, S, block_c, block_s, N, size, dev,
                                         channel_blocks=False)
        dib = (torch.empty((N, n_sc, C), device=dev, dtype=torch.float32) if need_input_bias
               else m)
        _launch(_gn_grad_input_kernel, N * n_cb * n_sc, warps, x_ptr=x, g_ptr=g, dx_ptr=dx,
                mean_ptr=mean, rstd_ptr=rstd, m_ptr=m,
                w_ptr=weight if weight is not None else m, ib_ptr=input_bias if has_ib else m,
                dib_ptr=dib, N=N, C=C, S=S, G=G, Cg=Cg, N_CB=n_cb, N_SC=n_sc, TILES_S=tiles_s,
                HAS_WEIGHT=weight is not None, RELU=relu, HAS_INPUT_BIAS=has_ib,
                NEED_INPUT=need_input, NEED_INPUT_BIAS=need_input_bias, BLOCK_C=block_c,
                BLOCK_S=block_s, **layout)
        if need_input_bias:
            # grad_input_bias: the chunks' sums summed over samples and chunks by the kernel
            # that sums the first pass's into grad_bias (that output alone)
            _launch(_gn_grad_channels_kernel, cdiv(C, block), 4, part_ptr=dib, w_ptr=dib,
                    wsum_ptr=dib, gw_ptr=dib, gb_ptr=grad_ib, N=N, C=C, N_SC=n_sc,
                    HAS_WEIGHT=False, NEED_INPUT=False, NEED_WEIGHT=False, NEED_BIAS=True,
                    BLOCK_P=_vector_block(n_sc, 64), BLOCK_C=block)
        if need_input:
            if dx is not dx_out:
                dx_out.copy_(dx)
            grad_input = dx_out
    return (grad_input,) + in_dtypes(grad_w, grad_b, grad_ib)
