"""The PyTorch reference itself, checked against the operators of docs/operators.md written as
plain loops, against autograd's numerical gradient away from integers, and against forward
differences at integers."""
import itertools
import math

import pytest
import torch

from helpers import Case, apply, make_inputs
from kernels import naive
from kernels.checks import triple


def spec_loops(x, offset, weight, bias, stride, padding, dilation, mask, groups):
    """The deformable convolution of docs/operators.md transcribed scalar by scalar (float64,
    tiny sizes only)."""
    N, C, T, H, W = x.shape
    Co, Cg, kd, kh, kw = weight.shape
    K = kd * kh * kw
    (sd, sh, sw), (pd, ph, pw), (dd, dh, dw) = stride, padding, dilation
    To, Ho, Wo = offset.shape[2:]
    G = offset.shape[1] // (3 * K)
    out = torch.zeros(N, Co, To, Ho, Wo, dtype=torch.float64)

    def value(n, c, z, y, xx):
        z0, y0, x0 = math.floor(z), math.floor(y), math.floor(xx)
        total = 0.0
        for cz, cy, cx in itertools.product((0, 1), repeat=3):
            iz, iy, ix = z0 + cz, y0 + cy, x0 + cx
            if 0 <= iz < T and 0 <= iy < H and 0 <= ix < W:
                wgt = ((z - z0) if cz else (1 - (z - z0))) * ((y - y0) if cy else (1 - (y - y0))) \
                    * ((xx - x0) if cx else (1 - (xx - x0)))
                total += wgt * x[n, c, iz, iy, ix].item()
        return total

    for n, o, t, h, w in itertools.product(range(N), range(Co), range(To), range(Ho), range(Wo)):
        acc = bias[o].item() if bias is not None else 0.0
        gr = o // (Co // groups)
        for cg, (i, j, l) in itertools.product(range(Cg), itertools.product(range(kd), range(kh), range(kw))):
            c = gr * Cg + cg
            g = c // (C // G)
            k = (i * kh + j) * kw + l
            dz, dy, dx = (offset[n, (g * K + k) * 3 + a, t, h, w].item() for a in range(3))
            m = mask[n, g * K + k, t, h, w].item() if mask is not None else 1.0
            z = t * sd - pd + i * dd + dz
            y = h * sh - ph + j * dh + dy
            xx = w * sw - pw + l * dw + dx
            acc += weight[o, cg, i, j, l].item() * m * value(n, c, z, y, xx)
        out[n, o, t, h, w] = acc
    return out


@pytest.mark.parametrize("case", [
    Case(N=1, C=4, T=2, H=3, W=4, Co=2, groups=2, G=2),
    Case(N=2, C=2, T=3, H=3, W=3, Co=2, kernel=(1, 2, 3), stride=(1, 2, 1), padding=(0, 1, 1),
         dilation=(1, 1, 2), mask=False),
], ids=str)
def test_reference_matches_spec_loops(case):
    x, offset, w, b, m = (None if t is None else t.detach().double()
                          for t in make_inputs(case, device="cpu"))
    expected = spec_loops(x, offset, w, b, triple(case.stride, ""), triple(case.padding, ""),
                          triple(case.dilation, ""), m, case.groups)
    assert torch.allclose(apply(case, x, offset, w, b, m, impl=naive), expected, atol=1e-12)


def test_reference_gradients_match_finite_differences():
    case = Case(N=1, C=4, T=2, H=3, W=3, Co=2, groups=2, G=2)
    inputs = [t.detach().double().requires_grad_() for t in make_inputs(case, device="cpu")]
    torch.autograd.gradcheck(lambda *a: apply(case, *a, impl=naive), inputs)


@pytest.mark.parametrize("mode", ["x", "xyz"])
def test_reference_d2conv_gradients_match_finite_differences(mode):
    case = Case(N=1, C=2, T=3, H=4, W=4, Co=2, mode=mode)
    inputs = [t.detach().double().requires_grad_() for t in make_inputs(case, device="cpu")]
    torch.autograd.gradcheck(lambda *a: apply(case, *a, impl=naive), inputs)


