"""input + trilinear upsampling of source (align_corners=True), the refine blocks' skip sum, in
Triton: one kernel, ``lerp_axis_kernel``, interpolates along one axis, and three launches make
the trilinear map, which is separable (the product of a linear map per axis).

With the tensors channels-last, (N, T, H, W, C) in memory, every axis is the middle one of a
contiguous (A, L, B) view: T of (N, T, H*W*C), H of (N*T, H, W*C), W of (N*T*H, W, C). Along an
axis of ``L_src`` positions sampled at ``L_dst`` (align_corners=True, PyTorch's formula):

    x = j * scale, scale = (L_src - 1) / (L_dst - 1) (0 when L_dst = 1), i0 = floor(x),
    i1 = min(i0 + 1, L_src - 1), lam = x - i0
    forward:    dst[a, j, b] = (1 - lam_j) * src[a, i0_j, b] + lam_j * src[a, i1_j, b]
    transposed: dst[a, i, b] = sum_j w_ij * src[a, j, b],
                w_ij = (i0_j == i) * (1 - lam_j) + (i1_j == i) * lam_j

The transposed map is the gradient, gathered (no atomics): output i takes the positions j whose
i0 is i - 1 or i, a window of at most int(2 / scale) + 4. Forward: T, then H, then W, the last
pass adding ``input`` (the sizes grow pass by pass); backward: W, H, T, each pass summing in fp32.
An axis whose size does not change is an identity and skipped. Intermediates are fp32.
Bandwidth-bound; not tuned (one config).
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, channels_last, next_power_of_2


@triton.jit
def _position(j, scale, L_src):
    """(i0, i1, lam) of destination position j (forward) along an axis of L_src positions."""
    x = j.to(tl.float32) * scale
    i0 = tl.minimum(x.to(tl.int32), L_src - 1)          # x >= 0: truncation is the floor
    i1 = tl.minimum(i0 + 1, L_src - 1)
    return i0, i1, x - i0.to(tl.float32)


@triton.jit
def lerp_axis_kernel(
    src_ptr,        # (A, L_src, B) contiguous (forward) or (A, L_dst, B) (TRANSPOSE)
    dst_ptr,        # (A, L_dst, B) (forward) or (A, L_src, B) (TRANSPOSE); its dtype is written
    add_ptr,        # (A, L_dst, B), added to the forward's result (HAS_ADD), else any pointer
    B, L_src, L_dst, n_b,       # n_b: B blocks a row
    scale,          # (L_src - 1) / (L_dst - 1), 0 when L_dst = 1
    inv_scale,      # 1 / scale, 0 when scale = 0 (TRANSPOSE's window)
    taps,           # TRANSPOSE: positions j tried per output, int(2 * inv_scale) + 4 (L_dst
                    # when scale = 0: every position samples position 0)
    TRANSPOSE: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    a = (pid // n_b).to(tl.int64)
    offs_b = (pid % n_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    m_b = offs_b < B
    j = tl.program_id(1)                    # this program's output position along the axis
    if not TRANSPOSE:
        i0, i1, lam = _position(j, scale, L_src)
        row = src_ptr + a * L_src * B + offs_b
        v0 = tl.load(row + i0.to(tl.int64) * B, mask=m_b, other=0.0).to(tl.float32)
        v1 = tl.load(row + i1.to(tl.int64) * B, mask=m_b, other=0.0).to(tl.float32)
        acc = v0 * (1.0 - lam) + v1 * lam
        out = (a * L_dst + j) * B + offs_b
        if HAS_ADD:
            acc += tl.load(add_ptr + out, mask=m_b, other=0.0).to(tl.float32)
    else:
        # j here is the source position i; the destination positions sampling it lie in a
        # window from (i - 1) / scale
        first = tl.maximum((j - 1).to(tl.float32) * inv_scale, 0.0).to(tl.int32) - 1
        first = tl.maximum(first, 0)
        acc = tl.zeros([BLOCK_B], tl.float32)
        row = src_ptr + a * L_dst * B + offs_b
        for t in range(0, taps):
            jj = first + t
            i0, i1, lam = _position(jj, scale, L_src)
            w = tl.where(i0 == j, 1.0 - lam, 0.0) + tl.where(i1 == j, lam, 0.0)
            if (jj < L_dst) & (w != 0.0):
                acc += w * tl.load(row + jj.to(tl.int64) * B, mask=m_b, other=0.0).to(tl.float32)
        out = (a * L_src + j) * B + offs_b
    tl.store(dst_ptr + out, acc.to(dst_ptr.dtype.element_ty), mask=m_b)


def _scales(L_src, L_dst):
    """(scale, inv_scale, taps) of one axis, as lerp_axis_kernel takes them."""
    scale = (L_src - 1) / (L_dst - 1) if L_dst > 1 else 0.0
    if scale == 0:              # one source position (or one destination): it takes them all
        return scale, 0.0, L_dst
    return scale, 1.0 / scale, int(2 / scale) + 4


def _lerp(src, dst, A, L_src, L_dst, B, transpose, add=None):
    """One lerp_axis_kernel launch over (A, L, B) views of contiguous src and dst."""
    scale, inv, taps = _scales(L_src, L_dst)
    block = min(1024, next_power_of_2(B))
    n_b = cdiv(B, block)
    grid = (A * n_b, L_src if transpose else L_dst)
    lerp_axis_kernel[grid](src, dst, add if add is not None else dst, B, L_src, L_dst, n_b,
                           scale, inv, taps, TRANSPOSE=transpose, HAS_ADD=add is not None,
                           BLOCK_B=block, num_warps=4 if block >= 512 else 2)


def upsample_add_fwd(input, source, out_dtype):
    """input (N, C, T, H, W) + source (N, C, Ts, Hs, Ws) upsampled to (T, H, W); returned
    channels-last in ``out_dtype``."""
    N, C, T, H, W = input.shape
    _, _, Ts, Hs, Ws = source.shape
    x = channels_last(source)
    # T, then H, into fp32 (identity axes skipped), then W with the sum
    for A, L_src, L_dst, B, shape in ((N, Ts, T, Hs * Ws * C, (N, T, Hs, Ws, C)),
                                      (N * T, Hs, H, Ws * C, (N, T, H, Ws, C))):
        if L_src != L_dst:
            y = torch.empty(shape, device=input.device, dtype=torch.float32)
            _lerp(x, y, A, L_src, L_dst, B, transpose=False)
            x = y
    out = torch.empty_like(input, dtype=out_dtype, memory_format=torch.channels_last_3d)
    add = channels_last(input)
    if Ws != W:
        _lerp(x, out, N * T * H, Ws, W, C, transpose=False, add=add)
    else:
        torch.add(add, x, out=out.permute(0, 2, 3, 4, 1))
    return out


def upsample_add_bwd(grad_out, size, dtype):
    """The gradient of the source, (N, C, *size) channels-last in ``dtype``, from grad_out (N, C,
    T, H, W); the input's gradient is grad_out itself."""
    N, C, T, H, W = grad_out.shape
    Ts, Hs, Ws = size
    g = channels_last(grad_out)
    steps = [step for step in ((N * T * H, Ws, W, C, (N, T, H, Ws, C)),
                               (N * T, Hs, H, Ws * C, (N, T, Hs, Ws, C)),
                               (N, Ts, T, Hs * Ws * C, (N, Ts, Hs, Ws, C))) if step[1] != step[2]]
    for k, (A, L_src, L_dst, B, shape) in enumerate(steps):
        last = k == len(steps) - 1
        y = torch.empty(shape, device=g.device, dtype=dtype if last else torch.float32)
        _lerp(g, y, A, L_src, L_dst, B, transpose=True)
        g = y
    return g.to(dtype).permute(0, 4, 1, 2, 3)
