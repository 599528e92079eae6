"""Triton helpers shared by the forward and backward kernels: where a kernel point samples, and
the trilinear gather / scatter of its corners over a block of channels.

Notation inside kernels: a block holds BLOCK_M output voxels (rows) and BLOCK_C input channels
(columns) of the channels-last input (N, T, H, W, C). One kernel point of one output voxel samples
the position (z, y, x); along each axis it reads the corner ``i0`` and, where the position is not
known at compile time to be an integer, ``i0 + 1`` too.

Kernel points are visited by *tap class*: ``TAPS`` (bits z: 4, y: 2, x: 1) names the axes along
which a point reads two corners. Free offsets put all K points in class 7 (8 corners), or in
class 3 (4 corners) when they do not move the t axis ((y, x) pairs: the 2D ops). A D²Conv
position is an integer along an axis its mode does not scale and wherever the kernel index is the
centre, so a 3x3x3 xyz kernel has 8 points reading 8 corners, 12 reading 4, 6 reading 2 and the
centre reading 1 (125 loads instead of 216); in modes x/xy the t axis never needs a second tap.
Each kernel loops statically over the (at most 8) classes and at run time over the points of a
class, which keeps the code small and the corner loads of one point unrolled.

Per axis, ``SZ_CH``, ``SY_CH`` and ``SX_CH`` name the size channel (D²Conv) or the offset
component (free offsets: a kernel point's offsets are SX_CH + 1 channels) that moves it; -1: the
axis is not moved.

Triton turns a constexpr assigned to a local name into a tensor, so compile-time quantities are
passed inline as arguments (``class_points(...)``) rather than kept in locals.

The Gluon forward (kernels/hopper.py) calls these helpers too. Gluon tensors carry a layout, so
no helper creates a tensor from a shape alone: a constant tile is ``tl.where(like, c, c)`` on a
tensor of the wanted shape (folded to a constant by the compiler) and tiles start from their
first term.
"""
import triton
import triton.language as tl


@triton.constexpr_function
def axis_points(two, ksize, is_offset, axis_ch):
    """How many kernel indices along one axis read two corners (two=True) or one (two=False)."""
    if axis_ch < 0:          # an axis not moved: every index is an integer
        return 0 if two else ksize
    if is_offset:            # free offsets: every index reads two corners
        return ksize if two else 0
    return ksize - 1 if two else 1   # scaled axis: all but the centre read two corners


@triton.constexpr_function
def class_points(TAPS, KD, KH, KW, IS_OFFSET, SZ_CH, SY_CH, SX_CH):
    """Number of kernel points in tap class TAPS."""
    return (axis_points(TAPS & 4 != 0, KD, IS_OFFSET, SZ_CH)
            * axis_points(TAPS & 2 != 0, KH, IS_OFFSET, SY_CH)
            * axis_points(TAPS & 1 != 0, KW, IS_OFFSET, SX_CH))


@triton.jit
def _axis_index(r, TWO: tl.constexpr, KSIZE: tl.constexpr, IS_OFFSET: tl.constexpr,
                AXIS_CH: tl.constexpr):
    """The r-th kernel index along one axis among those reading TWO corners or one."""
    if IS_OFFSET or AXIS_CH < 0:
        return r
    elif TWO:
        return r + (r >= KSIZE // 2).to(tl.int32)     # skip the centre
    else:
        return r * 0 + KSIZE // 2


@triton.jit
def class_point(r, TAPS: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr,
                SX_CH: tl.constexpr):
    """Kernel indices (i, j, l) of the r-th point of tap class TAPS (run-time scalars)."""
    r_x = r % axis_points(TAPS % 2 == 1, KW, IS_OFFSET, SX_CH)
    r_y = r // axis_points(TAPS % 2 == 1, KW, IS_OFFSET, SX_CH) % axis_points(
        (TAPS >> 1) % 2 == 1, KH, IS_OFFSET, SY_CH)
    r_z = r // (axis_points(TAPS % 2 == 1, KW, IS_OFFSET, SX_CH)
                * axis_points((TAPS >> 1) % 2 == 1, KH, IS_OFFSET, SY_CH))
    return (_axis_index(r_z, (TAPS >> 2) % 2 == 1, KD, IS_OFFSET, SZ_CH),
            _axis_index(r_y, (TAPS >> 1) % 2 == 1, KH, IS_OFFSET, SY_CH),
            _axis_index(r_x, TAPS % 2 == 1, KW, IS_OFFSET, SX_CH))