def test_reference_takes_right_derivative_at_integers():
    """At an integer coordinate the gradient is (f(z + h) - f(z)) / h: the corner is held."""
    case = Case(N=1, C=2, T=3, H=4, W=4, Co=2)
    x, _, w, b, m = (t.detach().double() for t in make_inputs(case, device="cpu"))
    offset = torch.randint(-1, 2, (1, case.K * 3, *case.out)).double().requires_grad_()
    grad_out = torch.randn(1, case.Co, *case.out, dtype=torch.float64)
    loss = (apply(case, x, offset, w, b, m, impl=naive) * grad_out).sum()
    (grad,) = torch.autograd.grad(loss, offset)
    h = 1e-7
    for index in torch.randint(offset.numel(), (20,)).tolist():
        bumped = offset.detach().clone().view(-1)
        bumped[index] += h
        loss_h = (apply(case, x, bumped.view_as(offset), w, b, m, impl=naive) * grad_out).sum()
        assert abs((loss_h - loss).item() / h - grad.view(-1)[index].item()) < 1e-5


def test_offsets_from_size_layout():
    """Channel (g*K + k)*3 + a holds (index - centre) * dilation * (s - 1) along axis a."""
    size = torch.tensor([2.0, 3.0, 5.0]).view(1, 3, 1, 1, 1)
    offset = naive.offsets_from_size(size, (3, 3, 3), (1, 2, 1), "xyz").view(27, 3)
    k = (0 * 3 + 2) * 3 + 1          # i=0, j=2, l=1
    assert offset[k].tolist() == [-1 * 1 * 1.0, 1 * 2 * 2.0, 0.0]
    size_x = torch.tensor([2.0]).view(1, 1, 1, 1, 1)
    offset_x = naive.offsets_from_size(size_x, (3, 3, 3), 1, "x").view(27, 3)
    assert offset_x[:, 0].abs().sum() == 0                # mode x never moves t
    assert offset_x[k].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("case", [
    Case(N=2, C=4, T=3, H=5, W=4, Co=3, G=2, mode="xyz"),
    Case(N=1, C=2, T=3, H=4, W=5, Co=2, mode="x"),
    Case(N=1, C=2, T=3, H=4, W=5, Co=2, mode="xy", mask=False),
    Case(N=1, C=4, T=4, H=5, W=6, Co=2, groups=2, kernel=(3, 1, 3), padding=(1, 0, 2),
         dilation=(1, 1, 2), mode="xxz"),
], ids=str)
def test_d2conv_reference_equals_deform_on_its_offsets(case):
    """d2conv3d samples the axes whose offset is zero by construction with one corner: the
    same output and gradients as deform_conv3d on the expanded offsets, which takes two."""
    x, size, w, b, m = (None if t is None else t.detach().double().requires_grad_()
                        for t in make_inputs(case, device="cpu"))
    grad_out = torch.randn(case.N, case.Co, *case.out, dtype=torch.float64)
    out = naive.d2conv3d(x, size, w, b, mask=m, mode=case.mode, **case.conv_kwargs)
    named = {k: t for k, t in zip(("input", "size", "weight", "bias", "mask"), (x, size, w, b, m))
             if t is not None}
    grads = torch.autograd.grad((out * grad_out).sum(), list(named.values()))
    offset = naive.offsets_from_size(size, case.kernel, case.dilation, case.mode)
    out_ref = naive.deform_conv3d(x, offset, w, b, mask=m, **case.conv_kwargs)
    grads_ref = torch.autograd.grad((out_ref * grad_out).sum(), list(named.values()))
    assert torch.allclose(out, out_ref, atol=1e-12)
    for name, g, g_ref in zip(named, grads, grads_ref):
        assert torch.allclose(g, g_ref, atol=1e-11), name
