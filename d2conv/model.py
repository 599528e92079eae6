"""The 3DC-Seg encoder-decoder (docs/model.md) with a choice of decoder convolution: dense
(3DC-Seg), ASPP (the dilated baseline), DCN, DCNv2 or D²Conv3D in the chosen refine blocks.

    clip (B, 3, T, H, W) RGB in [0, 1]  ->  logits (B, 1, T, H, W)
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels

from .backbones import BACKBONES
from .layers import VARIANTS, GroupNorm, convert_convs

MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)
DECODER_CONVS = ("dense", "aspp", *VARIANTS)


def conv3(in_channels, out_channels, dilation=1, bias=True):
    """3x3x3 convolution keeping the size (padding = dilation)."""
    return nn.Conv3d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=bias)


class Unit(nn.Sequential):
    """conv -> ReLU -> GroupNorm(1, C): the refine block's unit (norm after the ReLU). ``conv``
    is a 3x3x3 Conv3d unless given (the dilated baseline puts an ASPP3d there).

    The ReLU runs inside the norm's kernels (``GroupNorm.forward(x, relu=True)``: one pass over
    the conv's output fewer each way), and so does the bias of a plain nn.Conv3d (its
    convolution runs without it, and the norm adds it per channel before the ReLU: one pass
    fewer each way again; the conv's forward hooks do not run then). The modules keep their
    places, so the state dict's keys (``0.weight``, ``0.bias``, ``2.weight``) are those of conv,
    ReLU, GroupNorm in a row."""

    def __init__(self, in_channels, out_channels, conv=None):
        super().__init__(conv if conv is not None else conv3(in_channels, out_channels),
                         nn.ReLU(), GroupNorm(1, out_channels))

    def forward(self, x):
        conv, _, norm = self
        # exactly nn.Conv3d, whose forward is F.conv3d and then the bias: DepthwiseConv3d (a
        # subclass on its own kernels), the sampled layers and ASPP3d compute otherwise
        if type(conv) is nn.Conv3d and conv.bias is not None:
            return norm(conv._conv_forward(x, conv.weight, None), relu=True,
                        input_bias=conv.bias)
        return norm(conv(x), relu=True)


class ASPP3d(nn.Module):
    """Atrous spatial pyramid pooling in 3D: a 1x1x1 branch and three dilated 3x3x3 branches,
    each conv -> BN -> ReLU to ``out_channels``, concatenated and fused by 1x1x1 conv -> BN ->
    ReLU. ``rates`` are the spatial dilations (t dilation 1). Its BatchNorms train (they become
    SyncBatchNorm under DDP on GPUs, as in the original)."""

    def __init__(self, in_channels, out_channels, rates):
        super().__init__()

        def branch(conv):
            return nn.Sequential(conv, nn.BatchNorm3d(out_channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList(
            [branch(nn.Conv3d(in_channels, out_channels, 1, bias=False))]
            + [branch(nn.Conv3d(in_channels, out_channels, 3, padding=(1, r, r),
                                dilation=(1, r, r), bias=False)) for r in rates])
        self.fuse = branch(nn.Conv3d(out_channels * (1 + len(rates)), out_channels, 1, bias=False))

    def forward(self, x):
        return self.fuse(torch.cat([b(x) for b in self.branches], dim=1))


class GC3d(nn.Module):
    """Global convolution: (1,7,1) then (1,1,7) plus (1,1,7) then (1,7,1), summed."""

    def __init__(self, in_channels, out_channels, k=7):
        super().__init__()

        def conv(cin, kernel):
            return nn.Conv3d(cin, out_channels, kernel, padding=tuple(s // 2 for s in kernel))

        self.left = nn.Sequential(conv(in_channels, (1, k, 1)), conv(out_channels, (1, 1, k)))
        self.right = nn.Sequential(conv(in_channels, (1, 1, k)), conv(out_channels, (1, k, 1)))

    def forward(self, x):
        return self.left(x) + self.right(x)


class Refine3d(nn.Module):
    """Fuses an encoder feature f (B, Cin, T, H, W) with the coarser decoder map pm (B, C, ...):
    s = FS1(f); s = s + FS3(FS2(s)); m = s + upsample(pm); return m + MM2(MM1(m))."""

    def __init__(self, in_channels, channels, aspp_rates=None):
        super().__init__()
        # the dilated baseline: the first unit's conv becomes an ASPP, so the unit's ReLU and
        # GroupNorm follow it (as in the original code)
        self.FS1 = Unit(in_channels, channels,
                        ASPP3d(in_channels, channels, aspp_rates) if aspp_rates else None)
        self.FS2, self.FS3 = Unit(channels, channels), Unit(channels, channels)
        self.MM1, self.MM2 = Unit(channels, channels), Unit(channels, channels)

    def forward(self, f, pm):
        s = self.FS1(f)
        s = s + self.FS3(self.FS2(s))
        m = kernels.upsample_add(s, pm)     # s + trilinear upsampling of pm (align_corners)
        return m + self.MM2(self.MM1(m))


class Decoder(nn.Module):
    """GC3d on e4, then refine blocks rf3 (e3), rf2 (e2), rf1 (e1) and a 3x3x3 head.

    features: e1..e4 with ``channels`` (c1..c4) -> logits (B, 1, T1, H1, W1) at e1's size.
    ``aspp``: the conv of the first unit of every refine block whose input has more channels than
    ``mdim`` becomes an ASPP (rates (3, 6, 9) above 2*mdim input channels, else (6, 12, 18)).
    ``norm``: GroupNorm(1, mdim) after the GC and before the head's ReLU. The paper's decoder has
    neither; a decoder trained from scratch needs them: the GC output enters every refine block
    through the residual sums unnormalised, its biases drift under Adam, and the head's ReLU goes
    dead (the output collapses to a constant).
    """

    def __init__(self, channels, mdim=256, aspp=False, norm=False):
        super().__init__()
        c1, c2, c3, c4 = channels

        def rates(cin):
            if not aspp or cin <= mdim:
                return None
            return (3, 6, 9) if cin > 2 * mdim else (6, 12, 18)

        self.GC = GC3d(c4, mdim)
        self.convG1, self.convG2 = conv3(mdim, mdim), conv3(mdim, mdim)
        self.rf3 = Refine3d(c3, mdim, rates(c3))
        self.rf2 = Refine3d(c2, mdim, rates(c2))
        self.rf1 = Refine3d(c1, mdim, rates(c1))
        self.pred = conv3(mdim, 1)
        self.gc_norm = GroupNorm(1, mdim) if norm else nn.Identity()
        self.pred_norm = GroupNorm(1, mdim) if norm else nn.Identity()

    def forward(self, e1, e2, e3, e4):
        x = self.gc_norm(self.GC(e4))
        m4 = x + self.convG2(F.relu(self.convG1(F.relu(x))))
        m3 = self.rf3(e3, m4)
        m2 = self.rf2(e2, m3)
        m1 = self.rf1(e1, m2)
        return self.pred(F.relu(self.pred_norm(m1)))


class EncoderDecoder(nn.Module):
    """ir-CSN encoder + 3DC-Seg decoder, with the decoder's convolutions as chosen.

    decoder_conv: "dense" (3DC-Seg), "aspp" (dilated baseline), "dcn", "dcnv2" or
    "d2conv-{x,xy,xxz,xyz}" (the paper: "d2conv-xyz", modulated, in rf2 and rf3).
    converted: the refine blocks whose non-1x1x1 convolutions are replaced.
    decoder_norm: GroupNorm after the decoder's GC and before its head (see ``Decoder``); off in
    the paper's model, on for one trained from scratch.
    fg_prior: if given, the head's bias starts at the log-odds of this foreground fraction (so the
    initial prediction is the prior, not 0.5 everywhere).
    conv_options: passed to the replacing layers (e.g. modulation=False).

    forward: clip (B, 3, T, H, W), RGB in [0, 1], H and W multiples of 32 (the data pipeline
    pads; see ``pad_to_multiple``) -> logits (B, 1, T, H, W). Normalisation happens inside.
    """

    def __init__(self, backbone="ir_csn_152", decoder_conv="d2conv-xyz",
                 converted=("rf2", "rf3"), mdim=256, checkpoint=False, decoder_norm=False,
                 fg_prior=None, **conv_options):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
        if decoder_conv not in DECODER_CONVS:
            raise ValueError(f"decoder_conv must be one of {DECODER_CONVS}, got {decoder_conv!r}")
        self.encoder = BACKBONES[backbone](checkpoint=checkpoint)
        self.decoder = Decoder(self.encoder.channels, mdim, aspp=decoder_conv == "aspp",
                               norm=decoder_norm)
        if fg_prior is not None:
            if not 0 < fg_prior < 1:
                raise ValueError(f"fg_prior must be in (0, 1), got {fg_prior}")
            nn.init.constant_(self.decoder.pred.bias, math.log(fg_prior / (1 - fg_prior)))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1, 1), persistent=False)
        self.converted = 0
        if decoder_conv in VARIANTS:
            for name in converted:
                self.converted += convert_convs(getattr(self.decoder, name), decoder_conv,
                                                **conv_options)

    def forward(self, clip):
        T, H, W = clip.shape[2:]
        if H % 32 or W % 32:
            raise ValueError(f"clip height and width must be multiples of 32, got {H}x{W} "
                             f"(pad with d2conv.model.pad_to_multiple)")
        x = (clip - self.mean.to(clip.dtype)) / self.std.to(clip.dtype)
        logits = self.decoder(*self.encoder(x))
        return F.interpolate(logits, size=(T, H, W), mode="trilinear", align_corners=False)


def to_device(model, device):
    """``model`` moved to ``device``; on a GPU also to the channels_last_3d memory format, cuDNN's
    own layout and the one the D²Conv and depthwise kernels read without a copy: every activation
    then stays channels-last, and no NCDHW <-> NDHWC copies run around cuDNN. The paper model
    (ir-CSN-152, d2conv-xyz, bf16 autocast, unautotuned kernels) on an H100 (2026-12-06): a
    training step of two 8x480x864 clips 211.2 ms against 222.4, a batch of four clips in
    inference 90.7 against 99.8. The trainer and evaluate.py take their model from here."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
    return model


def padding(height, width, multiple=32):
    """(top, bottom, left, right) zero padding bringing (height, width) to multiples of
    ``multiple``, split evenly between the two sides, an odd pixel at the bottom / right (as the
    original pads 480x854 to 480x864: 5 px left and right). Training and inference share it."""
    pad_h, pad_w = -height % multiple, -width % multiple
    return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2


def pad_to_multiple(clip, multiple=32):
    """Zero-pad H and W to multiples of ``multiple`` (see ``padding``).

    clip: (..., H, W) -> (padded clip, (rows, cols)): the slices of the padded clip that hold the
    original, e.g. ``padded[..., rows, cols]``.
    """
    H, W = clip.shape[-2:]
    top, bottom, left, right = padding(H, W, multiple)
    return (F.pad(clip, (left, right, top, bottom)),
            (slice(top, top + H), slice(left, left + W)))
