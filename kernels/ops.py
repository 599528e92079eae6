"""The Triton path, twice over the same kernels: as torch.library custom ops (forward, backward,
fake (meta) implementations and autograd), which torch.compile traces without graph breaks, and
as a plain autograd.Function for eager calls, which skips the dispatcher's per-call cost (on a
CPU with the launches stubbed out: 0.35 -> 0.17 ms of host time per forward+backward; on an H100
at the rf3 shape 0.12-0.50 ms less per forward+backward, 2026-11-25: see
docs/design.md#eager-calls-and-the-custom-op). It matters for small shapes, where the host's
cost rivals the GPU's.

``coords`` is the offset tensor in the free-offset modes ("offset": deform_conv3d's (t, y, x)
triples; "offset_yx": deform_conv2d's (y, x) pairs at T = 1) and the size map of a D²Conv mode
otherwise. Triton is imported on first use, so importing this module (and the
package) never needs it.

GroupNorm (kernels/norm.py), the depthwise 3D convolution (kernels/depthwise.py) and the
upsampled skip sum (kernels/upsample.py) have the same pair: ``d2conv::group_norm``,
``d2conv::depthwise_conv3d`` and ``d2conv::upsample_add`` (with their backward ops) for
torch.compile and meta tensors, ``GroupNormFunction``, ``DepthwiseConv3dFunction`` and
``UpsampleAddFunction`` for eager calls.
"""
from typing import Optional

import torch
from torch import Tensor

from . import settings
from .checks import check_args, check_depthwise


def _require_triton(input):
    if not (input.is_cuda or settings.interpreting()):
        raise RuntimeError("d2conv::conv3d runs Triton kernels: it needs CUDA tensors, or "
                           "TRITON_INTERPRET=1 for CPU tensors (the kernels.* functions fall back "
                           "to the PyTorch reference on CPU by themselves)")


@torch.library.custom_op("d2conv::conv3d", mutates_args=())
def conv3d(input: Tensor, coords: Tensor, weight: Tensor, bias: Optional[Tensor],
           mask: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
           groups: int, mode: str) -> Tensor:
    _require_triton(input)
    from .forward import d2conv_fwd

    geo = check_args(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode)
    return d2conv_fwd(geo, input, coords, weight, bias, mask, mode)


@conv3d.register_fake
def _(input, coords, weight, bias, mask, stride, padding, dilation, groups, mode):
    geo = check_args(input, coords, weight, bias, stride, padding, dilation, mask, groups, mode)
    # channels-last, like the kernel's output
    return torch.empty((input.shape[0], geo.Co, *geo.out), device=input.device, dtype=input.dtype,
                       memory_format=torch.channels_last_3d)


