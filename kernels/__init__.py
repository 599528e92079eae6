"""Deformable and dynamic-dilated convolutions (docs/operators.md), forward and backward in
Triton: 3D, and 2D on the same kernels (a 2D call is a 3D one with one frame and a 1-deep kernel);
and the other operators of the paper's model that PyTorch runs far below the card's bandwidth:
GroupNorm (optionally of ReLU(input), in one pass), depthwise 3D convolution and the refine
blocks' sum of a feature and an upsampled coarser map.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels under the Triton
interpreter when TRITON_INTERPRET=1 is set, and the PyTorch reference (``kernels.naive``)
otherwise, as float64 tensors do everywhere. Eager calls go through ``ops.Conv3dFunction``;
torch.compile and meta tensors through the ``torch.ops.d2conv`` custom ops (same kernels).
Under ``torch.autocast`` every tensor argument is cast to the autocast dtype, so the kernels
run in bf16/fp16 on the tensor cores.
"""
import torch

# ops registers torch.ops.d2conv.* (Triton is imported on first use)
from . import naive, ops, settings
from .checks import (OFFSET_AXES, SIZE_CHANNELS, check_depthwise, check_group_norm,
                     check_upsample_add, checked_geometry, ntuple)
from .naive import offsets_from_size
from .settings import set_autotune

__all__ = ["deform_conv3d", "d2conv3d", "deform_conv2d", "d2conv2d", "group_norm",
           "depthwise_conv3d", "upsample_add", "offsets_from_size", "set_autotune", "settings",
           "SIZE_CHANNELS"]


def _use_triton(input):
    # meta tensors take the custom op too: its fake implementation gives the output's shape;
    # float64 runs the reference (the kernels take 16- and 32-bit floats)
    if input.dtype == torch.float64 and input.device.type != "meta":
        return False
    return input.is_cuda or input.device.type == "meta" or settings.interpreting()


def _traced(input):
    """Whether a Triton-path call takes the custom op (meta tensors, whose fake implementation
    gives the output's shape; torch.compile) rather than the eager ``ops.Conv3dFunction``."""
    return input.device.type == "meta" or torch.compiler.is_compiling()


def _autocast(*tensors):
    device = tensors[0].device.type
    if device not in ("cuda", "cpu") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _run(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode, spatial=3):
    input, coords, weight, bias, mask = _autocast(input, coords, weight, bias, mask)
    geo = checked_geometry(input, coords, weight, bias, stride, padding, dilation, mask, groups,
                           mode, spatial)
    if not _use_triton(input):
        if mode in OFFSET_AXES:
            return naive.deform_conv3d(input, coords, weight, bias, stride, padding, dilation,
                                       mask, groups, mode)
        return naive.d2conv3d(input, coords, weight, bias, stride, padding, dilation, mask,
                              groups, mode)
    if _traced(input):
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


def _pair(value, name, first):
    """int or 2-sequence -> the (t, h, w) triple of a 2D call: ``first`` for t."""
    return (first, *ntuple(value, name, 2))


def _as_input_format(out, input):
    """A 2D call's output in its input's memory format, as PyTorch's conv2d returns it: the 3D
    ops write channels-last, which a contiguous input's caller does not expect (``out.view``
    fails on it)."""
    channels_last = (input.is_contiguous(memory_format=torch.channels_last)
                     and not input.is_contiguous())
    return out.contiguous(memory_format=torch.channels_last if channels_last
                          else torch.contiguous_format)


def _as_3d(**tensors):
    """The 4-D tensors of a 2D call as 5-D views with one frame (T = 1); None stays None."""
    views = []
    for name, t in tensors.items():
        if t is not None and (not isinstance(t, torch.Tensor) or t.dim() != 4):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4-D tensor (2D call), got {shape}")
        views.append(None if t is None else t.unsqueeze(2))
    return views


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """Deformable 2D convolution, a drop-in for ``torchvision.ops.deform_conv2d``: the same
    arguments, order and layouts (DCNv1; DCNv2 when ``mask`` is given).

    input:  (N, C, H, W); weight (Co, C/groups, kh, kw), groups = C // weight.shape[1] (as
            torchvision infers them); bias (Co,) or None
    offset: (N, 2*G*K, Ho, Wo), K = kh*kw, channel (g*K + k)*2 + a with a = 0:y, 1:x and
            k = i*kw + j; G, the offset groups, is inferred from the channel count
    mask:   (N, G*K, Ho, Wo) or None, channel g*K + k
    stride, padding, dilation: int or (h, w)
    return: (N, Co, Ho, Wo), in the input's memory format (contiguous for a contiguous input,
            as torchvision's)

    Kernel point (i, j) of output pixel (h, w) samples input channel c (offset group g) at
    (h*sh - ph + i*dh, w*sw - pw + j*dw) + offset[g, k] by bilinear interpolation with zeros
    outside the image; gradients as deform_conv3d's.
    """
    input5, offset5, weight5, mask5 = _as_3d(input=input, offset=offset, weight=weight, mask=mask)
    if weight.shape[1] == 0 or input.shape[1] % weight.shape[1]:
        raise ValueError(f"weight takes {weight.shape[1]} input channels per group, which do not "
                         f"divide the input's {input.shape[1]} channels")
    groups = input.shape[1] // weight.shape[1]
    out = _run(input5, offset5, weight5, bias, _pair(stride, "stride", 1),
               _pair(padding, "padding", 0), _pair(dilation, "dilation", 1), mask5, groups,
               "offset_yx", spatial=2)
    return _as_input_format(out.squeeze(2), input)


