"""D2Conv3d, DeformConv3d, their 2D forms D2Conv2d and DeformConv2d, convert_convs, and the
GroupNorm and DepthwiseConv3d layers."""
import pytest
import torch
from torch import nn

import torch.nn.functional as F

from d2conv.layers import (D2Conv2d, D2Conv3d, DeformConv2d, DeformConv3d, DepthwiseConv3d,
                            GroupNorm, convert_convs, predictor_parameters)
from helpers import DEVICE, rel_err

pytestmark = pytest.mark.usefixtures("reference_on_cpu")


def conv(cin=6, cout=8, kernel=(3, 3, 3), **kw):
    """A Conv3d keeping the size (at dilation 1)."""
    return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), **kw).to(DEVICE)


@pytest.mark.parametrize("variant, options", [
    (D2Conv3d, dict(mode="xyz", modulation=False)),
    (D2Conv3d, dict(mode="x", modulation=False, size_activation="relu")),
    (D2Conv3d, dict(mode="xxz", modulation=False, size_activation="elu")),
    (DeformConv3d, dict(modulation=False)),
    (DeformConv3d, dict(modulation=False, restrict="spatial")),
])
def test_unmodulated_conversion_equals_the_conv_at_init(variant, options):
    original = conv(groups=2, dilation=(1, 2, 1), stride=(1, 1, 2))
    layer = variant.from_conv(original, **options)
    x = torch.randn(2, 6, 3, 7, 8, device=DEVICE)
    assert rel_err(layer(x), original(x)) <= 1e-5


def test_linear_size_activation_is_the_raw_prediction():
    """As in the original code, "linear" is s = raw: 0 at initialisation, so every kernel point
    samples the centre and the layer is a 1x1x1 convolution with the kernel's weights summed."""
    original = conv(kernel=(3, 3, 3))
    layer = D2Conv3d.from_conv(original, mode="xyz", modulation=False, size_activation="linear")
    x = torch.randn(2, 6, 3, 7, 8, device=DEVICE)
    size, _ = layer.sizes(x)
    assert torch.all(size == 0)
    with torch.no_grad():
        layer.predictor.bias[:3] = torch.tensor([0.3, -1.5, 2.0])
    assert torch.allclose(layer.sizes(x)[0][:, :, 0, 0, 0],
                          torch.tensor([0.3, -1.5, 2.0], device=DEVICE).expand(2, 3))
    with torch.no_grad():
        layer.predictor.bias.zero_()
    centre = torch.nn.functional.conv3d(x, original.weight.sum((2, 3, 4), keepdim=True),
                                        original.bias)
    assert rel_err(layer(x), centre) <= 1e-5


def test_modulation_starts_at_half():
    original = conv(bias=False)
    layer = D2Conv3d.from_conv(original)          # modulated, as in the paper
    x = torch.randn(1, 6, 3, 5, 6, device=DEVICE)
    assert rel_err(layer(x), 0.5 * original(x)) <= 1e-5
    size, mask = layer.sizes(x)
    assert torch.all(size == 1) and torch.all(mask == 0.5)


@pytest.mark.parametrize("variant", [D2Conv3d, DeformConv3d])
def test_predictor_learns(variant):
    """At initialisation (every sample on an integer) the predictor still gets a gradient."""
    layer = variant.from_conv(conv(), modulation=True)
    x = torch.randn(1, 6, 3, 5, 6, device=DEVICE)
    target = torch.randn(1, 8, 3, 5, 6, device=DEVICE)
    loss = ((layer(x) - target) ** 2).mean()
    loss.backward()
    grad = layer.predictor.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    coord_rows = grad[:layer.coord_channels].abs().sum()
    assert coord_rows > 0, "no gradient reached the size/offset channels"
    torch.optim.SGD(layer.parameters(), lr=1.0).step()
    coords, _ = layer.predict(x)
    assert coords.abs().sum() > 0


def test_restricted_offsets():
    layer = DeformConv3d(4, 4, 3, padding=1, restrict="temporal").to(DEVICE)
    nn.init.normal_(layer.predictor.weight)
    x = torch.randn(1, 4, 3, 4, 4, device=DEVICE)
    offset, _ = layer.predict(x)
    used = offset * layer.axes
    assert torch.all(used.view(1, 27, 3, 3, 4, 4)[:, :, 1:] == 0)
    assert used.view(1, 27, 3, 3, 4, 4)[:, :, 0].abs().sum() > 0


