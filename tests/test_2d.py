"""The 2D operators (kernels.deform_conv2d, kernels.d2conv2d): forward and every gradient against a
float64 reference written from torchvision.ops.deform_conv2d's documented semantics (bilinear
sampling with zeros outside, offsets as (y, x) pairs per kernel point, groups from the weight's
shape), equality with the 3D operators at T = 1, errors that name the bad argument, and, where
torchvision is installed (the GPU machine), torchvision's own op."""
import math

import re

import pytest
import torch

import kernels
from helpers import DEVICE, rel_err


def bilinear(images, y, x):
    """images (B, c, H, W) sampled at (y, x) (B, Ho, Wo): the four corners around each position
    (floor held fixed), each weighted by its bilinear weight, zero outside the image."""
    B, c, H, W = images.shape
    y0, x0 = torch.floor(y).detach(), torch.floor(x).detach()
    out = 0
    for cy in (0, 1):
        for cx in (0, 1):
            yy, xx = y0 + cy, x0 + cx
            weight = ((y - y0) if cy else (1 - (y - y0))) * ((x - x0) if cx else (1 - (x - x0)))
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            index = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long().flatten(1)
            value = images.flatten(2).gather(2, index[:, None].expand(-1, c, -1))
            out = out + value.view(B, c, *y.shape[1:]) * (weight * inside)[:, None]
    return out


