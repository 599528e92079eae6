"""Convolution layers on the kernels: D²Conv3D (docs/operators.md) and deformable 3D
convolution, and ``convert_convs`` to put them in place of the plain Conv3d of an existing
network."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels.checks import SIZE_CHANNELS, triple

SIZE_ACTIVATIONS = {
    "elu": lambda raw: F.elu(raw) + 1,                   # the paper's default
    "relu": lambda raw: F.relu(raw + 1),
    "relu_eps": lambda raw: F.relu(raw + 1e-3) + 1,
    "linear": lambda raw: raw,                           # the original's: s = 0 at init
}


class _SampledConv3d(nn.Module):
    """A Conv3d's weight and bias plus a zero-initialised Conv3d (same kernel size, stride, padding,
    dilation) that predicts, per output voxel, the sampling parameters and the modulation mask."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 bias, coord_channels, mask_channels):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = triple(kernel_size, "kernel_size")
        self.stride, self.padding, self.dilation = (triple(stride, "stride"),
                                                    triple(padding, "padding"),
                                                    triple(dilation, "dilation"))
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                               *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.coord_channels, self.mask_channels = coord_channels, mask_channels
        self.predictor = nn.Conv3d(in_channels, coord_channels + mask_channels, self.kernel_size,
                                   self.stride, self.padding, self.dilation)
        self.reset_parameters()

    def reset_parameters(self):
        # the main weights as nn.Conv3d initialises them; the predictor starts at zero
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.predictor.weight)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_conv(cls, conv, **options):
        """The layer replacing ``conv`` (an nn.Conv3d), with its weight and bias copied in."""
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


class D2Conv3d(_SampledConv3d):
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

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, offset_groups=1, mode="xyz", modulation=True,
                 size_activation="elu"):
        if mode not in SIZE_CHANNELS:
            raise ValueError(f"mode must be one of {sorted(SIZE_CHANNELS)}, got {mode!r}")
        if size_activation not in SIZE_ACTIVATIONS:
            raise ValueError(f"size_activation must be one of {sorted(SIZE_ACTIVATIONS)}, "
                             f"got {size_activation!r}")
        K = math.prod(triple(kernel_size, "kernel_size"))
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups * SIZE_CHANNELS[mode],
                         offset_groups * K if modulation else 0)
        self.mode, self.offset_groups, self.size_activation = mode, offset_groups, size_activation

    def sizes(self, x):
        """The dilation scales (N, G*c, To, Ho, Wo) and the mask (or None) for input x."""
        raw, mask = self.predict(x)
        return SIZE_ACTIVATIONS[self.size_activation](raw), mask

    def forward(self, x):
        size, mask = self.sizes(x)
        return kernels.d2conv3d(x, size, self.weight, self.bias, self.stride, self.padding,
                                self.dilation, mask, self.groups, self.mode)

    def extra_repr(self):
        return (super().extra_repr() + f", mode={self.mode!r}, offset_groups={self.offset_groups}"
                f", modulation={self.mask_channels > 0}, size_activation={self.size_activation!r}")


class DeformConv3d(_SampledConv3d):
    """Deformable 3D convolution (DCNv1; DCNv2 with ``modulation``).

    x: (N, Cin, T, H, W) -> (N, Cout, To, Ho, Wo). The predictor outputs G*K*3 free offsets
    (t, y, x per kernel point) and, with modulation, G*K mask logits; it starts at zero.
    ``restrict="spatial"`` keeps the t offsets at zero, ``restrict="temporal"`` the y and x ones.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, offset_groups=1, modulation=False, restrict=None):
        if restrict not in (None, "spatial", "temporal"):
            raise ValueError(f"restrict must be None, 'spatial' or 'temporal', got {restrict!r}")
        K = math.prod(triple(kernel_size, "kernel_size"))
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, offset_groups * K * 3, offset_groups * K if modulation else 0)
        self.offset_groups, self.restrict = offset_groups, restrict
        keep = {None: (1.0, 1.0, 1.0), "spatial": (0.0, 1.0, 1.0), "temporal": (1.0, 0.0, 0.0)}
        axes = torch.tensor(keep[restrict]).repeat(offset_groups * K)
        self.register_buffer("axes", axes.view(1, -1, 1, 1, 1), persistent=False)

    def forward(self, x):
        offset, mask = self.predict(x)
        if self.restrict is not None:
            offset = offset * self.axes.to(offset.dtype)
        return kernels.deform_conv3d(x, offset, self.weight, self.bias, self.stride,
                                     self.padding, self.dilation, mask, self.groups)

    def extra_repr(self):
        return (super().extra_repr() + f", offset_groups={self.offset_groups}"
                f", modulation={self.mask_channels > 0}, restrict={self.restrict!r}")


# the decoder-conv variants of the paper's comparison that replace convolutions
VARIANTS = {
    "dcn": (DeformConv3d, dict(modulation=False)),
    "dcnv2": (DeformConv3d, dict(modulation=True)),
    **{f"d2conv-{mode}": (D2Conv3d, dict(mode=mode)) for mode in SIZE_CHANNELS},
}


def predictor_parameters(module):
    """The parameters of every size / offset / mask predictor inside ``module`` (the zero-
    initialised convs of D2Conv3d and DeformConv3d), e.g. for a parameter group of their own."""
    return [p for m in module.modules() if isinstance(m, _SampledConv3d)
            for p in m.predictor.parameters()]


def convert_convs(module, variant, **options):
    """Replace every nn.Conv3d inside ``module`` whose kernel is not 1x1x1 by ``variant``.

    variant: "dcn", "dcnv2" or "d2conv-<mode>" (modulated by default, as in the paper);
    ``options`` go to the layer's constructor (e.g. modulation=False, size_activation="relu").
    Weights and biases are copied. Returns the number of convolutions replaced.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cls, defaults = VARIANTS[variant]
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, _SampledConv3d):
            continue                                   # already converted: leave its predictor
        if type(child) is nn.Conv3d and tuple(child.kernel_size) != (1, 1, 1):
            setattr(module, name, cls.from_conv(child, **{**defaults, **options}))
            count += 1
        else:
            count += convert_convs(child, variant, **options)
    return count