@torch.library.custom_op("d2conv::conv3d_backward", mutates_args=())
def conv3d_backward(grad_out: Tensor, input: Tensor, coords: Tensor, weight: Tensor,
                    mask: Optional[Tensor], stride: list[int], padding: list[int],
                    dilation: list[int], groups: int, mode: str, need_input: bool,
                    need_coords: bool, need_weight: bool, need_bias: bool, need_mask: bool,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_coords, grad_weight, grad_bias, grad_mask); empty where not needed."""
    _require_triton(input)
    from .backward import d2conv_bwd

    geo = check_args(input, coords, weight, None, stride, padding, dilation, mask, groups, mode)
    grads = d2conv_bwd(geo, grad_out, input, coords, weight, mask, mode, need_input=need_input,
                       need_coords=need_coords, need_weight=need_weight, need_bias=need_bias,
                       need_mask=need_mask)
    # a distinct empty tensor for each missing gradient: outputs may not alias each other
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@conv3d_backward.register_fake
def _(grad_out, input, coords, weight, mask, stride, padding, dilation, groups, mode,
      need_input, need_coords, need_weight, need_bias, need_mask):
    N, C, T, H, W = input.shape
    contiguous = torch.contiguous_format
    return (torch.empty((N, C, T, H, W), device=input.device, dtype=input.dtype,
                        memory_format=torch.channels_last_3d) if need_input
            else input.new_empty(0),
            torch.empty_like(coords, memory_format=contiguous) if need_coords
            else input.new_empty(0),
            torch.empty_like(weight, memory_format=contiguous) if need_weight
            else input.new_empty(0),
            input.new_empty((weight.shape[0],)) if need_bias else input.new_empty(0),
            torch.empty_like(mask, memory_format=contiguous) if need_mask and mask is not None
            else input.new_empty(0))


def _setup_context(ctx, inputs, output):
    input, coords, weight, bias, mask, stride, padding, dilation, groups, mode = inputs
    ctx.save_for_backward(input, coords, weight, mask)
    ctx.conf = (stride, padding, dilation, groups, mode)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    input, coords, weight, mask = ctx.saved_tensors
    need_input, need_coords, need_weight, need_bias, need_mask = ctx.needs_input_grad[:5]
    grads = torch.ops.d2conv.conv3d_backward(
        grad_out, input, coords, weight, mask, *ctx.conf, need_input, need_coords, need_weight,
        need_bias and ctx.has_bias, need_mask and mask is not None)
    needed = (need_input, need_coords, need_weight, need_bias, need_mask)
    return tuple(g if need else None for g, need in zip(grads, needed)) + (None,) * 5


conv3d.register_autograd(_backward, setup_context=_setup_context)


class Conv3dFunction(torch.autograd.Function):
    """Eager autograd of the kernels (what ``conv3d`` + ``_backward`` do, without the custom-op
    dispatch). ``geo`` is ``check_args``'s result for these arguments."""

    @staticmethod
    def forward(ctx, input, coords, weight, bias, mask, geo, mode):
        from .forward import d2conv_fwd

        ctx.save_for_backward(input, coords, weight, mask)
        ctx.geo, ctx.mode = geo, mode
        return d2conv_fwd(geo, input, coords, weight, bias, mask, mode)

    @staticmethod
    def backward(ctx, grad_out):
        from .backward import d2conv_bwd

        input, coords, weight, mask = ctx.saved_tensors
        # False for an argument that is None (no bias, no mask)
        need_input, need_coords, need_weight, need_bias, need_mask = ctx.needs_input_grad[:5]
        grads = d2conv_bwd(ctx.geo, grad_out, input, coords, weight, mask, ctx.mode,
                           need_input=need_input, need_coords=need_coords,
                           need_weight=need_weight, need_bias=need_bias, need_mask=need_mask)
        return grads + (None, None)


def _empty_or(needed, make, like):
    """``make()`` where a gradient is needed, else a distinct empty tensor (custom-op outputs
    may not alias each other)."""
    return make() if needed else like.new_empty(0)


# GroupNorm: out, and the fp32 statistics the backward reads: mean and rstd, (N, num_groups)
@torch.library.custom_op("d2conv::group_norm", mutates_args=())
def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, relu: bool, input_bias: Optional[Tensor]
               ) -> tuple[Tensor, Tensor, Tensor]:
    _require_triton(input)
    from .norm import group_norm_fwd

    return group_norm_fwd(input, num_groups, weight, bias, eps, relu, input_bias)