def bilinear_reference(x, offset, weight, bias, stride, padding, dilation, mask):
    """torchvision's deform_conv2d in float64, written from its documentation (not from
    kernels.naive): kernel point k = i*kw + j of output pixel (h, w) samples channel c of offset
    group g at (h*sh - ph + i*dh + offset[n, (g*K + k)*2], w*sw - pw + j*dw + offset[n, (g*K +
    k)*2 + 1]), bilinearly, zero outside the image, times mask[n, g*K + k]."""
    N, C, H, W = x.shape
    Co, Cg, kh, kw = weight.shape
    K, groups = kh * kw, C // Cg
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    Ho, Wo = offset.shape[2:]
    G = offset.shape[1] // (2 * K)
    off = offset.reshape(N, G, K, 2, Ho, Wo)
    base_y = (torch.arange(Ho, dtype=x.dtype) * sh - ph).view(1, 1, Ho, 1)
    base_x = (torch.arange(Wo, dtype=x.dtype) * sw - pw).view(1, 1, 1, Wo)
    images = x.reshape(N * G, C // G, H, W)
    columns = []
    for k in range(K):
        i, j = divmod(k, kw)
        y = base_y + i * dh + off[:, :, k, 0]                  # (N, G, Ho, Wo)
        xx = base_x + j * dw + off[:, :, k, 1]
        sample = bilinear(images, y.reshape(N * G, Ho, Wo), xx.reshape(N * G, Ho, Wo))
        sample = sample.reshape(N, G, C // G, Ho, Wo)
        if mask is not None:
            sample = sample * mask.reshape(N, G, K, Ho, Wo)[:, :, k, None]
        columns.append(sample.reshape(N, C, Ho, Wo))
    cols = torch.stack(columns, 2).reshape(N, groups, Cg * K, Ho * Wo)    # channel-major, then k
    w = weight.reshape(groups, Co // groups, Cg * K)
    out = torch.einsum("gok,ngkl->ngol", w, cols).reshape(N, Co, Ho, Wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def size_offsets(size, kernel, dilation, mode):
    """D²Conv2d's offsets (N, G*K*2, Ho, Wo) from its size map, differentiably (float64)."""
    kh, kw = kernel
    N = size.shape[0]
    s = size.reshape(N, -1, 1 if mode == "x" else 2, *size.shape[2:])
    s_y, s_x = (s[:, :, 0], s[:, :, 0]) if mode == "x" else (s[:, :, 0], s[:, :, 1])
    pairs = []
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        pairs += [(i - kh // 2) * dilation[0] * (s_y - 1), (j - kw // 2) * dilation[1] * (s_x - 1)]
    return torch.stack(pairs, 2).reshape(N, -1, *size.shape[2:])


def pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


CASES = [  # (N, C, H, W, Co, kernel, stride, padding, dilation, groups, offset groups, mask, bias)
    dict(N=2, C=8, H=7, W=9, Co=8, kernel=(3, 3)),
    dict(N=1, C=12, H=8, W=6, Co=6, kernel=(3, 3), groups=3, G=2),
    dict(N=2, C=4, H=9, W=10, Co=8, kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(N=1, C=6, H=6, W=7, Co=4, kernel=(1, 3), padding=(0, 2), dilation=2, G=3),
    dict(N=2, C=8, H=5, W=6, Co=8, kernel=(3, 3), mask=False, bias=False),
]


def case_id(case):
    return "-".join(f"{k}{v}".replace(" ", "") for k, v in case.items())


def make(case, mode="offset", dtype=torch.float32, integer=False):
    """(input, coords, weight, bias, mask) on DEVICE requiring grad, and the conv arguments."""
    N, C, H, W, Co = (case[k] for k in ("N", "C", "H", "W", "Co"))
    kh, kw = case["kernel"]
    stride, padding = pair(case.get("stride", 1)), pair(case.get("padding", 1))
    dilation, groups, G = pair(case.get("dilation", 1)), case.get("groups", 1), case.get("G", 1)
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = torch.randn(N, C, H, W)
    w = torch.randn(Co, C // groups, kh, kw) / math.sqrt(C // groups * kh * kw)
    b = torch.randn(Co) if case.get("bias", True) else None
    m = torch.rand(N, G * kh * kw, Ho, Wo) if case.get("mask", True) else None
    if mode == "offset":
        coords = torch.randn(N, G * kh * kw * 2, Ho, Wo) * 2       # some samples outside
        if integer:
            coords = coords.round()
    else:
        coords = torch.rand(N, G * (1 if mode == "x" else 2), Ho, Wo) * 2.5 + 0.5
    tensors = [None if t is None else t.to(DEVICE, dtype).requires_grad_()
               for t in (x, coords, w, b, m)]
    return tensors, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def call(tensors, conv, mode="offset", impl=kernels):
    x, coords, w, b, m = tensors
    if mode == "offset":
        return impl.deform_conv2d(x, coords, w, b, conv["stride"], conv["padding"],
                                  conv["dilation"], m)
    return impl.d2conv2d(x, coords, w, b, mask=m, mode=mode, **conv)


def reference(tensors, conv, mode, grad_out):
    """Float64 output and gradients of bilinear_reference (sizes through size_offsets)."""
    ref = [None if t is None else t.detach().cpu().double().requires_grad_() for t in tensors]
    x, coords, w, b, m = ref
    offset = coords if mode == "offset" else size_offsets(coords, w.shape[2:], conv["dilation"],
                                                           mode)
    out = bilinear_reference(x, offset, w, b, conv["stride"], conv["padding"], conv["dilation"],
                             m)
    present = [t for t in ref if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.detach().cpu().double()))
    return out, [None if t is None else next(grads) for t in ref]


def check(case, mode="offset", integer=False, tol=1e-5):
    torch.manual_seed(0)
    tensors, conv = make(case, mode, integer=integer)
    out = call(tensors, conv, mode)
    grad_out = torch.randn_like(out)
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    ref_out, ref_grads = reference(tensors, conv, mode, grad_out)
    assert out.shape == ref_out.shape
    assert rel_err(out, ref_out) <= tol
    for name, t, ref in zip(("input", "coords", "weight", "bias", "mask"), tensors, ref_grads):
        if t is not None:
            assert rel_err(next(grads), ref) <= tol, name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_deform_conv2d_matches_the_reference(case):
    """Forward and the gradients of input, offset, weight, bias and mask; groups, offset groups,
    stride, padding and dilation per axis, a non-square kernel, no mask, no bias."""
    check(case)


def test_deform_conv2d_at_integer_offsets():
    """Offsets that are whole pixels: samples on integers, where the gradient is the right
    derivative (the corners held fixed), as torchvision's."""
    check(CASES[0], integer=True)


@pytest.mark.parametrize("mode", ["x", "xy"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=case_id)
def test_d2conv2d_matches_the_reference(case, mode):
    """D²Conv2d equals the reference on the offsets its sizes stand for, and the size gradient
    is the chain rule through them."""
    check(case, mode)


@pytest.mark.parametrize("mode", ["offset", "x", "xy"])
def test_2d_equals_3d_at_one_frame(mode):
    """A 2D call is the 3D operator with one frame, a 1-deep kernel and no t offset: same
    output and gradients."""
    torch.manual_seed(1)
    case = CASES[1]
    tensors, conv = make(case, mode)
    x, coords, w, b, m = tensors
    out = call(tensors, conv, mode)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, coords, w, b, m], grad_out)
    conv3 = dict(stride=(1, *conv["stride"]), padding=(0, *conv["padding"]),
                 dilation=(1, *conv["dilation"]), groups=conv["groups"])
    if mode == "offset":
        pairs = coords.unflatten(1, (-1, 2))
        coords3 = torch.cat([torch.zeros_like(pairs[:, :, :1]), pairs], 2).flatten(1, 2)
        out3 = kernels.deform_conv3d(x.unsqueeze(2), coords3.unsqueeze(2), w.unsqueeze(2), b,
                                     mask=m.unsqueeze(2), **conv3)
    else:
        out3 = kernels.d2conv3d(x.unsqueeze(2), coords.unsqueeze(2), w.unsqueeze(2), b,
                                mask=m.unsqueeze(2), mode=mode, **conv3)
    grads3 = torch.autograd.grad(out3, [x, coords, w, b, m], grad_out.unsqueeze(2))
    assert rel_err(out, out3.squeeze(2)) <= 1e-6
    for name, g, g3 in zip(("input", "coords", "weight", "bias", "mask"), grads, grads3):
        assert rel_err(g, g3) <= 1e-6, name


def test_meta_tensors_give_the_output_shape():
    """Meta tensors (what torch.compile traces with) take the custom op's fake implementation."""
    x = torch.empty(2, 8, 9, 11, device="meta")
    offset = torch.empty(2, 2 * 9, 5, 6, device="meta")
    w = torch.empty(4, 8, 3, 3, device="meta")
    out = kernels.deform_conv2d(x, offset, w, stride=2, padding=1)
    assert out.shape == (2, 4, 5, 6) and out.device.type == "meta"
    size = torch.empty(2, 2, 9, 11, device="meta")
    assert kernels.d2conv2d(x, size, w, padding=1).shape == (2, 4, 9, 11)


@pytest.mark.parametrize("change, message", [
    (dict(input=torch.zeros(1, 4, 2, 6, 6)), "input must be a 4-D tensor (2D call), got (1, 4, 2"),
    (dict(offset=torch.zeros(1, 17, 6, 6)), "offset has 17 channels"),
    (dict(offset=torch.zeros(1, 18, 5, 6)),
     "offset has shape (1, 18, 5, 6), expected (1, 18, 6, 6) (batch, channels, output H, W)"),
    (dict(mask=torch.zeros(1, 8, 6, 6)), "mask has shape (1, 8, 6, 6), expected (1, 9, 6, 6)"),
    (dict(weight=torch.zeros(4, 3, 3, 3)), "weight"),
    (dict(stride=(1, 1, 1)), "stride"),
    (dict(stride=(0, 1)), "stride must be positive, got (0, 1)"),
    (dict(input=torch.zeros(1, 4, 1, 1), padding=0),
     "input spatial size (1, 1) is too small for kernel (3, 3) with padding (0, 0)"),
])
def test_bad_input_is_named_in_the_2d_calls_terms(change, message):
    args = dict(input=torch.zeros(1, 4, 6, 6), offset=torch.zeros(1, 18, 6, 6),
                weight=torch.zeros(4, 4, 3, 3), bias=None, stride=1, padding=1, dilation=1,
                mask=torch.zeros(1, 9, 6, 6))
    args.update(change)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        kernels.deform_conv2d(**args)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_output_is_in_the_inputs_memory_format(channels_last):
    """As torchvision's and PyTorch's conv2d: a contiguous input gives a contiguous output (so
    ``out.view`` works), a channels-last input a channels-last one."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 7, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, device=DEVICE)
    outs = [kernels.deform_conv2d(x, torch.randn(2, 18, 6, 7, device=DEVICE), w, padding=1),
            kernels.d2conv2d(x, torch.rand(2, 2, 6, 7, device=DEVICE) + 0.5, w, padding=1)]
    for out in outs:
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last
                                 else torch.contiguous_format)
        if not channels_last:
            out.view(2, -1)


def test_d2conv2d_bad_mode_is_named():
    x, w = torch.zeros(1, 4, 6, 6), torch.zeros(4, 4, 3, 3)
    with pytest.raises(ValueError, match="mode"):
        kernels.d2conv2d(x, torch.ones(1, 3, 6, 6), w, padding=1, mode="xyz")


@pytest.mark.skipif(DEVICE != "cuda", reason="torchvision's op is compared on the GPU machine")
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=case_id)
def test_equals_torchvision(case):
    """torchvision.ops.deform_conv2d itself, where installed (never a dependency): fp32 output
    and gradients."""
    ops = pytest.importorskip("torchvision.ops")
    torch.manual_seed(2)
    tensors, conv = make(case)
    out = call(tensors, conv)
    x, offset, w, b, m = tensors
    theirs = ops.deform_conv2d(x, offset, w, b, conv["stride"], conv["padding"], conv["dilation"],
                               m)
    grad_out = torch.randn_like(out)
    present = [t for t in tensors if t is not None]
    ours, expected = (torch.autograd.grad(o, present, grad_out) for o in (out, theirs))
    assert rel_err(out, theirs) <= 1e-5
    for g, e in zip(ours, expected):
        assert rel_err(g, e) <= 1e-5
