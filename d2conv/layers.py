"""Layers on the kernels: D²Conv3D (docs/operators.md) and deformable 3D convolution, their 2D
forms (D2Conv2d, DeformConv2d), and ``convert_convs`` to put them in place of the plain Conv3d
and Conv2d of an existing network; GroupNorm and DepthwiseConv3d, nn.GroupNorm and a depthwise
nn.Conv3d on the Triton kernels, with the same constructors and state dicts."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.checks import SIZE_CHANNELS, ntuple

SIZE_ACTIVATIONS = {
    "elu": lambda raw: F.elu(raw) + 1,                   # the paper's default
    "relu": lambda raw: F.relu(raw + 1),
    "relu_eps": lambda raw: F.relu(raw + 1e-3) + 1,
    "linear": lambda raw: raw,                           # the original code's: s = 0 at init
}

CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


class _SampledConv(nn.Module):
    """A convolution's weight and bias plus a zero-initialised predictor conv (nn.Conv2d or
    nn.Conv3d by ``dims``; same kernel size, stride, padding, dilation) that predicts, per output
    position, ``coords_per_group`` sampling parameters and, with ``modulation``, K mask logits per
    offset group."""

    dims = None                                          # 2 or 3: set by the concrete layers

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 bias, offset_groups, coords_per_group, modulation):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if not isinstance(offset_groups, int) or offset_groups < 1 or in_channels % offset_groups:
            raise ValueError(f"offset_groups={offset_groups!r} must be a positive int dividing "
                             f"in_channels={in_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.offset_groups = offset_groups
        self.kernel_size = ntuple(kernel_size, "kernel_size", self.dims)
        self.stride, self.padding, self.dilation = (ntuple(stride, "stride", self.dims),
                                                    ntuple(padding, "padding", self.dims),
                                                    ntuple(dilation, "dilation", self.dims))
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        K = math.prod(self.kernel_size)
        self.coord_channels = offset_groups * coords_per_group
        self.mask_channels = offset_groups * K if modulation else 0
        self.predictor = CONVS[self.dims](in_channels, self.coord_channels + self.mask_channels,
                                          self.kernel_size, self.stride, self.padding,
                                          self.dilation)
        self.reset_parameters()

    @classmethod
    def kernel_points(cls, kernel_size):
        """K, the number of kernel points of ``kernel_size`` in this layer's dimensions."""
        return math.prod(ntuple(kernel_size, "kernel_size", cls.dims))

    def reset_parameters(self):
        # the main weights as nn.Conv2d / nn.Conv3d initialise them; the predictor starts at zero
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_conv(cls, conv, **options):
        """The layer replacing ``conv`` (an nn.Conv3d for the 3D layers, an nn.Conv2d for the 2D
        ones), with its weight and bias copied in, on its device and in its dtype."""
        if not isinstance(conv, CONVS[cls.dims]):
            raise ValueError(f"{cls.__name__}.from_conv takes an nn.Conv{cls.dims}d, "
                             f"got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"cannot convert {conv}: only numeric zero padding is supported")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None, **options)
        layer = layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def predict(self, x):
        """(coords raw (N, coord_channels, ...), mask (N, mask_channels, ...) or None)."""
        raw = self.predictor(x)
        coords = raw[:, :self.coord_channels]
        mask = torch.sigmoid(raw[:, self.coord_channels:]) if self.mask_channels else None
        return coords, mask

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class _D2Conv(_SampledConv):
    """D²Conv in ``dims`` dimensions: the predictor outputs G*c size channels for ``mode`` (one of
    ``modes``) and, with ``modulation``, G*K mask logits."""

    modes = ()

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 bias, offset_groups, mode, modulation, size_activation):
        if mode not in self.modes:
            raise ValueError(f"mode must be one of {sorted(self.modes)}, got {mode!r}")
        if size_activation not in SIZE_ACTIVATIONS:
            raise ValueError(f"size_activation must be one of {sorted(SIZE_ACTIVATIONS)}, "
                             f"got {size_activation!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups, SIZE_CHANNELS[mode], modulation)
        self.mode, self.size_activation = mode, size_activation

    def sizes(self, x):
        """The dilation scales (N, G*c, *output size) and the mask (or None) for input x."""
        raw, mask = self.predict(x)
        return SIZE_ACTIVATIONS[self.size_activation](raw), mask

    def forward(self, x):
        size, mask = self.sizes(x)
        op = kernels.d2conv3d if self.dims == 3 else kernels.d2conv2d
        return op(x, size, self.weight, self.bias, self.stride, self.padding, self.dilation, mask,
                  self.groups, self.mode)

    def extra_repr(self):
        return (super().extra_repr() + f", mode={self.mode!r}, offset_groups={self.offset_groups}"
                f", modulation={self.mask_channels > 0}, size_activation={self.size_activation!r}")


class D2Conv3d(_D2Conv):
    """Dynamic dilated 3D convolution (docs/operators.md).

    x: (N, Cin, T, H, W) -> (N, Cout, To, Ho, Wo). The predictor outputs G*c size channels
    (c = 1, 2, 2, 3 for mode x, xy, xxz, xyz) turned into scales by ``size_activation`` ("elu":
    elu(raw) + 1, the paper's; "relu": relu(raw + 1); "relu_eps": relu(raw + 1e-3) + 1; "linear":
    raw, as the original code's), and, with ``modulation``, G*K mask logits (sigmoid). The
    predictor starts at zero: s = 1 (the plain convolution's grid; s = 0 under "linear", every
    kernel point at the centre) and mask = 0.5, so with modulation on a converted conv starts as
    half the original one (plus bias); with modulation off it computes exactly the original
    function.
    """

    dims, modes = 3, tuple(SIZE_CHANNELS)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, offset_groups=1, mode="xyz", modulation=True,
                 size_activation="elu"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups, mode, modulation, size_activation)