def d2conv2d(input, size, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, groups=1,
             mode="xy"):
    """Dynamic dilated 2D convolution (D²Conv2d): the kernel grid scaled about its centre.

    input:  (N, C, H, W); weight (Co, C/groups, kh, kw); bias (Co,) or None
    size:   (N, G*c, Ho, Wo), channel g*c + a, positive scales: mode "x" one per offset group
            (c = 1, both axes), "xy" one per axis (c = 2: y, x)
    mask:   (N, G*K, Ho, Wo) or None; stride, padding, dilation: int or (h, w)
    return: (N, Co, Ho, Wo), in the input's memory format

    Equals ``deform_conv2d`` on the offsets (index - kernel centre) * dilation * (s - 1) per axis,
    which are never materialised.
    """
    if mode not in ("x", "xy"):
        raise ValueError(f"mode must be 'x' or 'xy' in 2D, got {mode!r}")
    input5, size5, weight5, mask5 = _as_3d(input=input, size=size, weight=weight, mask=mask)
    out = _run(input5, size5, weight5, bias, _pair(stride, "stride", 1),
               _pair(padding, "padding", 0), _pair(dilation, "dilation", 1), mask5, groups, mode,
               spatial=2)
    return _as_input_format(out.squeeze(2), input)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, relu=False,
               input_bias=None):
    """GroupNorm with ``F.group_norm``'s semantics of x = input + input_bias (per channel, where
    given); with ``relu`` of ReLU(x), in the same passes (the refine unit's conv -> ReLU ->
    GroupNorm without a ReLU pass of its own, and without the conv's bias pass when its bias is
    given here).

    input:  (N, C, *), any memory format; C divisible by num_groups
    weight, bias, input_bias: (C,) or None (any float dtype; their gradients come in it)
    return: input's shape, dtype and memory format

    Statistics (mean, 1/sqrt(var + eps), biased variance over C/num_groups channels and every
    spatial position) are fp32 whatever the input's dtype, and so is input + input_bias. Under
    ``torch.autocast`` the input keeps its dtype: autocast's fp32 policy for group_norm exists to
    keep the statistics in fp32, which the kernels do anyway, and an fp32 copy of the input would
    double the bytes moved.
    """
    if not _use_triton(input):
        return naive.group_norm(input, num_groups, weight, bias, eps, relu, input_bias)
    check_group_norm(input, num_groups, weight, bias, eps, input_bias)
    eps = float(eps)
    if _traced(input):
        return torch.ops.d2conv.group_norm(input, num_groups, weight, bias, eps, relu,
                                           input_bias)[0]
    return ops.GroupNormFunction.apply(input, weight, bias, num_groups, eps, relu, input_bias)


def depthwise_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise 3D convolution: ``F.conv3d(input, weight, bias, stride, padding, dilation,
    groups=C)`` with one output channel per input channel.

    input:  (N, C, T, H, W), contiguous or channels_last_3d (others are copied to contiguous)
    weight: (C, 1, kd, kh, kw), kd, kh, kw from 1 to 7; bias: (C,) or None
    stride, padding, dilation: int or (t, h, w)
    return: (N, C, To, Ho, Wo) in the input's memory format
    """
    input, weight, bias = _autocast(input, weight, bias)
    if not _use_triton(input):
        return naive.depthwise_conv3d(input, weight, bias, stride, padding, dilation)
    geo = check_depthwise(input, weight, bias, stride, padding, dilation)
    if _traced(input):
        return torch.ops.d2conv.depthwise_conv3d(input, weight, bias, list(geo.stride),
                                                 list(geo.padding), list(geo.dilation))
    return ops.DepthwiseConv3dFunction.apply(input, weight, bias, geo)


def upsample_add(input, source):
    """``input + F.interpolate(source, size=input.shape[2:], mode="trilinear",
    align_corners=True)``, the refine blocks' skip sum, in three bandwidth-bound passes
    (kernels/upsample.py; at rf1 under bf16 autocast 0.52 ms forward against the composite's
    3.62 on an H100, docs/design.md#upsampled-skip-sum).

    input:  (N, C, T, H, W); source: (N, C, Ts, Hs, Ws), any sizes; any memory format
    return: input's shape (channels_last_3d on the Triton path), in the dtype of the composite:
            input's and source's promoted, where CUDA's ``torch.autocast`` makes the source fp32
            (as it runs F.interpolate in fp32)

    The interpolation and the sum are computed in fp32; the source's gradient is gathered in
    fp32 (no atomics, deterministic), the input's is the output's gradient.
    """
    check_upsample_add(input, source)
    if not _use_triton(input) or torch.float64 in (input.dtype, source.dtype):
        return naive.upsample_add(input, source)
    # CUDA's autocast runs F.interpolate in fp32 (the CPU's leaves it in the input's dtype)
    autocast = input.device.type == "cuda" and torch.is_autocast_enabled("cuda")
    out_dtype = torch.promote_types(input.dtype, torch.float32 if autocast else source.dtype)
    if _traced(input):
        return torch.ops.d2conv.upsample_add(input, source, out_dtype)
    return ops.UpsampleAddFunction.apply(input, source, out_dtype)