def test_convert_convs_counts_and_copies():
    net = nn.Sequential(conv(), nn.ReLU(), nn.Sequential(conv(8, 8), nn.Conv3d(8, 8, 1)),
                        nn.Conv3d(8, 8, (1, 7, 1), padding=(0, 3, 0)))
    weights = [net[0].weight.detach().clone(), net[2][0].weight.detach().clone()]
    assert convert_convs(net, "d2conv-xyz") == 3
    assert isinstance(net[0], D2Conv3d) and isinstance(net[2][0], D2Conv3d)
    assert type(net[2][1]) is nn.Conv3d                    # 1x1x1 stays
    assert torch.equal(net[0].weight, weights[0]) and torch.equal(net[2][0].weight, weights[1])
    assert convert_convs(net, "dcnv2") == 0                # converted layers are left alone
    with pytest.raises(ValueError, match="variant"):
        convert_convs(net, "d3conv")


def test_autocast_runs_the_layer_in_bf16():
    """Under bf16 autocast the kernels get bf16 tensors (no silent upcast of the op)."""
    layer = D2Conv3d.from_conv(conv())
    x = torch.randn(1, 6, 3, 5, 6, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, layer(x)) <= 2e-2


# 2D layers: float64 where numbers are compared (the reference on CPU is exact to rounding)
F64 = dict(device=DEVICE, dtype=torch.float64)
TOL64 = 1e-12 if DEVICE == "cpu" else 1e-5       # the GPU kernels accumulate in fp32


def conv2d(cin=6, cout=8, kernel=(3, 3), **kw):
    """A Conv2d keeping the size (at dilation 1), in float64."""
    return nn.Conv2d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), **kw).to(**F64)


@pytest.mark.parametrize("variant, options", [
    (D2Conv2d, dict(mode="xy", modulation=False)),
    (D2Conv2d, dict(mode="x", modulation=False, size_activation="relu")),
    (DeformConv2d, dict(modulation=False)),
])
def test_fresh_2d_layer_is_the_plain_conv2d(variant, options):
    geometry = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2)
    layer = variant(6, 8, 3, offset_groups=3, **geometry, **options).to(**F64)
    x = torch.randn(2, 6, 7, 8, **F64)
    assert rel_err(layer(x), F.conv2d(x, layer.weight, layer.bias, **geometry)) <= TOL64


@pytest.mark.parametrize("variant", [D2Conv2d, DeformConv2d])
@pytest.mark.parametrize("bias", [True, False])
def test_2d_modulation_starts_at_half(variant, bias):
    layer = variant(6, 8, (3, 5), padding=(1, 2), bias=bias, modulation=True).to(**F64)
    x = torch.randn(1, 6, 5, 6, **F64)
    half = 0.5 * F.conv2d(x, layer.weight, padding=(1, 2))
    if bias:
        half = half + layer.bias.view(1, -1, 1, 1)           # the bias is not modulated
    assert rel_err(layer(x), half) <= TOL64
    _, mask = layer.predict(x)
    assert mask.shape == (1, 15, 5, 6) and torch.all(mask == 0.5)
    if variant is D2Conv2d:
        assert torch.all(layer.sizes(x)[0] == 1)


@pytest.mark.parametrize("variant", ["dcn", "dcnv2", "d2conv-x", "d2conv-xy"])
def test_converted_conv2d_network_computes_the_same(variant):
    net = nn.Sequential(conv2d(3, 6), nn.ReLU(), conv2d(6, 6, groups=2, stride=2, bias=False),
                        nn.Conv2d(6, 4, 1).to(**F64))
    x = torch.randn(2, 3, 9, 10, **F64)
    before = net(x)
    assert convert_convs(net, variant, modulation=False) == 2
    assert all(p.dtype == torch.float64 and p.device.type == DEVICE for p in net.parameters())
    assert rel_err(net(x), before) <= TOL64


