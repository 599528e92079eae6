"""Vectorised PyTorch reference of SPEC §1 (never imports Triton).

It is the CPU implementation (what a CPU user trains with) and, run in float64, the reference
the Triton kernels are tested against. It materialises the sampled columns (N, C, K, To*Ho*Wo),
so it is memory hungry: fine for tests and small CPU models, not for the paper's shapes.

Autograd through it gives exactly the gradient convention of SPEC §1.1: ``floor`` has no
gradient, so the derivative is taken with the corner held fixed (the right derivative at integer
coordinates) and corners outside the volume contribute nothing.
"""
import torch

from .checks import SIZE_AXES, SIZE_CHANNELS, check_args, triple


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
                  groups=1):
    """Reference deformable 3D convolution; shapes as in ``kernels.deform_conv3d``."""
    geo = check_args(input, offset, weight, bias, stride, padding, dilation, mask, groups, "offset")
    return _deform_conv3d(geo, input, offset, weight, bias, mask)


def d2conv3d(input, size, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, groups=1,
             mode="xyz"):
    """Reference dynamic dilated 3D convolution: ``deform_conv3d`` on ``offsets_from_size``."""
    geo = check_args(input, size, weight, bias, stride, padding, dilation, mask, groups, mode)
    # offsets in at least float32, as the kernels compute them from the size map
    size = size.to(torch.promote_types(size.dtype, torch.float32))
    offset = offsets_from_size(size, geo.kernel, geo.dilation, mode)
    return _deform_conv3d(geo, input, offset, weight, bias, mask)


def _deform_conv3d(geo, input, offset, weight, bias, mask):
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

    # sampling positions (N, G, K, 3, To, Ho, Wo)
    base = [torch.arange(o, device=device, dtype=dtype) * s - p
            for o, s, p in zip(geo.out, geo.stride, geo.padding)]
    kpt = _kernel_grid(geo.kernel, geo.dilation, device, dtype)                 # (K, 3)
    pos_z = base[0].view(1, To, 1, 1) + kpt[:, 0].view(K, 1, 1, 1)
    pos_y = base[1].view(1, 1, Ho, 1) + kpt[:, 1].view(K, 1, 1, 1)
    pos_x = base[2].view(1, 1, 1, Wo) + kpt[:, 2].view(K, 1, 1, 1)
    off = offset.reshape(N, G, K, 3, To, Ho, Wo)
    z, y, x = pos_z + off[:, :, :, 0], pos_y + off[:, :, :, 1], pos_x + off[:, :, :, 2]

    z0, y0, x0 = (torch.floor(v).detach() for v in (z, y, x))
    frac = (z - z0, y - y0, x - x0)
    # clamp far-away corners so the integer conversion cannot overflow (they are invalid anyway)
    z0, y0, x0 = (v.clamp(-2, n).long() for v, n in ((z0, T), (y0, H), (x0, W)))
    vol = input.reshape(N, G, C // G, T * H * W)
    cols = 0
    for cz in (0, 1):
        for cy in (0, 1):
            for cx in (0, 1):
                iz, iy, ix = z0 + cz, y0 + cy, x0 + cx
                valid = (iz >= 0) & (iz < T) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
                weight_c = 1
                for f, c in zip(frac, (cz, cy, cx)):
                    weight_c = weight_c * (f if c else 1 - f)
                weight_c = weight_c * valid
                index = torch.where(valid, (iz * H + iy) * W + ix, 0).long()
                index = index.reshape(N, G, 1, K * L).expand(-1, -1, C // G, -1)
                value = torch.gather(vol, 3, index).view(N, G, C // G, K, L)
                cols = cols + value * weight_c.reshape(N, G, 1, K, L)
    if mask is not None:
        cols = cols * mask.reshape(N, G, 1, K, L)
    cols = cols.reshape(N, groups, C // groups, K, L)
    w = weight.reshape(groups, -1, C // groups, K)
    out = torch.einsum("ngckl,gock->ngol", cols, w).reshape(N, -1, To, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1, 1)
    return out.to(out_dtype)

