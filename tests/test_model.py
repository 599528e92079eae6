"""The encoder-decoder (docs/model.md): shapes at the paper's size (on the meta device), the
decoder variants of the paper's comparison, and a training step of the tiny model on CPU."""
import pytest
import torch
import torch.nn.functional as F

from d2conv.layers import D2Conv3d, DeformConv3d, DepthwiseConv3d, GroupNorm
from d2conv.model import (DECODER_CONVS, ASPP3d, EncoderDecoder, Unit, pad_to_multiple,
                          padding, to_device)
from helpers import DEVICE

pytestmark = pytest.mark.usefixtures("reference_on_cpu")


def test_paper_model_shapes_on_meta():
    with torch.device("meta"):
        model = EncoderDecoder("ir_csn_152", "d2conv-xyz")
        clip = torch.rand(1, 3, 8, 480, 864)
        features = model.encoder(clip)
        logits = model(clip)
    assert [tuple(f.shape[1:]) for f in features] == [
        (256, 8, 120, 216), (512, 4, 60, 108), (1024, 2, 30, 54), (2048, 1, 15, 27)]
    assert logits.shape == (1, 1, 8, 480, 864)
    assert model.converted == 10
    d2 = [m for m in model.modules() if isinstance(m, D2Conv3d)]
    assert len(d2) == 10 and all(m.mode == "xyz" and m.mask_channels == 27 for m in d2)
    assert all(m.weight.shape[2:] == (3, 3, 3) for m in d2)


@pytest.mark.parametrize("decoder_conv", DECODER_CONVS)
def test_every_decoder_variant_builds(decoder_conv):
    with torch.device("meta"):
        model = EncoderDecoder("ir_csn_50", decoder_conv)
        logits = model(torch.rand(2, 3, 8, 224, 320))
    assert logits.shape == (2, 1, 8, 224, 320)
    sampled = [m for m in model.modules() if isinstance(m, (D2Conv3d, DeformConv3d))]
    assert len(sampled) == (10 if decoder_conv not in ("dense", "aspp") else 0)


def test_aspp_replaces_the_first_conv_of_wide_refine_blocks():
    """As in the original, the ASPP sits inside the refine block's first unit: the unit's ReLU
    and GroupNorm(1, 256) follow it."""
    with torch.device("meta"):
        model = EncoderDecoder("ir_csn_152", "aspp")
    units = model.decoder.rf3.FS1, model.decoder.rf2.FS1, model.decoder.rf1.FS1
    for unit in units:
        assert [type(m) for m in list(unit)[1:]] == [torch.nn.ReLU, GroupNorm]
        assert unit[2].num_groups == 1 and unit[2].num_channels == 256
    rf3, rf2, rf1 = (unit[0] for unit in units)
    assert isinstance(rf3, ASPP3d) and isinstance(rf2, ASPP3d) and not isinstance(rf1, ASPP3d)
    assert isinstance(rf1, torch.nn.Conv3d)
    assert all(isinstance(b[1], torch.nn.BatchNorm3d) for b in rf3.branches)
    assert [b[0].dilation for b in rf3.branches[1:]] == [(1, 3, 3), (1, 6, 6), (1, 9, 9)]
    assert [b[0].dilation for b in rf2.branches[1:]] == [(1, 6, 6), (1, 12, 12), (1, 18, 18)]
    assert all(b[0].padding == b[0].dilation for b in rf2.branches[1:])


UNIT_CONVS = {
    "conv": lambda: torch.nn.Conv3d(6, 6, 3, padding=1),
    "conv-nobias": lambda: torch.nn.Conv3d(6, 6, 3, padding=1, bias=False),
    "depthwise": lambda: DepthwiseConv3d(6, 6, 3, padding=1),
    "d2conv": lambda: D2Conv3d(6, 6, 3, padding=1),
    "aspp": lambda: ASPP3d(6, 6, (1, 2, 3)),
}