@group_norm.register_fake
def _(input, num_groups, weight, bias, eps, relu, input_bias):
    stats = (input.shape[0], num_groups)
    return (torch.empty_like(input), input.new_empty(stats, dtype=torch.float32),
            input.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("d2conv::group_norm_backward", mutates_args=())
def group_norm_backward(grad_out: Tensor, input: Tensor, mean: Tensor, rstd: Tensor,
                        weight: Optional[Tensor], input_bias: Optional[Tensor], num_groups: int,
                        relu: bool, need_input: bool, need_weight: bool, need_bias: bool,
                        need_input_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_input_bias); empty where not needed."""
    _require_triton(input)
    from .norm import group_norm_bwd

    grads = group_norm_bwd(grad_out, input, mean, rstd, weight, num_groups, relu, input_bias,
                           need_input=need_input, need_weight=need_weight, need_bias=need_bias,
                           need_input_bias=need_input_bias)
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@group_norm_backward.register_fake
def _(grad_out, input, mean, rstd, weight, input_bias, num_groups, relu, need_input, need_weight,
      need_bias, need_input_bias):
    C = input.shape[1]
    param = weight if weight is not None else input.new_empty((C,), dtype=torch.float32)
    return (_empty_or(need_input, lambda: torch.empty_like(input), input),
            _empty_or(need_weight, lambda: torch.empty_like(param), input),
            _empty_or(need_bias, lambda: torch.empty_like(param), input),
            _empty_or(need_input_bias and input_bias is not None,
                      lambda: torch.empty_like(input_bias), input))


def _group_norm_setup(ctx, inputs, output):
    input, num_groups, weight, bias, eps, relu, input_bias = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input, mean, rstd, weight, input_bias)
    ctx.conf = (num_groups, relu)
    ctx.has = (weight is not None, bias is not None, input_bias is not None)


def _group_norm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    input, mean, rstd, weight, input_bias = ctx.saved_tensors
    need_input, _, need_weight, need_bias, _, _, need_input_bias = ctx.needs_input_grad
    has_weight, has_bias, has_input_bias = ctx.has
    wanted = (need_input, need_weight and has_weight, need_bias and has_bias,
              need_input_bias and has_input_bias)
    grads = torch.ops.d2conv.group_norm_backward(grad_out, input, mean, rstd, weight, input_bias,
                                                 *ctx.conf, *wanted)
    grad_input, grad_weight, grad_bias, grad_input_bias = (
        g if need else None for g, need in zip(grads, wanted))
    return grad_input, None, grad_weight, grad_bias, None, None, grad_input_bias


group_norm.register_autograd(_group_norm_backward, setup_context=_group_norm_setup)


class GroupNormFunction(torch.autograd.Function):
    """Eager autograd of the GroupNorm kernels (``group_norm`` + its backward without the
    custom-op dispatch)."""

    @staticmethod
    def forward(ctx, input, weight, bias, num_groups, eps, relu, input_bias=None):
        from .norm import group_norm_fwd

        out, mean, rstd = group_norm_fwd(input, num_groups, weight, bias, eps, relu, input_bias)
        ctx.save_for_backward(input, mean, rstd, weight, input_bias)
        ctx.num_groups, ctx.relu = num_groups, relu
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from .norm import group_norm_bwd

        input, mean, rstd, weight, input_bias = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_input, grad_weight, grad_bias, grad_input_bias = group_norm_bwd(
            grad_out, input, mean, rstd, weight, ctx.num_groups, ctx.relu, input_bias,
            need_input=need_input, need_weight=need_weight, need_bias=need_bias,
            need_input_bias=ctx.needs_input_grad[6])
        return grad_input, grad_weight, grad_bias, None, None, None, grad_input_bias


@torch.library.custom_op("d2conv::depthwise_conv3d", mutates_args=())
def depthwise_conv3d(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                     padding: list[int], dilation: list[int]) -> Tensor:
    _require_triton(input)
    from .depthwise import depthwise_fwd

    geo = check_depthwise(input, weight, bias, stride, padding, dilation)
    return depthwise_fwd(geo, input, weight, bias)


def _depthwise_format(input):
    return (torch.channels_last_3d if input.is_contiguous(memory_format=torch.channels_last_3d)
            and not input.is_contiguous() else torch.contiguous_format)


@depthwise_conv3d.register_fake
def _(input, weight, bias, stride, padding, dilation):
    geo = check_depthwise(input, weight, bias, stride, padding, dilation)
    return torch.empty((geo.N, geo.C, *geo.out), device=input.device, dtype=input.dtype,
                       memory_format=_depthwise_format(input))


@torch.library.custom_op("d2conv::depthwise_conv3d_backward", mutates_args=())
def depthwise_conv3d_backward(grad_out: Tensor, input: Tensor, weight: Tensor, stride: list[int],
                              padding: list[int], dilation: list[int], need_input: bool,
                              need_weight: bool, need_bias: bool
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); empty where not needed."""
    _require_triton(input)
    from .depthwise import depthwise_bwd

    geo = check_depthwise(input, weight, None, stride, padding, dilation)
    grads = depthwise_bwd(geo, grad_out, input, weight, need_input=need_input,
                          need_weight=need_weight, need_bias=need_bias)
    return tuple(input.new_empty(0) if g is None else g for g in grads)


@depthwise_conv3d_backward.register_fake
def _(grad_out, input, weight, stride, padding, dilation, need_input, need_weight, need_bias):
    return (_empty_or(need_input, lambda: torch.empty_like(
                input, memory_format=_depthwise_format(input)), input),
            _empty_or(need_weight, lambda: torch.empty_like(
                weight, memory_format=torch.contiguous_format), input),
            _empty_or(need_bias, lambda: input.new_empty((weight.shape[0],)), input))


def _depthwise_setup(ctx, inputs, output):
    input, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight)
    ctx.conf = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _depthwise_backward(ctx, grad_out):
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    grads = torch.ops.d2conv.depthwise_conv3d_backward(grad_out, input, weight, *ctx.conf,
                                                       need_input, need_weight, need_bias)
    grad_input, grad_weight, grad_bias = (g if need else None for g, need in
                                          zip(grads, (need_input, need_weight, need_bias)))
    return grad_input, grad_weight, grad_bias, None, None, None


