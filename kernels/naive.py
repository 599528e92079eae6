"""Vectorised PyTorch reference of the operators (docs/operators.md; never imports Triton).

It is the CPU implementation (what a CPU user trains with) and, run in float64, the reference
the Triton kernels are tested against. It materialises the sampled columns (N, C, K, To*Ho*Wo),
so it is memory hungry: fine for tests and small CPU models, not for the paper's shapes.

Autograd through it gives exactly the gradient convention of docs/operators.md: ``floor`` has no
gradient, so the derivative is taken with the corner held fixed (the right derivative at integer
coordinates) and corners outside the volume contribute nothing.
"""
import itertools

import torch
import torch.nn.functional as F

from .checks import (OFFSET_AXES, SIZE_AXES, SIZE_CHANNELS, check_args, check_depthwise,
                     check_group_norm, check_upsample_add, triple)


def _kernel_grid(kernel, dilation, device, dtype):
    """Kernel-point coordinates (K, 3): (i*dd, j*dh, l*dw) in the order k = (i*kh + j)*kw + l."""
    axes = [torch.arange(k, device=device, dtype=dtype) * d for k, d in zip(kernel, dilation)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def offsets_from_size(size, kernel_size, dilation=1, mode="xyz"):
    """Expand a D²Conv size map into the equivalent deformable-conv offsets.

    size:   (N, G*c, To, Ho, Wo), c = 1, 2, 2, 3 for mode x, xy, xxz, xyz
    return: (N, G*K*3, To, Ho, Wo), channel (g*K + k)*3 + a, a = 0:t, 1:y, 2:x, with
            offset_k = (kernel index - kernel centre) * dilation * (s - 1) per axis.
    """
    kernel, dilation = triple(kernel_size, "kernel_size"), triple(dilation, "dilation")
    if mode not in SIZE_CHANNELS:
        raise ValueError(f"mode must be one of {sorted(SIZE_CHANNELS)}, got {mode!r}")
    c = SIZE_CHANNELS[mode]
    N, Gc = size.shape[:2]
    G = Gc // c
    s = size.reshape(N, G, c, *size.shape[2:])
    one = torch.ones_like(s[:, :, 0])
    s_z, s_y, s_x = (one if a is None else s[:, :, a] for a in SIZE_AXES[mode])
    centre = torch.tensor([(k // 2) * d for k, d in zip(kernel, dilation)], dtype=size.dtype,
                          device=size.device)
    coef = _kernel_grid(kernel, dilation, size.device, size.dtype) - centre   # (K, 3)
    scale = torch.stack([s_z, s_y, s_x], dim=2) - 1                           # (N, G, 3, ...)
    spatial = (1,) * (size.dim() - 2)
    offset = coef.view(1, 1, -1, 3, *spatial) * scale.unsqueeze(2)            # (N, G, K, 3, ...)
    return offset.reshape(N, -1, *size.shape[2:])


def deform_conv3d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                  groups=1, mode="offset"):
    """Reference deformable 3D convolution; shapes as in ``kernels.deform_conv3d``. With mode
    "offset_yx" the offset holds (y, x) pairs, (N, G*K*2, To, Ho, Wo): the t axis is not moved
    (deform_conv2d at T = 1)."""
    geo = check_args(input, offset, weight, bias, stride, padding, dilation, mask, groups, mode)
    if mode == "offset":
        return _deform_conv3d(geo, input, offset, weight, bias, mask)
    axes = OFFSET_AXES[mode]
    parts = offset.reshape(offset.shape[0], geo.offset_groups * geo.K, -1, *geo.out)
    zero = torch.zeros_like(parts[:, :, :1])
    offset = torch.cat([zero if a is None else parts[:, :, a:a + 1] for a in axes], 2)
    # an axis without an offset samples integers: one corner
    fixed = [[a is None for a in axes]] * geo.K
    return _deform_conv3d(geo, input, offset.flatten(1, 2), weight, bias, mask, fixed)


def d2conv3d(input, size, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, groups=1,
             mode="xyz"):
    """Reference dynamic dilated 3D convolution: ``deform_conv3d`` on ``offsets_from_size``."""
    geo = check_args(input, size, weight, bias, stride, padding, dilation, mask, groups, mode)
    # offsets in at least float32, as the kernels compute them from the size map
    size = size.to(torch.promote_types(size.dtype, torch.float32))
    offset = offsets_from_size(size, geo.kernel, geo.dilation, mode)
    # an axis whose kernel index is the centre, or that has no size in this mode, keeps its
    # offset at zero: its samples sit on integers, so one corner (not two) gives the value and
    # the (zero) gradient there
    fixed = [[index == k // 2 or axis is None
              for index, k, axis in zip(point, geo.kernel, SIZE_AXES[mode])]
             for point in itertools.product(*map(range, geo.kernel))]
    return _deform_conv3d(geo, input, offset, weight, bias, mask, fixed)


class _Blend(torch.autograd.Function):
    """cols (M, c) = sum_j weight[j] (M,) * vol[rows[j]] (M, c): the trilinear blend of the corner
    rows of a channels-last volume. The backward gathers the corners again instead of keeping 8
    copies of cols, and reuses one buffer (large CPU allocations cost more than the arithmetic)."""

    @staticmethod
    def forward(ctx, vol, rows, weight):
        ctx.save_for_backward(vol, rows, weight)
        cols, value = vol.new_zeros(rows.shape[1], vol.shape[1]), None
        for j in range(rows.shape[0]):
            value = torch.index_select(vol, 0, rows[j], out=value)
            cols.addcmul_(value, weight[j].unsqueeze(1))
        return cols

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        vol, rows, weight = ctx.saved_tensors
        grad_vol = torch.zeros_like(vol) if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[2] else None
        buf = torch.empty_like(grad)
        for j in range(rows.shape[0]):
            if grad_weight is not None:       # d cols / d weight[j] = the corner's values
                grad_weight[j] = torch.index_select(vol, 0, rows[j], out=buf).mul_(grad).sum(1)
            if grad_vol is not None:
                grad_vol.index_add_(0, rows[j], torch.mul(grad, weight[j].unsqueeze(1), out=buf))
        return grad_vol, None, grad_weight


def _deform_conv3d(geo, input, offset, weight, bias, mask, fixed=None):
    """``fixed``: per kernel point, the axes (t, y, x) whose offset is zero by construction
    (D²Conv), sampled with one corner instead of two; None: every axis takes two."""
    N, C, T, H, W = input.shape
    G, K, groups = geo.offset_groups, geo.K, geo.groups
    To, Ho, Wo = geo.out
    L = To * Ho * Wo
    # compute in at least float32 (half-precision inputs are upcast, like the kernels' fp32 math)
    out_dtype = input.dtype
    dtype, device = torch.promote_types(input.dtype, torch.float32), input.device
    input, offset, weight = input.to(dtype), offset.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    mask = None if mask is None else mask.to(dtype)

    # sampling positions, one (N, G, K, L) tensor per axis
    base = [torch.arange(o, device=device, dtype=dtype) * s - p
            for o, s, p in zip(geo.out, geo.stride, geo.padding)]
    base = torch.stack(torch.meshgrid(*base, indexing="ij"), dim=0).reshape(3, 1, 1, 1, L)
    kpt = _kernel_grid(geo.kernel, geo.dilation, device, dtype).T.reshape(3, 1, 1, K, 1)
    off = offset.reshape(N, G, K, 3, L)

    # per axis: the two corners (floor held fixed) and their linear weights, zero for a corner
    # outside the volume (its index is then clamped to any valid one)
    corners = []
    for a, n in enumerate((T, H, W)):
        p = base[a] + kpt[a] + off[:, :, :, a]
        p0 = torch.floor(p).detach().clamp(-2, n)     # far-away corners: invalid, no overflow
        f = p - p0
        i = torch.stack([p0, p0 + 1])                                         # (2, N, G, K, L)
        corners.append((i.clamp(0, n - 1).long(), torch.stack([1 - f, f]) * ((i >= 0) & (i < n))))
    if mask is not None:        # folds into the (small) corner weights of one axis
        ix, wx = corners[2]
        corners[2] = ix, wx * mask.reshape(N, G, K, L)
    # rows of a channels-last volume (N*G*T*H*W, C/G)
    vol = input.reshape(N, G, C // G, T * H * W).transpose(2, 3).reshape(-1, C // G)
    first_row = (torch.arange(N * G, device=device) * (T * H * W)).view(N, G, 1, 1)
    # out (N, Co, L) = W (groups, Co/groups, C/groups * K) . cols, one GEMM per conv group, summed
    # over the sets of kernel points that take the same corners
    Cgr = C // groups
    w = weight.reshape(groups, -1, Cgr, K).permute(0, 3, 2, 1)            # (groups, K, Cgr, Cog)
    point_sets = {}
    for k in range(K):
        point_sets.setdefault(tuple(fixed[k]) if fixed else (False,) * 3, []).append(k)
    out = None
    for axes_fixed, ks in point_sets.items():
        ks = torch.tensor(ks, device=device)
        (iz, wz), (iy, wy), (ix, wx) = (
            (i.index_select(3, ks)[:1 if one else 2], wt.index_select(3, ks)[:1 if one else 2])
            for (i, wt), one in zip(corners, axes_fixed))
        # the J corners, j = (cz, cy, cx), as (J, N, L, k, G)
        index = (iz[:, None, None] * H + iy[None, :, None]) * W + ix[None, None, :]
        weights = wz[:, None, None] * wy[None, :, None] * wx[None, None, :]
        rows = (index + first_row).flatten(0, 2).permute(0, 1, 4, 3, 2)
        weights = weights.flatten(0, 2).permute(0, 1, 4, 3, 2)
        cols = _Blend.apply(vol, rows.reshape(rows.shape[0], -1),
                            weights.reshape(rows.shape[0], -1))          # (N*L*k*G, C/G)
        cols = cols.view(N * L, len(ks), groups, Cgr).permute(2, 0, 1, 3)
        part = torch.bmm(cols.reshape(groups, N * L, -1),
                         w.index_select(1, ks).reshape(groups, len(ks) * Cgr, -1))
        out = part if out is None else out + part
    out = out.view(groups, N, L, -1).permute(1, 0, 3, 2).reshape(N, -1, To, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out.to(out_dtype)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, relu=False,
               input_bias=None):
    """Reference GroupNorm of x = input (+ input_bias per channel), of ReLU(x) with ``relu``;
    shapes as in ``kernels.group_norm``. Input bias, statistics and affine in fp32 (float64 for
    float64 input), the output in the input's dtype and memory format, also under autocast."""
    check_group_norm(input, num_groups, weight, bias, eps, input_bias)
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    C = input.shape[1]
    x = input.to(dtype)
    if input_bias is not None:
        x = x + input_bias.to(dtype).view(C, *[1] * (input.dim() - 2))
    x = F.relu(x) if relu else x
    # F.group_norm's CPU backward fails on a bias without a weight and on channels-last input
    # (PyTorch 2.13): both are given, and the input is contiguous
    if (weight is None) != (bias is None):
        weight = torch.ones(C, device=input.device) if weight is None else weight
        bias = torch.zeros(C, device=input.device) if bias is None else bias
    weight, bias = (None if t is None else t.to(dtype) for t in (weight, bias))
    with torch.autocast(input.device.type, enabled=False):
        out = F.group_norm(x.contiguous(), num_groups, weight, bias, eps)
    return out.to(input.dtype).contiguous(memory_format=_memory_format(input))


def upsample_add(input, source):
    """Reference of ``kernels.upsample_add``: the composite it replaces."""
    check_upsample_add(input, source)
    return input + F.interpolate(source, size=input.shape[2:], mode="trilinear",
                                 align_corners=True)


def _memory_format(t):
    """channels_last(_3d) for a 4-D (5-D) tensor laid out so and not also contiguous, else
    contiguous_format."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if t.dim() in formats and not t.is_contiguous() and t.is_contiguous(
            memory_format=formats[t.dim()]):
        return formats[t.dim()]
    return torch.contiguous_format


def depthwise_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """Reference depthwise 3D convolution (``F.conv3d`` with groups = C); shapes as in
    ``kernels.depthwise_conv3d``."""
    geo = check_depthwise(input, weight, bias, stride, padding, dilation)
    return F.conv3d(input, weight, bias, geo.stride, geo.padding, geo.dilation, groups=geo.C)
