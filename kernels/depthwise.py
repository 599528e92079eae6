"""Depthwise 3D convolution (groups = channels) in Triton: forward, input gradient, weight and
bias gradients, in the input's memory format (channels_last_3d, or contiguous NCDHW; the kernels
take every tensor by its strides). Three kernels:

- ``depthwise_corr_kernel``, the forward and the input gradient:

      y[n, c, o] = sum_tap x[n, c, (o * S - P + tap * D) / U] * w[c, tap]

  (a tap whose index does not divide by U or falls outside the volume adds nothing). Forward:
  S = stride, U = 1. Input gradient, in gather form (no atomics): x = grad_out, S = 1,
  U = stride, P = (k - 1) * d - p, the kernel flipped. Grid (W tiles x runs of ROWS output rows
  x N * To, channel blocks); a program owns a [BLOCK_W, BLOCK_C] tile of each row of its run,
  loads one shifted input tile a tap (zeros outside) and accumulates in fp32, the weights read
  once and held in registers as fp32 for the whole program. With 3
  taps along H at stride, divisor and dilation 1 (the backbone's stride-1 layers, forward and
  input gradient) it walks input rows instead, each loaded tile added into the three output rows
  it reaches (rolling accumulators): a load and conversion a (kd, kw) tap and row, not three.
  Moves the input (its reuse across taps and rows comes from L1 and L2) and the output once.
- ``depthwise_wgrad_kernel``, the weight and bias gradients: per slice s (a run of output rows of
  one (n, to) plane) partial[s, tap, c] = sum_rows,w grad_out[n, c, o] * x[n, c, o * stride - p
  + tap * d], and partial[s, K, c] = sum grad_out. Grid (slices, channel blocks); a program keeps
  one [BLOCK_W, BLOCK_C] fp32 accumulator a tap (27 taps or fewer) and loads each grad_out tile
  once; with 3 taps along H at stride and dilation 1 each input tile also serves three taps (the
  last three grad_out rows are held). Moves grad_out and the input once, and S * (K + 1) * C * 4
  bytes of partials, a few percent of them at the backbone's shapes.
- ``depthwise_wgrad_reduce_kernel``: grad_weight[c, tap], grad_bias[c] = the sum of the partials
  over the slices, in a fixed order (deterministic). Grid (channel blocks, taps + bias rows).

Channels-last tiles give each thread VEC channels (2: a 27-tap kernel's weights in 54 fp32
registers); NCDHW tiles put W along the lanes. A W tile whose outputs and taps all lie inside the
volume runs without W masks, one whose channel blocks tile C (EVEN_C) without channel masks; rows
outside the volume are skipped by a branch uniform over the program. Kernels of up to 27 taps are
unrolled, larger ones (to 7 x 7 x 7) loop.

Autotuned per kernel and layout among a few candidates (kernels/tuning.py, the picks kept on
disk), keyed by channels, kernel, stride, divisor, dilation, layout, dtype and a power-of-two
bucket of the output positions (never the exact T x H x W: a new video size reuses its bucket's
pick); with ``kernels.settings.autotune()`` off each kernel launches its first candidate, under
the interpreter small blocks.
"""
import torch
import triton
import triton.language as tl

from . import settings, tuning
from .configs import prune
from .launch import cdiv, next_power_of_2
from .ops import _depthwise_format


@triton.jit
def _axis(o, k, SIZE, S: tl.constexpr, U: tl.constexpr, P: tl.constexpr, D: tl.constexpr):
    """Input index read by output index o at tap k along one axis, (o * S - P + k * D) / U, and
    whether it exists (divides by U, inside [0, SIZE))."""
    i = o * S - P + k * D
    ok = i >= 0
    if U > 1:
        ok = ok & (i % U == 0)
        i = i // U
    return i, ok & (i < SIZE)


@triton.jit
def _row(p_nc, i_t, i_h, st, sh):
    """[BLOCK_C] pointers to row (i_t, i_h) of the (n, c) bases p_nc."""
    return p_nc + (tl.cast(i_t, tl.int64) * st + tl.cast(i_h, tl.int64) * sh)