def test_convert_convs_2d_counts_skips_and_copies():
    net = nn.Sequential(conv(), nn.Sequential(conv2d(), nn.Conv2d(8, 8, 1)),
                        nn.Conv2d(8, 8, (1, 5), padding=(0, 2)))
    weight = net[1][0].weight.detach().clone()
    assert convert_convs(net, "dcnv2") == 3                # both 3D and 2D are counted
    assert isinstance(net[0], DeformConv3d) and isinstance(net[1][0], DeformConv2d)
    assert isinstance(net[2], DeformConv2d) and net[1][0].mask_channels == 9
    assert type(net[1][1]) is nn.Conv2d                    # 1x1 stays
    assert torch.equal(net[1][0].weight, weight) and net[1][0].weight.dtype == torch.float64
    assert convert_convs(net, "d2conv-xy") == 0            # converted layers are left alone
    assert len(predictor_parameters(net)) == 2 * 3          # the 2D layers' predictors too

    mixed = nn.Sequential(conv(), conv2d())
    assert convert_convs(mixed, "d2conv-xyz") == 1         # no 2D form: the Conv2d stays
    assert isinstance(mixed[0], D2Conv3d) and type(mixed[1]) is nn.Conv2d
    assert convert_convs(mixed, "d2conv-x", size_activation="relu") == 1
    assert isinstance(mixed[1], D2Conv2d) and mixed[1].mode == "x"
    assert mixed[1].size_activation == "relu"


def test_2d_groups_and_offset_groups():
    layer = DeformConv2d(4, 6, 3, padding=1, groups=2, offset_groups=2, modulation=True)
    assert layer.weight.shape == (6, 2, 3, 3)
    assert (layer.coord_channels, layer.mask_channels) == (2 * 9 * 2, 2 * 9)
    assert isinstance(layer.predictor, nn.Conv2d) and layer.predictor.out_channels == 54
    layer = D2Conv2d(4, 6, 3, padding=1, groups=2, offset_groups=4, mode="xy")
    assert (layer.coord_channels, layer.mask_channels) == (4 * 2, 4 * 9)
    assert "mode='xy', offset_groups=4, modulation=True, size_activation='elu'" in repr(layer)
    assert "offset_groups=2, modulation=False" in repr(DeformConv2d(4, 4, 3, offset_groups=2))
    with pytest.raises(ValueError, match="offset_groups"):
        D2Conv2d(4, 6, 3, offset_groups=3)
    with pytest.raises(ValueError, match="groups"):
        DeformConv2d(4, 6, 3, groups=4)


@pytest.mark.parametrize("mode", ["x", "xy"])
def test_d2conv2d_is_d2conv3d_on_one_frame(mode):
    """With a trained (random) predictor, the 2D layer is the 3D one on a single frame with a
    1-deep kernel: same weights, same sizes, same mask."""
    layer = D2Conv2d(4, 6, 3, padding=1, dilation=(1, 2), groups=2, offset_groups=2,
                     mode=mode).to(**F64)
    nn.init.normal_(layer.predictor.weight, std=0.3)
    nn.init.normal_(layer.predictor.bias, std=0.3)
    layer3 = D2Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), dilation=(1, 1, 2), groups=2,
                      offset_groups=2, mode=mode).to(**F64)
    with torch.no_grad():
        for p3, p2 in zip(layer3.parameters(), layer.parameters()):
            p3.copy_(p2.view(p3.shape))
    x = torch.randn(2, 4, 6, 7, **F64)
    assert rel_err(layer(x), layer3(x.unsqueeze(2)).squeeze(2)) <= TOL64


def test_deform_conv2d_is_deform_conv3d_on_one_frame():
    """The (y, x) offset pairs of the 2D layer are the (t, y, x) triples' last two with t = 0."""
    layer = DeformConv2d(4, 6, 3, padding=1, groups=2, offset_groups=2,
                         modulation=True).to(**F64)
    nn.init.normal_(layer.predictor.weight, std=0.3)
    nn.init.normal_(layer.predictor.bias, std=0.3)
    layer3 = DeformConv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), groups=2, offset_groups=2,
                          modulation=True).to(**F64)
    pairs, triples = layer.coord_channels, layer3.coord_channels
    rows = torch.arange(triples).view(-1, 3)[:, 1:].reshape(-1)   # the y and x rows
    with torch.no_grad():
        layer3.weight.copy_(layer.weight.unsqueeze(2))
        layer3.bias.copy_(layer.bias)
        layer3.predictor.weight[rows] = layer.predictor.weight[:pairs].unsqueeze(2)
        layer3.predictor.bias[rows] = layer.predictor.bias[:pairs]
        layer3.predictor.weight[triples:] = layer.predictor.weight[pairs:].unsqueeze(2)
        layer3.predictor.bias[triples:] = layer.predictor.bias[pairs:]
    x = torch.randn(2, 4, 6, 7, **F64)
    assert rel_err(layer(x), layer3(x.unsqueeze(2)).squeeze(2)) <= TOL64