@pytest.mark.parametrize("conv", UNIT_CONVS)
def test_unit_is_conv_relu_group_norm(conv):
    """The unit runs its ReLU inside the norm's kernels, and the bias of a plain nn.Conv3d too
    (the conv's forward, hooks included, does not run then): conv -> ReLU -> GroupNorm(1, C) all
    the same, output and every gradient, with the state dict of the three modules in a row."""
    torch.manual_seed(0)
    unit = Unit(6, 6, UNIT_CONVS[conv]()).to(DEVICE)
    if conv == "conv":
        torch.nn.init.normal_(unit[0].bias, std=0.5)
    torch.nn.init.uniform_(unit[2].weight, 0.5, 1.5)
    torch.nn.init.normal_(unit[2].bias)
    assert set(unit.state_dict()) == ({"0." + k for k in unit[0].state_dict()}
                                      | {"2.weight", "2.bias"})
    calls = []
    unit[0].register_forward_hook(lambda *args: calls.append(args))
    x = torch.randn(2, 6, 3, 5, 6, device=DEVICE, requires_grad=True)
    out = unit(x)
    assert len(calls) == (0 if conv == "conv" else 1)
    ref = F.group_norm(F.relu(unit[0](x)), 1, unit[2].weight, unit[2].bias)
    wrt = [x, *unit.parameters()]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, wrt, grad_out)
    ref_grads = torch.autograd.grad(ref, wrt, grad_out)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    for g, r in zip(grads, ref_grads):
        assert ((g - r).norm() / r.norm()).item() < 1e-5


def test_to_device_puts_a_gpu_model_in_channels_last():
    """On the CPU the model only moves; on a GPU its convolutions' weights, and so every
    activation, are channels_last_3d, and it computes what the contiguous model does."""
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_tiny", "d2conv-xyz", mdim=16).eval()
    on_cpu = to_device(model, "cpu")
    assert on_cpu.decoder.pred.weight.is_contiguous()
    if DEVICE != "cuda":
        return
    clip = torch.rand(1, 3, 4, 64, 64, device=DEVICE)
    with torch.no_grad():
        ref = model.to(DEVICE)(clip)
        out = to_device(model, DEVICE)(clip)
    assert model.decoder.pred.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4


def test_unpadded_clip_is_refused_and_padding_helper():
    model = EncoderDecoder("ir_csn_tiny", "dense", mdim=8)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.rand(1, 3, 2, 40, 64))
    clip = torch.rand(1, 3, 2, 40, 70)
    padded, (rows, cols) = pad_to_multiple(clip)
    assert padded.shape[-2:] == (64, 96) and torch.equal(padded[..., rows, cols], clip)
    assert (rows.start, rows.stop, cols.start, cols.stop) == (12, 52, 13, 83)
    assert padded[..., :12, :].abs().sum() == 0 and padded[..., :, 83:].abs().sum() == 0
    # 854 -> 864 as the original: 5 px on each side; an odd pixel goes to the bottom / right
    assert padding(480, 854) == (0, 0, 5, 5) and padding(33, 61) == (15, 16, 1, 2)


@pytest.mark.parametrize("decoder_conv", ["d2conv-xyz", "dcnv2", "aspp"])
def test_tiny_model_trains_one_step(decoder_conv):
    torch.manual_seed(0)
    model = EncoderDecoder("ir_csn_tiny", decoder_conv, mdim=16, checkpoint=True).to(DEVICE)
    model.train()
    clip = torch.rand(2, 3, 4, 64, 64, device=DEVICE)
    target = (torch.rand(2, 1, 4, 64, 64, device=DEVICE) > 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = F.binary_cross_entropy_with_logits(model(clip), target)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    predictors = [g for name, g in grads.items() if "predictor.weight" in name]
    assert len(predictors) == (0 if decoder_conv == "aspp" else 10)
    assert all(g.abs().sum() > 0 for g in predictors)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_from_scratch_options_of_the_decoder():
    """decoder_norm adds the two GroupNorms; fg_prior starts the head at the prior's log-odds;
    predictor_parameters finds exactly the converted layers' predictors."""
    import math

    from d2conv.layers import predictor_parameters
    model = EncoderDecoder("ir_csn_tiny", "d2conv-xyz", mdim=8, decoder_norm=True, fg_prior=0.12)
    assert isinstance(model.decoder.gc_norm, torch.nn.GroupNorm)
    assert isinstance(model.decoder.pred_norm, torch.nn.GroupNorm)
    assert torch.allclose(model.decoder.pred.bias, torch.tensor(math.log(0.12 / 0.88)))
    assert len(predictor_parameters(model)) == 2 * model.converted          # weight and bias
    plain = EncoderDecoder("ir_csn_tiny", "dense", mdim=8)
    assert isinstance(plain.decoder.gc_norm, torch.nn.Identity) and not predictor_parameters(plain)
    with pytest.raises(ValueError, match="fg_prior"):
        EncoderDecoder("ir_csn_tiny", "dense", mdim=8, fg_prior=1.5)


def test_build_model_from_an_older_checkpoint_config():
    """A checkpoint's config dict without the newer fields builds the model it was trained as."""
    from d2conv.config import build_model
    model = build_model({"backbone": "ir_csn_tiny", "decoder_conv": "dense", "mdim": 8,
                         "data": "synthetic"})
    assert isinstance(model.decoder.gc_norm, torch.nn.Identity) and model.converted == 0