@triton.jit
def _tap_tile(x_row, m_c, o_w, kw, Wi, sxw: tl.constexpr, SW: tl.constexpr, UW: tl.constexpr,
              PW: tl.constexpr, DW: tl.constexpr, MASK_W: tl.constexpr, EVEN_C: tl.constexpr):
    """[BLOCK_W, BLOCK_C] fp32 input tile of tap kw in row x_row, zeros outside (_axis along W);
    without MASK_W every W index exists (an interior tile, U = 1 along W)."""
    if MASK_W:
        i_w, ok_w = _axis(o_w, kw, Wi, SW, UW, PW, DW)                      # [BW]
        x = tl.load(x_row[None, :] + (tl.cast(i_w, tl.int64) * sxw)[:, None],
                    mask=ok_w[:, None] & m_c[None, :], other=0.0)
    else:
        # int64, so that the compiler folds the tap's and each position's constant parts into
        # the load's address
        off = (tl.cast(o_w, tl.int64) * SW + (kw * DW - PW)) * sxw          # [BW]
        if EVEN_C:
            x = tl.load(x_row[None, :] + off[:, None])
        else:
            x = tl.load(x_row[None, :] + off[:, None], mask=m_c[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_row(y_nc, acc, bias, m_c, o_t, o_h, o_w, Wo, syt, syh, syw: tl.constexpr,
               HAS_BIAS: tl.constexpr, MASK_W: tl.constexpr, EVEN_C: tl.constexpr):
    """Output row (o_t, o_h) of the tile: acc (+ bias) in the output's dtype."""
    if HAS_BIAS:
        acc = acc + bias[None, :]
    off = tl.cast(o_w, tl.int64) * syw                                      # [BW]
    p_y = _row(y_nc, o_t, o_h, syt, syh)[None, :] + off[:, None]
    if MASK_W:
        tl.store(p_y, acc.to(p_y.dtype.element_ty), mask=(o_w < Wo)[:, None] & m_c[None, :])
    elif EVEN_C:
        tl.store(p_y, acc.to(p_y.dtype.element_ty))
    else:
        tl.store(p_y, acc.to(p_y.dtype.element_ty), mask=m_c[None, :])


@triton.jit
def _corr_rows(x_nc, y_nc, w_c, ws, bias, m_c, o_t, o_w, h0, h1, Ti, Hi, Wi, Wo,
               sxt, sxh, sxw: tl.constexpr, syt, syh, syw: tl.constexpr, swk,
               KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
               SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
               UD: tl.constexpr, UH: tl.constexpr, UW: tl.constexpr,
               PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
               DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
               FLIP: tl.constexpr, HAS_BIAS: tl.constexpr, ROLL: tl.constexpr,
               UNROLL: tl.constexpr, MASK_W: tl.constexpr, EVEN_C: tl.constexpr,
               BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output rows h0 .. h1 - 1 of one W tile (depthwise_corr_kernel); ws: the weights of the
    unrolled taps."""
    K: tl.constexpr = KD * KH * KW
    if ROLL:
        # input row i_h feeds output rows i_h + PH - 2 (a0, tap kh = 2), i_h + PH - 1 (a1) and
        # i_h + PH (a2, kh = 0); after it, a0 is complete
        a0 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        a1 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        a2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        for r in range(0, h1 - h0 + 2):
            i_h = h0 - PH + r
            ok_h = (i_h >= 0) & (i_h < Hi)
            if UNROLL:
                for kd in tl.static_range(KD):
                    i_t, ok_t = _axis(o_t, kd, Ti, SD, UD, PD, DD)
                    if ok_t & ok_h:
                        x_row = _row(x_nc, i_t, i_h, sxt, sxh)
                        for kw in tl.static_range(KW):
                            x = _tap_tile(x_row, m_c, o_w, kw, Wi, sxw, SW, UW, PW, DW, MASK_W,
                                          EVEN_C)
                            # tap (kd, kh, kw) at (kd * 3 + kh) * KW + kw, written inline: a
                            # name assigned in a runtime loop is no compile-time constant
                            a0 += x * ws[(kd * 3 + 2) * KW + kw][None, :]
                            a1 += x * ws[(kd * 3 + 1) * KW + kw][None, :]
                            a2 += x * ws[kd * 3 * KW + kw][None, :]
            else:
                for j in range(KD * KW):
                    i_t, ok_t = _axis(o_t, j // KW, Ti, SD, UD, PD, DD)
                    if ok_t & ok_h:
                        x = _tap_tile(_row(x_nc, i_t, i_h, sxt, sxh), m_c, o_w, j % KW, Wi, sxw,
                                      SW, UW, PW, DW, True, False)
                        k0 = (j // KW) * 3 * KW + j % KW                    # tap (kd, 0, kw)
                        w_k = w_c + (K - 1 - k0 if FLIP else k0) * swk
                        step = -KW * swk if FLIP else KW * swk
                        w2 = tl.load(w_k + 2 * step, mask=m_c, other=0.0).to(tl.float32)
                        w1 = tl.load(w_k + step, mask=m_c, other=0.0).to(tl.float32)
                        w0 = tl.load(w_k, mask=m_c, other=0.0).to(tl.float32)
                        a0 += x * w2[None, :]
                        a1 += x * w1[None, :]
                        a2 += x * w0[None, :]
            if r >= 2:
                _store_row(y_nc, a0, bias, m_c, o_t, h0 + r - 2, o_w, Wo, syt, syh, syw,
                           HAS_BIAS, MASK_W, EVEN_C)
            a0 = a1
            a1 = a2
            a2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
    else:
        for o_h in range(h0, h1):
            acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
            if UNROLL:
                for kd in tl.static_range(KD):
                    for kh in tl.static_range(KH):
                        i_t, ok_t = _axis(o_t, kd, Ti, SD, UD, PD, DD)
                        i_h, ok_h = _axis(o_h, kh, Hi, SH, UH, PH, DH)
                        if ok_t & ok_h:
                            x_row = _row(x_nc, i_t, i_h, sxt, sxh)
                            for kw in tl.static_range(KW):
                                x = _tap_tile(x_row, m_c, o_w, kw, Wi, sxw, SW, UW, PW, DW,
                                              MASK_W, EVEN_C)
                                acc += x * ws[(kd * KH + kh) * KW + kw][None, :]
            else:
                for k in range(K):
                    i_t, ok_t = _axis(o_t, k // (KH * KW), Ti, SD, UD, PD, DD)
                    i_h, ok_h = _axis(o_h, (k // KW) % KH, Hi, SH, UH, PH, DH)
                    if ok_t & ok_h:
                        x = _tap_tile(_row(x_nc, i_t, i_h, sxt, sxh), m_c, o_w, k % KW, Wi, sxw,
                                      SW, UW, PW, DW, True, False)
                        w = tl.load(w_c + (K - 1 - k if FLIP else k) * swk, mask=m_c,
                                    other=0.0)
                        acc += x * w.to(tl.float32)[None, :]
            _store_row(y_nc, acc, bias, m_c, o_t, o_h, o_w, Wo, syt, syh, syw, HAS_BIAS,
                       MASK_W, EVEN_C)


@triton.jit
def depthwise_corr_kernel(
    x_ptr,      # correlation input (N, C, Ti, Hi, Wi), strides sxn, sxc, sxt, sxh, sxw
    w_ptr,      # weight (C, K): tap k of channel c at c * swc + k * swk
    b_ptr,      # bias (C,), or any pointer when not HAS_BIAS
    y_ptr,      # output (N, C, To, Ho, Wo), strides syn, syc, syt, syh, syw
    C, Ti, Hi, Wi, To, Ho, Wo,
    sxn, sxc, sxt, sxh, sxw: tl.constexpr, syn, syc, syt, syh, syw: tl.constexpr, swc, swk,
    P_BUCKET, CHANNELS_LAST: tl.constexpr,      # read by the tuning key only
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    UD: tl.constexpr, UH: tl.constexpr, UW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
    ROLL: tl.constexpr,         # KH = 3 and S = U = D = 1 along H: rolling accumulators
    UNROLL: tl.constexpr,       # K <= 27: taps unrolled, weights held in registers
    ROWS: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    EVEN_C: tl.constexpr,       # C % BLOCK_C == 0 (a heuristic)
):
    K: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    n_w = tl.cdiv(Wo, BLOCK_W)
    n_h = tl.cdiv(Ho, ROWS)
    w0 = (pid % n_w) * BLOCK_W
    rest = pid // n_w
    h0 = (rest % n_h) * ROWS
    rest = rest // n_h
    o_t = rest % To
    i_n = tl.cast(rest // To, tl.int64)
    h1 = tl.minimum(h0 + ROWS, Ho)

    o_w = w0 + tl.arange(0, BLOCK_W)
    o_c = tl.max_contiguous(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), VEC)
    m_c = o_c < C
    x_nc = x_ptr + (i_n * sxn + tl.cast(o_c, tl.int64) * sxc)               # [BC]
    y_nc = y_ptr + (i_n * syn + tl.cast(o_c, tl.int64) * syc)               # [BC]
    w_c = w_ptr + tl.cast(o_c, tl.int64) * swc                              # [BC]
    bias = tl.zeros([BLOCK_C], tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + o_c, mask=m_c, other=0.0).to(tl.float32)
    # the weights for the whole program: tap k's at ws[k] (FLIP: tap K - 1 - k's)
    ws = ()
    if UNROLL:
        for i_k in tl.static_range(K):
            p_w = w_c + (K - 1 - i_k if FLIP else i_k) * swk
            w = tl.load(p_w) if EVEN_C else tl.load(p_w, mask=m_c, other=0.0)
            ws = ws + (w.to(tl.float32),)

    interior = False
    if UW == 1:
        interior = ((w0 + BLOCK_W <= Wo) & (w0 * SW - PW >= 0)
                    & ((w0 + BLOCK_W - 1) * SW - PW + (KW - 1) * DW < Wi))
    if interior:
        _corr_rows(x_nc, y_nc, w_c, ws, bias, m_c, o_t, o_w, h0, h1, Ti, Hi, Wi, Wo, sxt, sxh,
                   sxw, syt, syh, syw, swk, KD, KH, KW, SD, SH, SW, UD, UH, UW, PD, PH, PW,
                   DD, DH, DW, FLIP, HAS_BIAS, ROLL, UNROLL, False, EVEN_C, BLOCK_W, BLOCK_C)
    else:
        _corr_rows(x_nc, y_nc, w_c, ws, bias, m_c, o_t, o_w, h0, h1, Ti, Hi, Wi, Wo, sxt, sxh,
                   sxw, syt, syh, syw, swk, KD, KH, KW, SD, SH, SW, UD, UH, UW, PD, PH, PW,
                   DD, DH, DW, FLIP, HAS_BIAS, ROLL, UNROLL, True, EVEN_C, BLOCK_W, BLOCK_C)


@triton.jit
def _wgrad_add(accs, k: tl.constexpr, x, g):
    """accs with accs[k] + x * g."""
    return accs[:k] + (accs[k] + x * g,) + accs[k + 1:]


@triton.jit
def _wgrad_tile(accs, g_sum, x_nc, g_nt, m_c, o_t, o_w, h0, h1, T, H, W, Wo,
                sxt, sxh, sxw: tl.constexpr, sgh, sgw: tl.constexpr,
                KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr, ROLL: tl.constexpr,
                MASK_W: tl.constexpr, EVEN_C: tl.constexpr,
                BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """accs[k] += grad_out * tap k's input and g_sum += grad_out over output rows h0 .. h1 - 1
    of one W tile (depthwise_wgrad_kernel, 27 taps or fewer)."""
    m_g = (o_w < Wo)[:, None] & m_c[None, :]
    if not MASK_W:
        m_g = m_c[None, :] | EVEN_C             # all true (folded) for whole channel blocks
    p_g = g_nt[None, :] + (tl.cast(o_w, tl.int64) * sgw)[:, None]           # [BW, BC]
    if ROLL and NEED_WEIGHT:
        # input row i_h meets grad_out rows i_h + PH - 2 (g2, tap kh = 2), i_h + PH - 1 (g1)
        # and i_h + PH (g0, loaded at this step)
        g2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        g1 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        for r in range(0, h1 - h0 + 2):
            g0 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
            if h0 + r < h1:
                g0 = tl.load(p_g + tl.cast(h0 + r, tl.int64) * sgh, mask=m_g, other=0.0)
                g0 = g0.to(tl.float32)
                if NEED_BIAS:
                    g_sum += g0
            i_h = h0 - PH + r
            ok_h = (i_h >= 0) & (i_h < H)
            for kd in tl.static_range(KD):
                i_t, ok_t = _axis(o_t, kd, T, SD, 1, PD, DD)
                if ok_t & ok_h:
                    x_row = _row(x_nc, i_t, i_h, sxt, sxh)
                    for kw in tl.static_range(KW):
                        x = _tap_tile(x_row, m_c, o_w, kw, W, sxw, SW, 1, PW, DW, MASK_W,
                                      EVEN_C)
                        accs = _wgrad_add(accs, (kd * 3 + 2) * KW + kw, x, g2)
                        accs = _wgrad_add(accs, (kd * 3 + 1) * KW + kw, x, g1)
                        accs = _wgrad_add(accs, kd * 3 * KW + kw, x, g0)
            g2 = g1
            g1 = g0
    else:
        for o_h in range(h0, h1):
            g = tl.load(p_g + tl.cast(o_h, tl.int64) * sgh, mask=m_g, other=0.0)
            g = g.to(tl.float32)
            if NEED_BIAS:
                g_sum += g
            if NEED_WEIGHT:
                for kd in tl.static_range(KD):
                    for kh in tl.static_range(KH):
                        i_t, ok_t = _axis(o_t, kd, T, SD, 1, PD, DD)
                        i_h, ok_h = _axis(o_h, kh, H, SH, 1, PH, DH)
                        if ok_t & ok_h:
                            x_row = _row(x_nc, i_t, i_h, sxt, sxh)
                            for kw in tl.static_range(KW):
                                x = _tap_tile(x_row, m_c, o_w, kw, W, sxw, SW, 1, PW, DW,
                                              MASK_W, EVEN_C)
                                accs = _wgrad_add(accs, (kd * KH + kh) * KW + kw, x, g)
    return accs, g_sum


@triton.jit
def depthwise_wgrad_kernel(
    x_ptr,      # input (N, C, T, H, W), strides sxn, sxc, sxt, sxh, sxw
    g_ptr,      # grad_out (N, C, To, Ho, Wo), strides sgn, sgc, sgt, sgh, sgw
    part_ptr,   # fp32 (S, K + 1, C) contiguous: per slice each tap's sum, then (row K) the bias's
    C, T, H, W, To, Ho, Wo,
    RUN,        # output rows of a slice (of one (n, to) plane)
    sxn, sxc, sxt, sxh, sxw: tl.constexpr, sgn, sgc, sgt, sgh, sgw: tl.constexpr,
    P_BUCKET, CHANNELS_LAST: tl.constexpr,      # read by the tuning key only
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    NEED_WEIGHT: tl.constexpr, NEED_BIAS: tl.constexpr,
    ROLL: tl.constexpr,         # KH = 3, stride and dilation 1 along H: x tiles serve 3 taps
    UNROLL: tl.constexpr,       # K <= 27: an accumulator a tap, grad_out read once
    BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    EVEN_C: tl.constexpr,       # C % BLOCK_C == 0 (a heuristic)
):
    K: tl.constexpr = KD * KH * KW
    pid_s = tl.program_id(0)
    n_runs = tl.cdiv(Ho, RUN)
    h0 = (pid_s % n_runs) * RUN
    rest = pid_s // n_runs
    o_t = rest % To
    i_n = tl.cast(rest // To, tl.int64)
    h1 = tl.minimum(h0 + RUN, Ho)
    o_c = tl.max_contiguous(tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C), VEC)
    m_c = o_c < C
    x_nc = x_ptr + (i_n * sxn + tl.cast(o_c, tl.int64) * sxc)               # [BC]
    g_nt = g_ptr + (i_n * sgn + tl.cast(o_c, tl.int64) * sgc + tl.cast(o_t, tl.int64) * sgt)
    p_part = part_ptr + tl.cast(pid_s, tl.int64) * (K + 1) * C + o_c        # [BC]

    if UNROLL or not NEED_WEIGHT:
        accs = ()
        if NEED_WEIGHT:
            for i_k in tl.static_range(K):
                accs = accs + (tl.zeros([BLOCK_W, BLOCK_C], tl.float32),)
        g_sum = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        for w0 in range(0, Wo, BLOCK_W):
            o_w = w0 + tl.arange(0, BLOCK_W)
            if ((w0 + BLOCK_W <= Wo) & (w0 * SW - PW >= 0)
                    & ((w0 + BLOCK_W - 1) * SW - PW + (KW - 1) * DW < W)):
                accs, g_sum = _wgrad_tile(accs, g_sum, x_nc, g_nt, m_c, o_t, o_w, h0, h1, T, H,
                                          W, Wo, sxt, sxh, sxw, sgh, sgw, KD, KH, KW, SD, SH,
                                          SW, PD, PH, PW, DD, DH, DW, NEED_WEIGHT, NEED_BIAS,
                                          ROLL, False, EVEN_C, BLOCK_W, BLOCK_C)
            else:
                accs, g_sum = _wgrad_tile(accs, g_sum, x_nc, g_nt, m_c, o_t, o_w, h0, h1, T, H,
                                          W, Wo, sxt, sxh, sxw, sgh, sgw, KD, KH, KW, SD, SH,
                                          SW, PD, PH, PW, DD, DH, DW, NEED_WEIGHT, NEED_BIAS,
                                          ROLL, True, EVEN_C, BLOCK_W, BLOCK_C)
        if NEED_WEIGHT:
            for k in tl.static_range(K):
                tl.store(p_part + k * C, tl.sum(accs[k], axis=0), mask=m_c)
        if NEED_BIAS:
            tl.store(p_part + K * C, tl.sum(g_sum, axis=0), mask=m_c)
    else:
        # more than 27 taps: one at a time, grad_out read again for each
        for k in range(K):
            acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
            i_t, ok_t = _axis(o_t, k // (KH * KW), T, SD, 1, PD, DD)
            for o_h in range(h0, h1):
                i_h, ok_h = _axis(o_h, (k // KW) % KH, H, SH, 1, PH, DH)
                if ok_t & ok_h:
                    x_row = _row(x_nc, i_t, i_h, sxt, sxh)
                    g_row = g_nt + tl.cast(o_h, tl.int64) * sgh
                    for w0 in range(0, Wo, BLOCK_W):
                        o_w = w0 + tl.arange(0, BLOCK_W)
                        g = tl.load(g_row[None, :] + (tl.cast(o_w, tl.int64) * sgw)[:, None],
                                    mask=(o_w < Wo)[:, None] & m_c[None, :], other=0.0)
                        x = _tap_tile(x_row, m_c, o_w, k % KW, W, sxw, SW, 1, PW, DW, True,
                                      False)
                        acc += x * g.to(tl.float32)
            tl.store(p_part + k * C, tl.sum(acc, axis=0), mask=m_c)
        if NEED_BIAS:
            acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
            for o_h in range(h0, h1):
                g_row = g_nt + tl.cast(o_h, tl.int64) * sgh
                for w0 in range(0, Wo, BLOCK_W):
                    o_w = w0 + tl.arange(0, BLOCK_W)
                    g = tl.load(g_row[None, :] + (tl.cast(o_w, tl.int64) * sgw)[:, None],
                                mask=(o_w < Wo)[:, None] & m_c[None, :], other=0.0)
                    acc += g.to(tl.float32)
            tl.store(p_part + K * C, tl.sum(acc, axis=0), mask=m_c)


@triton.jit
def depthwise_wgrad_reduce_kernel(
    part_ptr,   # fp32 (S, K + 1, C) contiguous, from depthwise_wgrad_kernel
    gw_ptr,     # grad_weight (C, K) contiguous, or any pointer when not NEED_WEIGHT
    gb_ptr,     # grad_bias (C,), or any pointer when the grid has no bias row
    S, C, K,
    NEED_WEIGHT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(1)          # a tap (grad_weight), or K (grad_bias)
    if not NEED_WEIGHT:
        row += K
    o_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    o_s = tl.arange(0, BLOCK_S)
    p_row = part_ptr + row * C + o_c                                        # [BC]
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + o_s
        acc += tl.load(p_row[None, :] + (tl.cast(s, tl.int64) * (K + 1) * C)[:, None],
                       mask=(s < S)[:, None] & m_c[None, :], other=0.0)
    total = tl.sum(acc, axis=0)                                             # [BC]
    if row < K:
        tl.store(gw_ptr + o_c * K + row, total.to(gw_ptr.dtype.element_ty), mask=m_c)
    else:
        tl.store(gb_ptr + o_c, total.to(gb_ptr.dtype.element_ty), mask=m_c)


def _cfg(num_warps, num_stages=1, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# candidates per kernel and layout (True: channels_last_3d), the first launched when not tuning.
# Channels-last: VEC channels a thread, warps along W; a thread's registers hold 27 * VEC
# weights (forward) or accumulators (weight gradient) per position it owns. NCDHW: W along the
# lanes, BLOCK_C channels. Compiled for sm_90 with Triton 3.9 at ir-CSN-152's stage-1 shape, bf16,
# none spills. Their order and the small-shape ones (ROWS 4 and 2: more programs for 30 x 54 and
# 15 x 27 planes) are untimed
CANDIDATES = {
    "corr": {
        True: [_cfg(4, ROWS=8, BLOCK_W=16, BLOCK_C=64, VEC=2),
               _cfg(4, ROWS=8, BLOCK_W=8, BLOCK_C=64, VEC=2),
               _cfg(8, ROWS=8, BLOCK_W=16, BLOCK_C=128, VEC=2),
               _cfg(4, ROWS=8, BLOCK_W=32, BLOCK_C=32, VEC=2),
               _cfg(4, ROWS=16, BLOCK_W=16, BLOCK_C=64, VEC=4),
               _cfg(4, ROWS=4, BLOCK_W=16, BLOCK_C=64, VEC=2),
               _cfg(4, ROWS=2, BLOCK_W=8, BLOCK_C=64, VEC=2)],
        False: [_cfg(4, ROWS=8, BLOCK_W=256, BLOCK_C=2, VEC=1),
                _cfg(4, ROWS=8, BLOCK_W=128, BLOCK_C=4, VEC=1),
                _cfg(4, ROWS=8, BLOCK_W=64, BLOCK_C=4, VEC=1),
                _cfg(4, ROWS=8, BLOCK_W=32, BLOCK_C=8, VEC=1),
                _cfg(4, ROWS=16, BLOCK_W=256, BLOCK_C=1, VEC=1),
                _cfg(8, ROWS=8, BLOCK_W=256, BLOCK_C=4, VEC=1)],
    },
    "wgrad": {
        True: [_cfg(4, BLOCK_W=4, BLOCK_C=64, VEC=2),
               _cfg(4, BLOCK_W=8, BLOCK_C=32, VEC=2),
               _cfg(8, BLOCK_W=8, BLOCK_C=64, VEC=2),
               _cfg(4, BLOCK_W=8, BLOCK_C=64, VEC=2)],
        False: [_cfg(4, BLOCK_W=128, BLOCK_C=2, VEC=1),
                _cfg(4, BLOCK_W=128, BLOCK_C=4, VEC=1),
                _cfg(4, BLOCK_W=64, BLOCK_C=2, VEC=1),
                _cfg(4, BLOCK_W=32, BLOCK_C=8, VEC=1)],
    },
}
# under the interpreter: small blocks, so that tests with a few dozen channels and a few voxels a
# side run several channel blocks, W tiles (masked and interior) and row runs, and their tails
INTERPRETER = {"corr": {True: _cfg(4, ROWS=2, BLOCK_W=4, BLOCK_C=16, VEC=2),
                        False: _cfg(4, ROWS=2, BLOCK_W=4, BLOCK_C=8, VEC=1)},
               "wgrad": {True: _cfg(4, BLOCK_W=4, BLOCK_C=16, VEC=2),
                         False: _cfg(4, BLOCK_W=4, BLOCK_C=8, VEC=1)}}
REDUCE = _cfg(4, BLOCK_S=64, BLOCK_C=32)
REDUCE_INTERPRETER = _cfg(4, BLOCK_S=4, BLOCK_C=16)

# the tuning keys (the input's dtype is added); never the exact T x H x W
_GEOMETRY = ["C", "KD", "KH", "KW", "SD", "SH", "SW", "DD", "DH", "DW", "CHANNELS_LAST",
             "P_BUCKET"]
KEYS = {"corr": _GEOMETRY + ["UD", "UH", "UW", "FLIP", "HAS_BIAS"],
        "wgrad": _GEOMETRY + ["NEED_WEIGHT", "NEED_BIAS"]}
# channel masks only where the channel blocks do not tile C
KERNELS = {kind: triton.heuristics({"EVEN_C": lambda args: args["C"] % args["BLOCK_C"] == 0})(fn)
           for kind, fn in (("corr", depthwise_corr_kernel), ("wgrad", depthwise_wgrad_kernel))}

# the problem extent a block dimension tiles: blocks are cut to its next power of two
_EXTENT = {"BLOCK_C": "C", "BLOCK_W": "Wo", "ROWS": "Ho"}


def _fit(config, args):
    meta = {name: min(value, next_power_of_2(args[_EXTENT[name]])) if name in _EXTENT
            else value for name, value in config.kwargs.items()}
    meta["VEC"] = min(meta["VEC"], meta["BLOCK_C"])
    return triton.Config(meta, num_warps=config.num_warps, num_stages=config.num_stages)


def _launch(kind, channels_last, grid, args):
    """Launch a kernel with its tuned config (``tuning.pick``, timing each candidate on this
    launch: its outputs are written by stores only, so a trial leaves nothing to reset), or its
    first candidate when not tuning (its interpreter config under the interpreter)."""
    if settings.interpreting():
        config = _fit(INTERPRETER[kind][channels_last], args)
    elif not settings.autotune():
        config = _fit(CANDIDATES[kind][channels_last][0], args)
    else:
        dtype = next(str(v.dtype) for v in args.values() if isinstance(v, torch.Tensor))
        config = tuning.pick(f"DEPTHWISE_{kind.upper()}", (*(args[k] for k in KEYS[kind]), dtype),
                             lambda: prune(CANDIDATES[kind][channels_last], args, fit=_fit),
                             lambda config: _run(kind, grid, args, config))
    _run(kind, grid, args, config)


def _run(kind, grid, args, config):
    tuning.launch(KERNELS[kind], grid, **args, **config.kwargs, num_warps=config.num_warps,
                  num_stages=config.num_stages)


def _in_format(t, memory_format):
    return t if t.is_contiguous(memory_format=memory_format) else t.contiguous(
        memory_format=memory_format)


def _corr(x, weight, bias, y, kernel, S, U, P, D, flip, channels_last):
    """y = the correlation of x with weight (depthwise_corr_kernel)."""
    if y.numel() == 0:
        return
    taps = weight.reshape(weight.shape[0], -1)                  # (C, K), a view where it can
    N, C, Ti, Hi, Wi = x.shape
    To, Ho, Wo = y.shape[2:]
    (KD, KH, KW), (SD, SH, SW), (UD, UH, UW) = kernel, S, U
    (PD, PH, PW), (DD, DH, DW) = P, D
    args = dict(x_ptr=x, w_ptr=taps, b_ptr=bias if bias is not None else taps, y_ptr=y,
                C=C, Ti=Ti, Hi=Hi, Wi=Wi, To=To, Ho=Ho, Wo=Wo,
                sxn=x.stride(0), sxc=x.stride(1), sxt=x.stride(2), sxh=x.stride(3),
                sxw=x.stride(4), syn=y.stride(0), syc=y.stride(1), syt=y.stride(2),
                syh=y.stride(3), syw=y.stride(4), swc=taps.stride(0), swk=taps.stride(1),
                P_BUCKET=next_power_of_2(N * To * Ho * Wo), CHANNELS_LAST=channels_last,
                KD=KD, KH=KH, KW=KW, SD=SD, SH=SH, SW=SW, UD=UD, UH=UH, UW=UW,
                PD=PD, PH=PH, PW=PW, DD=DD, DH=DH, DW=DW, FLIP=flip,
                HAS_BIAS=bias is not None, ROLL=KH == 3 and SH == UH == DH == 1,
                UNROLL=KD * KH * KW <= 27)

    def grid(meta):
        return (cdiv(Wo, meta["BLOCK_W"]) * cdiv(Ho, meta["ROWS"]) * N * To,
                cdiv(C, meta["BLOCK_C"]))

    _launch("corr", channels_last, grid, args)


def depthwise_fwd(geo, input, weight, bias):
    """The forward: (N, C, To, Ho, Wo) in the input's dtype and memory format (channels_last_3d
    for an input in it and not also contiguous, else contiguous)."""
    memory_format = _depthwise_format(input)
    x = _in_format(input, memory_format)
    out = torch.empty((geo.N, geo.C, *geo.out), device=x.device, dtype=x.dtype,
                      memory_format=memory_format)
    _corr(x, weight, bias, out, geo.kernel, geo.stride, (1, 1, 1), geo.padding,
          geo.dilation, False, memory_format == torch.channels_last_3d)
    return out


def depthwise_bwd(geo, grad_out, input, weight, *, need_input, need_weight, need_bias):
    """(grad_input, grad_weight, grad_bias), None where not needed: grad_input in the input's
    dtype and memory format, grad_weight (C, 1, kd, kh, kw) contiguous in the weight's dtype,
    grad_bias (C,) in the input's dtype. grad_out may come in any memory format."""
    memory_format = _depthwise_format(input)
    channels_last = memory_format == torch.channels_last_3d
    x = _in_format(input, memory_format)
    g = _in_format(grad_out, memory_format)
    grad_input = grad_weight = grad_bias = None
    if need_input:
        grad_input = torch.empty(x.shape, device=x.device, dtype=x.dtype,
                                 memory_format=memory_format)
        # the gather form: the correlation of grad_out with the flipped kernel, at stride 1,
        # where the input index divides by the stride
        P = tuple((k - 1) * d - p for k, p, d in zip(geo.kernel, geo.padding, geo.dilation))
        _corr(g, weight, None, grad_input, geo.kernel, (1, 1, 1), geo.stride, P,
              geo.dilation, True, channels_last)
    if need_weight or need_bias:
        grad_weight, grad_bias = _wgrad(geo, g, x, weight, need_weight, need_bias,
                                        channels_last)
    return grad_input, grad_weight, grad_bias


# the fewest output positions of a weight-gradient slice, so that its partials (K + 1 fp32 a
# channel) stay a small part of the bytes it reads
_SLICE_POSITIONS = 64


def _slices(geo, channels_last, device):
    """(slices, rows a slice) of the weight gradient: runs of output rows of one (n, to) plane,
    enough of them for about 4 programs a streaming multiprocessor with the first candidate's
    channel blocks, each of at least 2 rows and _SLICE_POSITIONS positions. A rolling program
    reads 2 input rows more than it has output rows: large planes take longer runs (the target
    is met with them), small ones, whose tensors stay in L2, shorter ones."""
    To, Ho, Wo = geo.out
    planes = geo.N * To
    if settings.interpreting():
        run = min(Ho, 2)                        # several runs and slices in small tests
    else:
        block_c = min(CANDIDATES["wgrad"][channels_last][0].kwargs["BLOCK_C"],
                      next_power_of_2(geo.C))
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 132)
        blocks = cdiv(geo.C, block_c)
        run = min(Ho, max(2, cdiv(_SLICE_POSITIONS, Wo),
                          cdiv(planes * Ho * blocks, 4 * sms)))
    return planes * cdiv(Ho, run), run


def _wgrad(geo, g, x, weight, need_weight, need_bias, channels_last):
    """(grad_weight, grad_bias): depthwise_wgrad_kernel's partials, then their sum."""
    C, (KD, KH, KW), (To, Ho, Wo) = geo.C, geo.kernel, geo.out
    K = KD * KH * KW
    grad_weight = grad_bias = None
    if need_weight:
        grad_weight = torch.empty((C, 1, KD, KH, KW), device=x.device, dtype=weight.dtype)
    if need_bias:
        grad_bias = torch.empty((C,), device=x.device, dtype=x.dtype)
    if C == 0:
        return grad_weight, grad_bias
    slices, run = _slices(geo, channels_last, x.device)
    part = torch.empty((slices, K + 1, C), device=x.device, dtype=torch.float32)
    if slices:
        (SD, SH, SW), (PD, PH, PW), (DD, DH, DW) = geo.stride, geo.padding, geo.dilation
        args = dict(x_ptr=x, g_ptr=g, part_ptr=part, C=C, T=geo.T, H=geo.H, W=geo.W,
                    To=To, Ho=Ho, Wo=Wo, RUN=run,
                    sxn=x.stride(0), sxc=x.stride(1), sxt=x.stride(2), sxh=x.stride(3),
                    sxw=x.stride(4), sgn=g.stride(0), sgc=g.stride(1), sgt=g.stride(2),
                    sgh=g.stride(3), sgw=g.stride(4),
                    P_BUCKET=next_power_of_2(geo.N * To * Ho * Wo),
                    CHANNELS_LAST=channels_last, KD=KD, KH=KH, KW=KW, SD=SD, SH=SH, SW=SW,
                    PD=PD, PH=PH, PW=PW, DD=DD, DH=DH, DW=DW, NEED_WEIGHT=need_weight,
                    NEED_BIAS=need_bias, ROLL=KH == 3 and SH == DH == 1, UNROLL=K <= 27)

        def grid(meta):
            return (slices, cdiv(C, meta["BLOCK_C"]))

        _launch("wgrad", channels_last, grid, args)

    reduce = REDUCE_INTERPRETER if settings.interpreting() else REDUCE
    block_c = min(reduce.kwargs["BLOCK_C"], next_power_of_2(C))
    rows = (K if need_weight else 0) + (1 if need_bias else 0)
    depthwise_wgrad_reduce_kernel[(cdiv(C, block_c), rows)](
        part, grad_weight if need_weight else part, grad_bias if need_bias else part,
        slices, C, K, NEED_WEIGHT=need_weight, BLOCK_S=reduce.kwargs["BLOCK_S"],
        BLOCK_C=block_c, num_warps=reduce.num_warps, num_stages=reduce.num_stages)
    return grad_weight, grad_bias