@pytest.mark.parametrize("variant", [D2Conv2d, DeformConv2d])
def test_2d_predictor_learns(variant):
    """At initialisation (every sample on an integer) the 2D predictor still gets a gradient."""
    layer = variant.from_conv(conv2d(), modulation=True)
    x = torch.randn(1, 6, 5, 6, **F64)
    target = torch.randn(1, 8, 5, 6, **F64)
    ((layer(x) - target) ** 2).mean().backward()
    grads = [p.grad for p in predictor_parameters(layer)]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert layer.predictor.weight.grad[:layer.coord_channels].abs().sum() > 0, \
        "no gradient reached the size/offset channels"


def test_2d_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        D2Conv2d(4, 4, 3, mode="xyz")
    with pytest.raises(ValueError, match="mode"):
        D2Conv2d(4, 4, 3, mode="xxz")
    with pytest.raises(ValueError, match="size_activation"):
        D2Conv2d(4, 4, 3, size_activation="tanh")
    with pytest.raises(ValueError, match="kernel_size"):
        DeformConv2d(4, 4, (3, 3, 3))
    with pytest.raises(ValueError, match="nn.Conv2d"):
        D2Conv2d.from_conv(conv())
    with pytest.raises(ValueError, match="nn.Conv3d"):
        DeformConv3d.from_conv(conv2d())
    with pytest.raises(ValueError, match="padding"):
        DeformConv2d.from_conv(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="restrict"):           # 3D only
        DeformConv2d(4, 4, 3, restrict="spatial")


@pytest.mark.parametrize("groups", [1, 3])
def test_group_norm_layer_is_nn_group_norm(groups):
    """The same state dict as nn.GroupNorm, the same function, ReLU(x) with relu=True, and of
    x + input_bias per channel with an input bias."""
    torch.manual_seed(0)
    ref = nn.GroupNorm(groups, 6).to(DEVICE)
    nn.init.uniform_(ref.weight, 0.5, 1.5)
    nn.init.normal_(ref.bias)
    layer = GroupNorm(groups, 6).to(DEVICE)
    layer.load_state_dict(ref.state_dict())
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 6, 3, 4, 5, device=DEVICE)
    assert rel_err(layer(x), ref(x)) < 1e-5
    assert rel_err(layer(x, relu=True), ref(F.relu(x))) < 1e-5
    shift = torch.randn(6, device=DEVICE)
    assert rel_err(layer(x, relu=True, input_bias=shift),
                   ref(F.relu(x + shift.view(6, 1, 1, 1)))) < 1e-5


def test_depthwise_layer_is_a_depthwise_conv3d():
    """nn.Conv3d's constructor and state dict, the same function; not a depthwise shape: one
    line naming it."""
    torch.manual_seed(0)
    ref = nn.Conv3d(6, 6, 3, stride=(1, 2, 2), padding=1, groups=6).to(DEVICE)
    layer = DepthwiseConv3d(6, 6, 3, stride=(1, 2, 2), padding=1).to(DEVICE)
    layer.load_state_dict(ref.state_dict())
    assert layer.groups == 6 and set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 6, 3, 7, 8, device=DEVICE)
    assert rel_err(layer(x), ref(x)) < 1e-5
    with pytest.raises(ValueError, match="in_channels == out_channels == groups"):
        DepthwiseConv3d(6, 12, 3)
    with pytest.raises(ValueError, match="padding"):
        DepthwiseConv3d(6, 6, 3, padding="same")
    assert convert_convs(nn.Sequential(layer), "d2conv-xyz") == 1     # converted as the Conv3d