@triton.jit
def output_voxels(pid_m, M, To, Ho, Wo, BLOCK_M: tl.constexpr):
    """The BLOCK_M output voxels (rows) of program pid_m, of M = N * To * Ho * Wo.

    Returns (offs_m, m_ok, n64, sp, to, ho, wo): the rows and their mask, each row's sample
    (int64), its voxel index inside the sample (sp < To * Ho * Wo) and that voxel's coordinates.
    """
    L = To * Ho * Wo
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    sp = offs_m % L
    return (offs_m, offs_m < M, (offs_m // L).to(tl.int64), sp, sp // (Wo * Ho), sp // Wo % Ho,
            sp % Wo)


@triton.jit
def size_delta(s, idx, KSIZE: tl.constexpr, D: tl.constexpr):
    """D²Conv's offset along one axis of kernel index ``idx`` at scale ``s``: the kernel grid
    scaled about its centre, (s - 1) * (idx - centre) * dilation, in fp32 (the float ops of
    offsets_from_size). Shared by the kernels that sample and the pulled input gradient, whose
    weights must see the very same positions."""
    return (s - 1.0) * ((idx - KSIZE // 2) * D).to(tl.float32)


@triton.jit
def axis_taps(base, delta, size, TWO: tl.constexpr):
    """One axis of a sample at ``base + delta``.

    base:  [BLOCK_M] int32, the undeformed position (stride * out - pad + index * dilation)
    delta: [BLOCK_M] fp32, the offset along this axis (ignored when TWO is False)
    Returns (i0, frac, ok0, ok1): the lower corner, the fraction toward i0 + 1, and whether the
    corners i0 and i0 + 1 lie inside [0, size). With TWO False the position is the integer
    ``base`` and frac is 0.
    """
    if TWO:
        p = base.to(tl.float32) + delta
        # far-away samples: clamp so the int conversion cannot overflow (all corners stay outside)
        p = tl.minimum(tl.maximum(p, -2.0), size + 1.0)
        p0 = tl.floor(p)
        frac = p - p0
        i0 = p0.to(tl.int32)
    else:
        i0 = base
        frac = tl.where(base == base, 0.0, 0.0)
    return i0, frac, (i0 >= 0) & (i0 < size), (i0 >= -1) & (i0 < size - 1)


@triton.jit
def _tap(c: tl.constexpr, frac, ok0, ok1):
    """Weight and validity of tap c (0: i0, 1: i0 + 1) along one axis."""
    if c == 0:
        return 1.0 - frac, ok0
    else:
        return frac, ok1


@triton.jit
def gather_tile(x_ptr, row0, ch, ch_ok, HWC, WC, C,
                fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale, TAPS: tl.constexpr,
                BLEND_16: tl.constexpr = False):
    """Trilinear samples of one kernel point over a block of channels.

    row0:  [BLOCK_M] int64, element offset of corner (i0, j0, l0) of each sample (channel 0)
    ch:    [BLOCK_C] int32, channel indices; ch_ok their mask
    scale: [BLOCK_M] fp32, multiplies every corner weight (the modulation mask, or 1)
    BLEND_16: blend in the input's 16-bit dtype (two channels an instruction, no conversions)
    Returns the [BLOCK_M, BLOCK_C] tile of scale * value, fp32 (or the input's dtype).
    """
    for cz in tl.static_range(1 + (TAPS >> 2) % 2):
        wz, okz = _tap(cz, fz, okz0, okz1)
        for cy in tl.static_range(1 + (TAPS >> 1) % 2):
            wy, oky = _tap(cy, fy, oky0, oky1)
            for cx in tl.static_range(1 + TAPS % 2):
                wx, okx = _tap(cx, fx, okx0, okx1)
                ok = okz & oky & okx
                ptr = x_ptr + (row0 + (cz * HWC + cy * WC + cx * C))[:, None] + ch[None, :]
                v = tl.load(ptr, mask=ok[:, None] & ch_ok[None, :], other=0.0)
                if BLEND_16:
                    w = tl.broadcast_to((wz * wy * wx * scale).to(v.dtype)[:, None], v.shape)
                    if cz + cy + cx == 0:
                        value = _packed_fma(w, v, v, True)
                    else:
                        value = _packed_fma(w, v, value, False)
                else:
                    term = (wz * wy * wx * scale)[:, None] * v.to(tl.float32)
                    if cz + cy + cx == 0:       # the first corner starts the sum
                        value = term
                    else:
                        value += term
    return value


@triton.jit
def _packed_fma(w, v, acc, FIRST: tl.constexpr):
    """w * v (FIRST) or w * v + acc on pairs of 16-bit values, two channels an instruction
    (LLVM emits 16-bit arithmetic one value at a time); bf16x2 needs sm_90."""
    if v.dtype == tl.bfloat16:
        if FIRST:
            return tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [w, v],
                                             dtype=v.dtype, is_pure=True, pack=2)
        return tl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                         [w, v, acc], dtype=v.dtype, is_pure=True, pack=2)
    else:
        if FIRST:
            return tl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [w, v],
                                             dtype=v.dtype, is_pure=True, pack=2)
        return tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                         [w, v, acc], dtype=v.dtype, is_pure=True, pack=2)