class D2Conv2d(_D2Conv):
    """Dynamic dilated 2D convolution: D2Conv3d's layer on images.

    x: (N, Cin, H, W) -> (N, Cout, Ho, Wo). Mode "x" predicts one scale per offset group (both
    axes), "xy" one per axis (channel g*2 + 0 for y, + 1 for x); ``size_activation``,
    ``modulation`` and the zero start as in D2Conv3d.
    """

    dims, modes = 2, ("x", "xy")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, offset_groups=1, mode="xy", modulation=True,
                 size_activation="elu"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups, mode, modulation, size_activation)


class _DeformConv(_SampledConv):
    """Deformable convolution in ``dims`` dimensions: the predictor outputs G*K*dims free offsets
    and, with ``modulation``, G*K mask logits."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 bias, offset_groups, modulation):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups, self.kernel_points(kernel_size) * self.dims,
                         modulation)

    def extra_repr(self):
        return (super().extra_repr() + f", offset_groups={self.offset_groups}"
                f", modulation={self.mask_channels > 0}")


class DeformConv3d(_DeformConv):
    """Deformable 3D convolution (DCNv1; DCNv2 with ``modulation``).

    x: (N, Cin, T, H, W) -> (N, Cout, To, Ho, Wo). The predictor outputs G*K*3 free offsets
    (t, y, x per kernel point) and, with modulation, G*K mask logits; it starts at zero.
    ``restrict="spatial"`` keeps the t offsets at zero, ``restrict="temporal"`` the y and x ones.
    """

    dims = 3

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, offset_groups=1, modulation=False, restrict=None):
        if restrict not in (None, "spatial", "temporal"):
            raise ValueError(f"restrict must be None, 'spatial' or 'temporal', got {restrict!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups, modulation)
        self.restrict = restrict
        keep = {None: (1.0, 1.0, 1.0), "spatial": (0.0, 1.0, 1.0), "temporal": (1.0, 0.0, 0.0)}
        axes = torch.tensor(keep[restrict]).repeat(self.coord_channels // 3)
        self.register_buffer("axes", axes.view(1, -1, 1, 1, 1), persistent=False)

    def forward(self, x):
        offset, mask = self.predict(x)
        if self.restrict is not None:
            offset = offset * self.axes.to(offset.dtype)
        return kernels.deform_conv3d(x, offset, self.weight, self.bias, self.stride,
                                     self.padding, self.dilation, mask, self.groups)

    def extra_repr(self):
        return super().extra_repr() + f", restrict={self.restrict!r}"


class DeformConv2d(_DeformConv):
    """Deformable 2D convolution (DCNv1; DCNv2 with ``modulation``).

    x: (N, Cin, H, W) -> (N, Cout, Ho, Wo). The predictor outputs G*K*2 free offsets (y, x per
    kernel point, torchvision's layout) and, with modulation, G*K mask logits; it starts at zero.
    """

    dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, offset_groups=1, modulation=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups, modulation)

    def forward(self, x):
        offset, mask = self.predict(x)
        # conv groups are inferred from the weight's shape, as torchvision's op does
        return kernels.deform_conv2d(x, offset, self.weight, self.bias, self.stride,
                                     self.padding, self.dilation, mask)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm on ``kernels.group_norm``: the same constructor, parameters and state dict.

    ``forward(x, relu=True)`` normalises ReLU(x) in the same passes, for a conv -> ReLU ->
    GroupNorm without a ReLU pass of its own; ``input_bias`` (C,) is added to x per channel
    first (a conv's bias, without a pass of its own). x: (N, C, *) -> same shape, dtype and
    memory format (under autocast too: the statistics are fp32 inside the kernels).
    """

    def forward(self, input, relu=False, input_bias=None):
        return kernels.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, relu,
                                  input_bias)


