"""ir-CSN backbones: feature shapes (on the meta device), parameter counts from the topology,
frozen BN, and activation checkpointing."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from d2conv import backbones
from d2conv.backbones import (Bottleneck, FrozenBatchNorm3d, conv_norm, ir_csn_50, ir_csn_152,
                              ir_csn_tiny)
from d2conv.layers import DepthwiseConv3d

pytestmark = pytest.mark.usefixtures("reference_on_cpu")

SHAPES_8x480x864 = [(256, 8, 120, 216), (512, 4, 60, 108), (1024, 2, 30, 54), (2048, 1, 15, 27)]


def expected_params(layers, widths=(64, 128, 256, 512), expansion=4, stem=64):
    """Learnable parameters implied by the topology (frozen BN has none, convs have no bias)."""
    total, in_ch = 3 * stem * 3 * 7 * 7, stem
    for n_blocks, w in zip(layers, widths):
        for j in range(n_blocks):
            total += in_ch * w + w * 27 + w * expansion * w
            if j == 0:
                total += in_ch * expansion * w
            in_ch = expansion * w
    return total


@pytest.mark.parametrize("factory", [ir_csn_152, ir_csn_50], ids=["ir-csn-152", "ir-csn-50"])
def test_feature_shapes_8x480x864(factory):
    with torch.device("meta"):
        model = factory().eval()
        features = model(torch.empty(2, 3, 8, 480, 864))
    assert model.channels == (256, 512, 1024, 2048)
    assert [tuple(f.shape) for f in features] == [(2,) + s for s in SHAPES_8x480x864]


@pytest.mark.parametrize("factory, layers", [(ir_csn_152, [3, 8, 36, 3]), (ir_csn_50, [3, 4, 6, 3])],
                         ids=["ir-csn-152", "ir-csn-50"])
def test_parameter_count(factory, layers):
    with torch.device("meta"):
        model = factory()
    n = sum(p.numel() for p in model.parameters())
    print(f"{factory.__name__}: {n:,} parameters")
    assert n == expected_params(layers)
    assert [len(stage) for stage in model.stages] == layers
    for stage in model.stages:                          # projection shortcut on first blocks only
        assert [b.shortcut_conv is not None for b in stage] == [True] + [False] * (len(stage) - 1)
        assert all(m.bias is None for m in stage.modules() if isinstance(m, torch.nn.Conv3d))


def test_frozen_bn_matches_batch_norm_eval():
    torch.manual_seed(0)
    bn = FrozenBatchNorm3d(6)
    assert bn.eps == 1e-3 and list(bn.parameters()) == []
    assert set(bn.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(6))
    bn.running_var.copy_(torch.rand(6) + 0.1)
    x = torch.randn(2, 6, 3, 5, 7)
    ref = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=1e-3)
    torch.testing.assert_close(bn.train()(x), ref, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "cl"])
@pytest.mark.parametrize("conv", [
    torch.nn.Conv3d(4, 6, 1, bias=False),
    torch.nn.Conv3d(4, 6, 1),
    torch.nn.Conv3d(4, 6, 3, stride=2, padding=1),
    DepthwiseConv3d(4, 4, 3, stride=(1, 2, 2), padding=1, bias=False),
], ids=["1x1x1", "1x1x1-bias", "3x3x3-stride2-bias", "depthwise"])
def test_frozen_bn_folded_into_the_conv(conv, channels_last):
    """conv_norm folds a frozen BN into the convolution: the output and the gradients of the
    input and the conv's weight are those of BN(conv(x)); a 1x1x1 convolution of a
    channels-last input (a GEMM over its rows) keeps the format."""
    torch.manual_seed(0)
    bn = FrozenBatchNorm3d(conv.out_channels)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).copy_(torch.randn(conv.out_channels))
    bn.running_var.copy_(torch.rand(conv.out_channels) + 0.1)
    x = torch.randn(2, 4, 3, 6, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    ref = bn(conv(x))
    out = conv_norm(conv, bn, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if channels_last and conv.kernel_size == (1, 1, 1):
        assert out.is_contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, conv.weight), grad)
    grads = torch.autograd.grad(out, (x, conv.weight), grad)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    norm = torch.nn.GroupNorm(2, conv.out_channels)       # any other norm is applied as it is
    torch.testing.assert_close(conv_norm(conv, norm, x), norm(conv(x)))


def test_bottleneck_depthwise_conv_is_the_triton_layer():
    block = Bottleneck(16, 8, stride=2)
    assert type(block.conv2) is DepthwiseConv3d and block.conv2.stride == (2, 2, 2)
    assert tuple(block.state_dict()["conv2.weight"].shape) == (8, 1, 3, 3, 3)


def test_frozen_bn_loads_batchnorm3d_state():
    ref = torch.nn.BatchNorm3d(4, eps=1e-3)
    bn = FrozenBatchNorm3d(4)
    bn.load_state_dict(ref.state_dict())              # num_batches_tracked is dropped


def test_tiny_checkpointing_same_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(backbones, "checkpoint_fn", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    torch.manual_seed(0)
    model = ir_csn_tiny().train()
    assert model.channels == (32, 64, 128, 256)
    x = torch.randn(2, 3, 8, 32, 32)

    def grads(checkpoint):
        model.checkpoint = checkpoint
        model.zero_grad()
        xi = x.clone().requires_grad_()
        features = model(xi)
        sum(f.square().mean() for f in features).backward()
        return [f.detach() for f in features], [xi.grad] + [p.grad.clone() for p in model.parameters()]

    feats_plain, grads_plain = grads(False)
    assert calls == []
    feats_ckpt, grads_ckpt = grads(True)
    assert len(calls) == 4                              # every block ran checkpointed
    assert [tuple(f.shape[1:]) for f in feats_plain] == [(32, 8, 8, 8), (64, 4, 4, 4),
                                                          (128, 2, 2, 2), (256, 1, 1, 1)]
    for a, b in zip(feats_plain + grads_plain, feats_ckpt + grads_ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in grads_plain)