@triton.jit
def gather_dot(x_ptr, row0, ch, ch_ok, HWC, WC, C, grad, t_v, t_z, t_y, t_x,
               fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, TAPS: tl.constexpr):
    """Accumulate grad * (value and its position derivatives) of one kernel point, unreduced;
    return them with the sampled value.

    grad: [BLOCK_M, BLOCK_C] fp32, the gradient of the sampled (unmasked) values.
    t_v, t_z, t_y, t_x: [BLOCK_M, BLOCK_C] fp32 accumulators (in the layout of grad) of
    grad * value, grad * dvalue/dz, .../dy, .../dx; their row sums, taken once per kernel point
    by the caller, are the mask and position gradients. Summing rows per corner instead costs a
    layout conversion and a cross-warp reduction per corner. The two x corners are taken as a
    pair: their lerp along x feeds the value and the z and y derivatives, grad * (their
    difference) feeds t_x: fewer operations per element than weighting each corner apart (and
    fewer registers: docs/design.md#tap-classes). The derivatives are right derivatives (corners
    held fixed); an axis with one tap leaves its accumulator untouched.
    Returns (t_v, t_z, t_y, t_x, value): value is the fp32 [BLOCK_M, BLOCK_C] trilinear sample
    (what gather_tile gives with scale 1), the weight gradient's column.
    """
    value = tl.zeros(grad.shape, tl.float32)
    for cz in tl.static_range(1 + (TAPS >> 2) % 2):
        wz, okz = _tap(cz, fz, okz0, okz1)
        for cy in tl.static_range(1 + (TAPS >> 1) % 2):
            wy, oky = _tap(cy, fy, oky0, oky1)
            ok = okz & oky
            ptr = x_ptr + (row0 + (cz * HWC + cy * WC))[:, None] + ch[None, :]
            v0 = tl.load(ptr, mask=(ok & okx0)[:, None] & ch_ok[None, :], other=0.0).to(tl.float32)
            if TAPS % 2 == 1:
                # the x pair at once: its lerp along x and its x difference
                v1 = tl.load(ptr + C, mask=(ok & okx1)[:, None] & ch_ok[None, :],
                             other=0.0).to(tl.float32)
                dx = v1 - v0
                v = v0 + fx[:, None] * dx
                t_x += (wz * wy)[:, None] * (grad * dx)
            else:
                v = v0
            value += (wz * wy)[:, None] * v
            p = grad * v                # compiled away where z and y have one tap each
            if (TAPS >> 2) % 2 == 1:
                t_z += ((2 * cz - 1) * wy)[:, None] * p
            if (TAPS >> 1) % 2 == 1:
                t_y += ((2 * cy - 1) * wz)[:, None] * p
    t_v += grad * value
    return t_v, t_z, t_y, t_x, value


@triton.jit
def scatter_tile(gx_ptr, row0, ch, ch_ok, HWC, WC, C, grad, fz, fy, fx, okz0, okz1, oky0, oky1,
                 okx0, okx1, scale, fixed_scale, FIXED_POINT: tl.constexpr, TAPS: tl.constexpr):
    """The transpose of gather_tile's value: add corner_weight * scale * grad into each corner.

    gx_ptr: fp32 buffer shaped like the channels-last input; grad: [BLOCK_M, BLOCK_C] fp32.
    FIXED_POINT: gx_ptr is int64 and takes each contribution times fixed_scale (a power of two),
    rounded to an integer: integer sums do not depend on the order the atomics land in, so the
    result is bitwise reproducible (the caller picks the scale so that no sum overflows).
    Corners outside the volume or with zero weight are skipped.
    """
    for cz in tl.static_range(1 + (TAPS >> 2) % 2):
        wz, okz = _tap(cz, fz, okz0, okz1)
        for cy in tl.static_range(1 + (TAPS >> 1) % 2):
            wy, oky = _tap(cy, fy, oky0, oky1)
            for cx in tl.static_range(1 + TAPS % 2):
                wx, okx = _tap(cx, fx, okx0, okx1)
                w = wz * wy * wx * scale
                ok = okz & oky & okx & (w != 0.0)
                ptr = gx_ptr + (row0 + (cz * HWC + cy * WC + cx * C))[:, None] + ch[None, :]
                value = w[:, None] * grad
                if FIXED_POINT:
                    value = value * fixed_scale
                    value = (value + tl.where(value >= 0, 0.5, -0.5)).to(tl.int64)
                tl.atomic_add(ptr, value, mask=ok[:, None] & ch_ok[None, :], sem="relaxed")