depthwise_conv3d.register_autograd(_depthwise_backward, setup_context=_depthwise_setup)


class DepthwiseConv3dFunction(torch.autograd.Function):
    """Eager autograd of the depthwise kernels. ``geo`` is ``check_depthwise``'s result."""

    @staticmethod
    def forward(ctx, input, weight, bias, geo):
        from .depthwise import depthwise_fwd

        ctx.save_for_backward(input, weight)
        ctx.geo = geo
        return depthwise_fwd(geo, input, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        from .depthwise import depthwise_bwd

        input, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        grads = depthwise_bwd(ctx.geo, grad_out, input, weight, need_input=need_input,
                              need_weight=need_weight, need_bias=need_bias)
        return grads + (None,)


@torch.library.custom_op("d2conv::upsample_add", mutates_args=())
def upsample_add(input: Tensor, source: Tensor, out_dtype: torch.dtype) -> Tensor:
    _require_triton(input)
    from .upsample import upsample_add_fwd

    return upsample_add_fwd(input, source, out_dtype)


@upsample_add.register_fake
def _(input, source, out_dtype):
    return torch.empty_like(input, dtype=out_dtype, memory_format=torch.channels_last_3d)


@torch.library.custom_op("d2conv::upsample_add_backward", mutates_args=())
def upsample_add_backward(grad_out: Tensor, size: list[int], dtype: torch.dtype) -> Tensor:
    """The source's gradient, (N, C, *size) in ``dtype``."""
    _require_triton(grad_out)
    from .upsample import upsample_add_bwd

    return upsample_add_bwd(grad_out, size, dtype)


@upsample_add_backward.register_fake
def _(grad_out, size, dtype):
    return torch.empty((*grad_out.shape[:2], *size), device=grad_out.device, dtype=dtype,
                       memory_format=torch.channels_last_3d)


def _upsample_add_setup(ctx, inputs, output):
    input, source, _ = inputs
    ctx.input_dtype, ctx.size, ctx.source_dtype = input.dtype, list(source.shape[2:]), source.dtype


def _upsample_add_backward(ctx, grad_out):
    grad_input = grad_out.to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
    grad_source = (torch.ops.d2conv.upsample_add_backward(grad_out, ctx.size, ctx.source_dtype)
                   if ctx.needs_input_grad[1] else None)
    return grad_input, grad_source, None


upsample_add.register_autograd(_upsample_add_backward, setup_context=_upsample_add_setup)


class UpsampleAddFunction(torch.autograd.Function):
    """Eager autograd of the upsampled skip sum. Keeps no tensor for the backward: the source's
    gradient needs its shape and dtype only."""

    @staticmethod
    def forward(ctx, input, source, out_dtype):
        from .upsample import upsample_add_fwd

        ctx.input_dtype, ctx.size, ctx.source_dtype = input.dtype, source.shape[2:], source.dtype
        return upsample_add_fwd(input, source, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from .upsample import upsample_add_bwd

        grad_input = grad_out.to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_source = (upsample_add_bwd(grad_out, ctx.size, ctx.source_dtype)
                       if ctx.needs_input_grad[1] else None)
        return grad_input, grad_source, None
