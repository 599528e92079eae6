"""D2Conv3d, DeformConv3d and convert_convs."""
import pytest
import torch
from torch import nn

from d2conv.layers import D2Conv3d, DeformConv3d, convert_convs
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
