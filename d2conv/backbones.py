"""The channel-separated ResNet "ir-CSN" (interaction-reduced) used as the encoder, with frozen BN.

ir-CSN-152 ([3, 8, 36, 3] blocks) is the paper's backbone; ir-CSN-50 ([3, 4, 6, 3]) has the same
blocks; ir-CSN-tiny and ir-CSN-small (one block per stage, narrow, GroupNorm) are trained from
scratch: tiny on a CPU, small on a GPU.
For an input (B, 3, 8, 480, 864) ir-CSN-152 gives

    e1 (B, 256, 8, 120, 216)   e2 (B, 512, 4, 60, 108)
    e3 (B, 1024, 2, 30, 54)    e4 (B, 2048, 1, 15, 27)

Convolutions keep PyTorch's default initialisation; the real weights come from the VMZ model zoo
through ``d2conv.weights``.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from .layers import DepthwiseConv3d, GroupNorm

__all__ = ["FrozenBatchNorm3d", "conv_norm", "Stem", "Bottleneck", "IrCSN", "ir_csn_152", "ir_csn_50", "ir_csn_tiny",
           "ir_csn_small", "group_norm", "BACKBONES"]


class FrozenBatchNorm3d(nn.Module):
    """Batch norm with fixed statistics and affine: y = (x - mean) / sqrt(var + eps) * weight + bias.

    ``weight``, ``bias``, ``running_mean`` and ``running_var`` are buffers of shape (C,), so the
    optimiser never sees them and ``train()`` changes nothing. The affine is computed in fp32 and
    applied in ``x.dtype`` (bf16 under autocast). x: (B, C, ...) -> same shape.
    """

    def __init__(self, num_features: int, eps: float = 1e-3):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def scale_shift(self):
        """(scale, shift), fp32 (C,): the affine map y = x * scale + shift."""
        scale = self.weight.float() * torch.rsqrt(self.running_var.float() + self.eps)
        return scale, self.bias.float() - self.running_mean.float() * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_shift()
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # accept a state dict of a regular BatchNorm3d: its step counter means nothing here
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def conv_norm(conv: nn.Conv3d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm(conv(x)); a frozen BN is folded into the convolution instead (weight * scale, bias
    shift), which computes the same function without the BN's two elementwise passes over the
    convolution's output.

    A folded 1x1x1 convolution of stride 1 over a channels-last input runs as the GEMM it is,
    F.linear over the (N*T*H*W, C) rows, whose bias cuBLAS adds in the product's epilogue:
    PyTorch adds a cuDNN convolution's bias in a pass of its own, in a broadcast kernel that ran
    at about a fifth of the card's bandwidth (H100, 2026-12-06)."""
    if not isinstance(norm, FrozenBatchNorm3d):
        return norm(conv(x))
    scale, shift = norm.scale_shift()
    weight = conv.weight * scale.view(-1, 1, 1, 1, 1).to(conv.weight.dtype)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    if _pointwise(conv, x):
        rows = x.permute(0, 2, 3, 4, 1)                 # (N, T, H, W, C), contiguous
        return F.linear(rows, weight.flatten(1), bias).permute(0, 4, 1, 2, 3)
    return conv._conv_forward(x, weight, bias)      # the conv's own op (DepthwiseConv3d: Triton)


def _pointwise(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether conv is a plain 1x1x1 convolution (stride 1, no padding, one group) of a
    channels-last x: a GEMM over x's rows without a copy."""
    return (conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1)
            and conv.padding == (0, 0, 0) and conv.groups == 1 and x.dim() == 5
            and x.is_contiguous(memory_format=torch.channels_last_3d))


class Stem(nn.Module):
    """Conv3d (3,7,7) stride (1,2,2) -> frozen BN -> ReLU -> max-pool (1,3,3) stride (1,2,2).

    x: (B, 3, T, H, W) -> (B, C, T, H/4, W/4).
    """

    def __init__(self, channels: int = 64, norm=FrozenBatchNorm3d):
        super().__init__()
        self.conv = nn.Conv3d(3, channels, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn = norm(channels)
        self.pool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(conv_norm(self.conv, self.bn, x)))


