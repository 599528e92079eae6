"""Deformable and dynamic-dilated 3D convolutions (docs/operators.md), forward and backward in
Triton.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels under the Triton
interpreter when TRITON_INTERPRET=1 is set, and the PyTorch reference (``kernels.naive``)
otherwise. Eager calls go through ``ops.Conv3dFunction``; torch.compile and meta tensors through
the ``torch.ops.d2conv`` custom ops (same kernels). Under ``torch.autocast`` every tensor
argument is cast to the autocast dtype, so the kernels run in bf16/fp16 on the tensor cores.
"""
import torch

# ops registers torch.ops.d2conv.* (Triton is imported on first use)
from . import naive, ops, settings
from .checks import SIZE_CHANNELS, check_args
from .naive import offsets_from_size
from .settings import set_autotune

__all__ = ["deform_conv3d", "d2conv3d", "offsets_from_size", "set_autotune", "SIZE_CHANNELS"]


def _use_triton(input):
    # meta tensors take the custom op too: its fake implementation gives the output's shape
    return input.is_cuda or input.device.type == "meta" or settings.interpreting()


def _autocast(*tensors):
    device = tensors[0].device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _run(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode):
    input, coords, weight, bias, mask = _autocast(input, coords, weight, bias, mask)
    if not _use_triton(input):
        if mode == "offset":
            return naive.deform_conv3d(input, coords, weight, bias, stride, padding, dilation,
                                       mask, groups)
        return naive.d2conv3d(input, coords, weight, bias, stride, padding, dilation, mask,
                              groups, mode)
    geo = check_args(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode)
    if input.device.type == "meta" or torch.compiler.is_compiling():
        return torch.ops.d2conv.conv3d(input, coords, weight, bias, mask, list(geo.stride),
                                       list(geo.padding), list(geo.dilation), groups, mode)
    return ops.Conv3dFunction.apply(input, coords, weight, bias, mask, geo, mode)


def deform_conv3d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None,
                  groups=1):
    """Deformable 3D convolution (DCNv1; DCNv2 when ``mask`` is given).

    input:  (N, C, T, H, W), any memory format
    offset: (N, G*K*3, To, Ho, Wo), K = kd*kh*kw, channel (g*K + k)*3 + a with a = 0:t, 1:y, 2:x
            and k = (i*kh + j)*kw + l; G, the offset groups, is inferred from the channel count
    weight: (Co, C/groups, kd, kh, kw); bias: (Co,) or None
    mask:   (N, G*K, To, Ho, Wo) or None, channel g*K + k (modulation, same groups as offset)
    stride, padding, dilation: int or (t, h, w); To = (T + 2*pd - dd*(kd-1) - 1)//sd + 1, ...
    return: (N, Co, To, Ho, Wo) (channels_last_3d memory format on the Triton path)

    Kernel point k of output voxel (t, h, w) samples input channel c (offset group g = c // (C/G))
    at (t*sd - pd + i*dd, h*sh - ph + j*dh, w*sw - pw + l*dw) + offset[g, k] by trilinear
    interpolation with zeros outside the volume. Gradients hold the interpolation corners fixed:
    the right derivative at integer coordinates, zero for samples entirely outside.
    """
    return _run(input, offset, weight, bias, stride, padding, dilation, mask, groups, "offset")


def d2conv3d(input, size, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, groups=1,
             mode="xyz"):
    """Dynamic dilated 3D convolution (D²Conv3D): the kernel grid scaled about its centre.

    input:  (N, C, T, H, W); weight, bias, mask, stride, padding, dilation, groups: as in
            deform_conv3d
    size:   (N, G*c, To, Ho, Wo), channel g*c + a, positive scales; c and the scale of each axis
            by mode: "x": 1, (1, s0, s0); "xy": 2, (1, s0, s1); "xxz": 2, (s0, s1, s1);
            "xyz": 3, (s0, s1, s2)
    return: (N, Co, To, Ho, Wo)

    Equals ``deform_conv3d(input, offsets_from_size(size, kernel, dilation, mode), ...)``: kernel
    point (i, j, l) samples at centre + (index - kernel centre) * dilation * s per axis. The
    offsets are never materialised, and the gradient of ``size`` is computed directly.
    """
    return _run(input, size, weight, bias, stride, padding, dilation, mask, groups, mode)