@triton.jit
def offset_component(coord_ptr, coord_row, k, AXIS_CH: tl.constexpr, PER_POINT: tl.constexpr, L,
                     sp_ok):
    """[BLOCK_M] fp32 offset of kernel point k along an axis (component AXIS_CH of PER_POINT);
    zero for an axis without one (AXIS_CH < 0)."""
    if AXIS_CH >= 0:
        return tl.load(coord_ptr + coord_row + (k * PER_POINT + AXIS_CH) * L, mask=sp_ok,
                       other=0.0).to(tl.float32)
    else:
        return tl.where(sp_ok, 0.0, 0.0)


@triton.jit
def kernel_point(coord_ptr, coord_row, mask_ptr, mask_row, L, sp_ok, n64, i, j, l, to, ho, wo,
                 s_z, s_y, s_x, C, T, H, W, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                 SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                 PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                 DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                 IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr, SY_CH: tl.constexpr,
                 SX_CH: tl.constexpr, HAS_MASK: tl.constexpr, TAPS: tl.constexpr):
    """Where kernel point (i, j, l) (k = (i*KH + j)*KW + l) samples, for a block of voxels.

    coord_row: [BLOCK_M] int64, element offset of (n, channel 0 of this offset group, voxel) in
    the offset tensor, read when IS_OFFSET: the offset along an axis with component a >= 0
    (SZ_CH, SY_CH, SX_CH) is channel k*(SX_CH + 1) + a, (k*(SX_CH + 1) + a)*L elements further.
    mask_row: [BLOCK_M] int64, the same for the mask (channel k is k*L further), read if HAS_MASK.
    s_z, s_y, s_x: [BLOCK_M] fp32 D²Conv scales (see load_sizes; unused when IS_OFFSET).
    sp_ok: [BLOCK_M] row mask; corners of masked rows are all invalid.
    Returns (row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale): the element offset
    of corner (z0, y0, x0) in the channels-last input, the fractions and corner validities of
    axis_taps, and the mask value (1 without mask, 0 on masked rows).
    """
    bz = to * SD - PD + i * DD
    by = ho * SH - PH + j * DH
    bx = wo * SW - PW + l * DW
    k = (i * KH + j) * KW + l
    if IS_OFFSET:
        d_z = offset_component(coord_ptr, coord_row, k, SZ_CH, SX_CH + 1, L, sp_ok)
        d_y = offset_component(coord_ptr, coord_row, k, SY_CH, SX_CH + 1, L, sp_ok)
        d_x = offset_component(coord_ptr, coord_row, k, SX_CH, SX_CH + 1, L, sp_ok)
    else:
        d_z = size_delta(s_z, i, KD, DD)
        d_y = size_delta(s_y, j, KH, DH)
        d_x = size_delta(s_x, l, KW, DW)
    z0, fz, okz0, okz1 = axis_taps(bz, d_z, T, (TAPS >> 2) % 2 == 1)
    # rows past the last voxel read and write nothing
    okz0 = okz0 & sp_ok
    okz1 = okz1 & sp_ok
    y0, fy, oky0, oky1 = axis_taps(by, d_y, H, (TAPS >> 1) % 2 == 1)
    x0, fx, okx0, okx1 = axis_taps(bx, d_x, W, TAPS % 2 == 1)
    if HAS_MASK:
        scale = tl.load(mask_ptr + mask_row + k * L, mask=sp_ok, other=0.0).to(tl.float32)
    else:
        scale = tl.where(sp_ok, 1.0, 0.0)
    row0 = (((n64 * T + z0) * H + y0) * W + x0) * C
    return row0, fz, fy, fx, okz0, okz1, oky0, oky1, okx0, okx1, scale


@triton.jit
def load_sizes(coord_ptr, coord_row, L, sp_ok, IS_OFFSET: tl.constexpr, SZ_CH: tl.constexpr,
               SY_CH: tl.constexpr, SX_CH: tl.constexpr):
    """The [BLOCK_M] fp32 scales (s_z, s_y, s_x) of one offset group; 1 where the mode fixes it
    (and for free offsets, which have none)."""
    one = tl.where(sp_ok, 1.0, 1.0)
    s_z = one
    s_y = one
    s_x = one
    if not IS_OFFSET:
        if SZ_CH >= 0:
            s_z = tl.load(coord_ptr + coord_row + SZ_CH * L, mask=sp_ok, other=1.0).to(tl.float32)
        if SY_CH >= 0:
            s_y = tl.load(coord_ptr + coord_row + SY_CH * L, mask=sp_ok, other=1.0).to(tl.float32)
        if SX_CH >= 0:
            s_x = tl.load(coord_ptr + coord_row + SX_CH * L, mask=sp_ok, other=1.0).to(tl.float32)
    return s_z, s_y, s_x