class Bottleneck(nn.Module):
    """ir-CSN bottleneck: 1x1x1 -> BN -> ReLU -> depthwise 3x3x3 (stride s; DepthwiseConv3d, the
    Triton kernels) -> BN -> ReLU -> 1x1x1 -> BN, plus the shortcut (1x1x1 conv stride s + BN where
    the shape changes, else identity), ReLU.

    x: (B, in_ch, T, H, W) -> (B, width * expansion, T/s, H/s, W/s).
    """

    def __init__(self, in_ch: int, width: int, stride: int, expansion: int = 4,
                 norm=FrozenBatchNorm3d):
        super().__init__()
        out_ch = width * expansion
        self.conv1 = nn.Conv3d(in_ch, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = DepthwiseConv3d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv3d(width, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        if stride != 1 or in_ch != out_ch:          # the first block of every stage
            self.shortcut_conv = nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.shortcut_bn = norm(out_ch)
        else:
            self.shortcut_conv = self.shortcut_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(conv_norm(self.conv1, self.bn1, x))
        out = F.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        if self.shortcut_conv is not None:
            x = conv_norm(self.shortcut_conv, self.shortcut_bn, x)
        return F.relu(out + x)


class IrCSN(nn.Module):
    """Stem and four stages of bottlenecks with strides 1, 2, 2, 2 on T, H and W.

    ``layers``: blocks per stage; ``widths``: bottleneck widths; stage k outputs
    ``channels[k] = widths[k] * expansion`` channels. With ``checkpoint=True`` every block runs
    under activation checkpointing while training with grad enabled; a block draws no random
    numbers, so the RNG state is not saved for its recomputation (one host call fewer a block,
    and none that a CUDA graph capture could not take). ``norm`` builds the
    normalisation layers: frozen BN for the pretrained networks, GroupNorm for those trained
    from scratch.

    x: (B, 3, T, H, W), H and W multiples of 32 -> (e1, e2, e3, e4) with
    e1 (B, C1, T, H/4, W/4), e2 (B, C2, T/2, H/8, W/8), e3 (B, C3, T/4, H/16, W/16),
    e4 (B, C4, T/8, H/32, W/32) (T rounded up at each halving).
    """

    def __init__(self, layers, widths=(64, 128, 256, 512), expansion: int = 4,
                 stem_channels: int = 64, checkpoint: bool = False, norm=FrozenBatchNorm3d):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"layers and widths need 4 stages, got layers={layers}, widths={widths}")
        self.layers, self.checkpoint = tuple(layers), checkpoint
        self.channels = tuple(w * expansion for w in widths)
        self.stem = Stem(stem_channels, norm)
        stages, in_ch = [], stem_channels
        for n_blocks, width, stride in zip(layers, widths, (1, 2, 2, 2)):
            blocks = []
            for j in range(n_blocks):
                blocks.append(Bottleneck(in_ch, width, stride if j == 0 else 1, expansion, norm))
                in_ch = width * expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        use_ckpt = self.checkpoint and self.training and torch.is_grad_enabled()
        features = []
        for stage in self.stages:
            for block in stage:
                x = (checkpoint_fn(block, x, use_reentrant=False, preserve_rng_state=False)
                     if use_ckpt else block(x))
            features.append(x)
        return tuple(features)


def ir_csn_152(checkpoint: bool = False) -> IrCSN:
    """The paper's backbone: [3, 8, 36, 3] blocks, channels (256, 512, 1024, 2048)."""
    return IrCSN([3, 8, 36, 3], checkpoint=checkpoint)


def ir_csn_50(checkpoint: bool = False) -> IrCSN:
    """[3, 4, 6, 3] blocks, channels (256, 512, 1024, 2048)."""
    return IrCSN([3, 4, 6, 3], checkpoint=checkpoint)


def group_norm(channels: int) -> GroupNorm:
    """GroupNorm in 8 groups (one channel a group below 8 channels)."""
    return GroupNorm(min(8, channels), channels)


def ir_csn_tiny(checkpoint: bool = False, layers=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                stem_channels: int = 8, norm=group_norm) -> IrCSN:
    """One block per stage, stem 8, widths (8, 16, 32, 64): channels (32, 64, 128, 256) (other
    sizes for experiments through the arguments).

    It has no pretrained weights, so its normalisation trains: GroupNorm, which keeps no running
    statistics, so validation normalises exactly as training does. With trainable BatchNorm the
    CPU default's validation IoU depended on the rounding of the CPU's kernels: 0.624 on
    AVX-512, 0.390 on AVX2 (2-core AMD EPYC), where normalising with the batch's own statistics
    instead of the running ones gave 0.537."""
    return IrCSN(list(layers), widths=tuple(widths), stem_channels=stem_channels,
                 checkpoint=checkpoint, norm=norm)


def ir_csn_small(checkpoint: bool = False) -> IrCSN:
    """ir-CSN-tiny three times as wide, for training from scratch on a GPU: one block per stage,
    stem 16, widths (24, 48, 96, 192), channels (96, 192, 384, 768), GroupNorm."""
    return ir_csn_tiny(checkpoint, widths=(24, 48, 96, 192), stem_channels=16)


# every backbone by the name a config gives (``EncoderDecoder(backbone=...)``); ``python -m
# d2conv.weights convert --depth D`` builds ``ir_csn_D``
BACKBONES = {"ir_csn_152": ir_csn_152, "ir_csn_50": ir_csn_50, "ir_csn_small": ir_csn_small,
             "ir_csn_tiny": ir_csn_tiny}
