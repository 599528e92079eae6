"""What every kernel of a call takes besides its tensors: one LaunchGeometry, shared by the
forward, the backward's data kernel and the pulled input gradient (kernels/input_grad.py), and
the layouts the kernels read their tensors in."""
import functools
import math
from dataclasses import dataclass

import torch

from . import settings
from .checks import OFFSET_AXES, SIZE_AXES, ConvGeometry


def dot_precision(dtype):
    """tl.dot's input_precision. 16-bit inputs: "ieee" (unused: their products are exact). fp32:
    "tf32" when PyTorch allows TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``, or a
    float32 matmul precision other than "highest"), like the backward's cuBLAS GEMMs; otherwise
    fp32 accuracy, ``settings.fp32_dot()``: "ieee" (FMA on the CUDA cores, the faster on an H100:
    docs/design.md#products-in-fp32) or "tf32x3"."""
    if dtype != torch.float32:
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return settings.fp32_dot()


@dataclass(frozen=True)
class LaunchGeometry:
    """The shapes, convolution constants, mode and product precision of one call.

    ``args()`` gives them under the kernels' parameter names; every kernel takes all of them
    (the pulled input gradient ignores M, Co, Cog and IS_OFFSET)."""

    geo: ConvGeometry
    mode: str               # free offsets ("offset", "offset_yx") or a D²Conv mode ("x", "xy",
                            # "xxz", "xyz")
    coord_channels: int     # channels of the offset or size tensor
    has_mask: bool
    precision: str          # tl.dot input_precision (dot_precision)

    @classmethod
    def of(cls, geo, mode, coords, mask, dtype):
        """The call's LaunchGeometry: one object per distinct call signature, kept (as its
        ``args()``) for the next call of the same shapes."""
        return _launch_geometry(geo, mode, coords.shape[1], mask is not None, dot_precision(dtype))

    @property
    def M(self):
        """Output voxels, N * To * Ho * Wo: the rows of the implicit GEMM."""
        To, Ho, Wo = self.geo.out
        return self.geo.N * To * Ho * Wo

    @property
    def Cg(self):
        """Input channels per conv group."""
        return self.geo.C // self.geo.groups

    @property
    def Cog(self):
        """Output channels per conv group."""
        return self.geo.Co // self.geo.groups

    @property
    def Cpg(self):
        """Input channels per offset group."""
        return self.geo.C // self.geo.offset_groups

    @property
    def SEG(self):
        """Channels of a segment: inside one conv group and one offset group."""
        return math.gcd(self.Cg, self.Cpg)

    @functools.cached_property
    def _args(self):
        geo = self.geo
        # per axis: its offset component (free offsets) or size channel (D²Conv); -1: none
        axes = tuple(-1 if a is None else a
                     for a in {**OFFSET_AXES, **SIZE_AXES}[self.mode])
        (KD, KH, KW), (SD, SH, SW) = geo.kernel, geo.stride
        (PD, PH, PW), (DD, DH, DW) = geo.padding, geo.dilation
        To, Ho, Wo = geo.out
        return dict(
            M=self.M, C=geo.C, T=geo.T, H=geo.H, W=geo.W, To=To, Ho=Ho, Wo=Wo, Co=geo.Co,
            Cg=self.Cg, Cog=self.Cog, Cpg=self.Cpg, SEG=self.SEG, G=geo.offset_groups,
            COORD_CH=self.coord_channels, M_BUCKET=next_power_of_2(self.M),
            KD=KD, KH=KH, KW=KW, SD=SD, SH=SH, SW=SW, PD=PD, PH=PH, PW=PW, DD=DD, DH=DH, DW=DW,
            IS_OFFSET=self.mode in OFFSET_AXES, SZ_CH=axes[0], SY_CH=axes[1], SX_CH=axes[2],
            HAS_MASK=self.has_mask, DOT_PRECISION=self.precision)

    def args(self):
        """The shapes and constants under the kernels' parameter names (a new dict each call)."""
        return dict(self._args)


@functools.lru_cache(maxsize=1024)
def _launch_geometry(geo, mode, coord_channels, has_mask, precision):
    return LaunchGeometry(geo, mode, coord_channels, has_mask, precision)


def next_power_of_2(n):
    """The smallest power of two >= n (>= 1): ``triton.next_power_of_2`` without its 1.5 µs of
    host time a call (a constexpr function since Triton 3.4)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a, b):
    """ceil(a / b) for positive ints, in host code (``triton.cdiv`` costs as ``next_power_of_2``)."""
    return -(-a // b)


def channels_last(input):
    """(N, C, T, H, W) -> contiguous (N, T, H, W, C), the layout every kernel gathers from."""
    return input.permute(0, 2, 3, 4, 1).contiguous()


def weight_tiles(weight, groups, c_major=False):
    """(Co, Cg, kd, kh, kw) -> contiguous (groups, K, Cg, Cog), or (groups, K, Cog, Cg) when
    ``c_major`` (input channels contiguous)."""
    Co, Cg = weight.shape[:2]
    w = weight.reshape(groups, Co // groups, Cg, -1)       # (groups, Cog, Cg, K)
    return (w.permute(0, 3, 1, 2) if c_major else w.permute(0, 3, 2, 1)).contiguous()