class DepthwiseConv3d(nn.Conv3d):
    """A depthwise nn.Conv3d (groups = in_channels = out_channels) on
    ``kernels.depthwise_conv3d``: nn.Conv3d's constructor (``groups`` defaults to the channels),
    parameters and state dict. Zero padding given as numbers only.

    x: (N, C, T, H, W), contiguous or channels_last_3d -> (N, C, To, Ho, Wo), same format.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=None, bias=True, padding_mode="zeros", device=None, dtype=None):
        groups = in_channels if groups is None else groups
        if not in_channels == out_channels == groups:
            raise ValueError(f"a depthwise convolution needs in_channels == out_channels == "
                             f"groups, got {in_channels}, {out_channels}, {groups}")
        if padding_mode != "zeros" or isinstance(padding, str):
            raise ValueError(f"padding must be numbers with padding_mode 'zeros', got "
                             f"padding={padding!r}, padding_mode={padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)

    def _conv_forward(self, input, weight, bias):
        # nn.Conv3d.forward calls this with the layer's own weight and bias
        return kernels.depthwise_conv3d(input, weight, bias, self.stride, self.padding,
                                        self.dilation)


# the decoder-conv variants of the paper's comparison that replace convolutions: the 3D layer of
# each, and the 2D layer of those that have a 2D form
VARIANTS = {
    "dcn": (DeformConv3d, dict(modulation=False)),
    "dcnv2": (DeformConv3d, dict(modulation=True)),
    **{f"d2conv-{mode}": (D2Conv3d, dict(mode=mode)) for mode in SIZE_CHANNELS},
}
VARIANTS_2D = {
    "dcn": (DeformConv2d, dict(modulation=False)),
    "dcnv2": (DeformConv2d, dict(modulation=True)),
    **{f"d2conv-{mode}": (D2Conv2d, dict(mode=mode)) for mode in D2Conv2d.modes},
}


def predictor_parameters(module):
    """The parameters of every size / offset / mask predictor inside ``module`` (the zero-
    initialised convs of D2Conv3d, DeformConv3d, D2Conv2d and DeformConv2d), e.g. for a parameter
    group of their own."""
    return [p for m in module.modules() if isinstance(m, _SampledConv)
            for p in m.predictor.parameters()]


def convert_convs(module, variant, **options):
    """Replace every nn.Conv3d and nn.Conv2d inside ``module`` whose kernel is not all ones by
    ``variant``'s layer.

    variant: "dcn", "dcnv2" or "d2conv-<mode>" (modulated by default, as in the paper). An
    nn.Conv3d becomes DeformConv3d or D2Conv3d, an nn.Conv2d DeformConv2d or D2Conv2d;
    "d2conv-xxz" and "d2conv-xyz" scale the time axis and have no 2D form, so they leave every
    nn.Conv2d as it is. ``options`` go to each layer's constructor (e.g. modulation=False,
    size_activation="relu"); a 3D-only one (restrict) fails on an nn.Conv2d. Weights and biases
    are copied, device and dtype kept; layers already converted are left alone. Returns the number
    of convolutions replaced, 3D and 2D together.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _SampledConv):
            continue                                   # already converted: leave its predictor
        target = None
        if type(child) in (nn.Conv3d, DepthwiseConv3d) and tuple(child.kernel_size) != (1, 1, 1):
            target = VARIANTS[variant]
        elif type(child) is nn.Conv2d and tuple(child.kernel_size) != (1, 1):
            target = VARIANTS_2D.get(variant)
        if target is not None:
            cls, defaults = target
            setattr(module, name, cls.from_conv(child, **{**defaults, **options}))
            count += 1
        else:
            count += convert_convs(child, variant, **options)
    return count
