"""GroupNorm kernels (kernels/norm.py; interpreter on CPU, compiled on GPU) against the float64
reference: output and every gradient, contiguous and channels-last inputs in NaN-surrounded
storage, NaN-poisoned outputs; the custom op's registration; the launch geometry at the paper's
shapes; and, on a machine without a GPU, the kernels compiled for sm_90.

``python tests/test_group_norm.py`` prints each kernel compiled for sm_90 (registers, spills,
vector loads); the last test runs it."""
import math
import os
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

import kernels
from helpers import DEVICE, compiled_run, rel_err
from kernels import norm

ON_GPU = DEVICE == "cuda"

# every torch.empty / empty_like made during a test starts as NaN (conftest.py)
pytestmark = pytest.mark.usefixtures("poison_empty")


@dataclass(frozen=True)
class NormCase:
    shape: tuple
    groups: int
    channels_last: bool = False
    relu: bool = False
    weight: bool = True
    bias: bool = True
    dtype: torch.dtype = torch.float32
    param_dtype: torch.dtype = torch.float32
    input_bias: bool = False

    def __str__(self):
        names = "NCTHW" if len(self.shape) == 5 else "NCHW" if len(self.shape) == 4 else \
            "NCL" if len(self.shape) == 3 else "NC"
        parts = ["-".join(f"{n}{s}" for n, s in zip(names, self.shape)), f"G{self.groups}"]
        parts += ["cl"] * self.channels_last + ["relu"] * self.relu
        parts += ["noweight"] * (not self.weight) + ["nobias"] * (not self.bias)
        parts += ["inbias"] * self.input_bias
        parts.append(str(self.dtype).split(".")[1])
        if self.param_dtype != torch.float32:
            parts.append("params-" + str(self.param_dtype).split(".")[1])
        return "-".join(parts)

    @property
    def tol(self):
        return 1e-5 if self.dtype == torch.float32 else 2e-2


def in_nan_storage(t, channels_last=False):
    """A copy of t (contiguous, or channels-last: channels the innermost axis) whose storage is
    surrounded by NaN, so that out-of-bounds reads show up."""
    inner = t.detach().movedim(1, -1).contiguous() if channels_last else t.detach().contiguous()
    pad = 1024
    buf = torch.full((inner.numel() + 2 * pad,), float("nan"), device=t.device, dtype=t.dtype)
    view = buf[pad:pad + inner.numel()].view(inner.shape)
    view.copy_(inner)
    return view.movedim(-1, 1) if channels_last else view


def make_inputs(case, offset=0.0):
    """{"input", "weight", "bias", "input_bias"}: the tensors of a call, None where the case has
    none; each requires a gradient."""
    C = case.shape[1]
    x = torch.randn(case.shape, device=DEVICE) + offset
    x = in_nan_storage(x.to(case.dtype), case.channels_last).requires_grad_()

    def param(present, scale=1.0, shift=0.0):
        if not present:
            return None
        t = torch.randn(C, device=DEVICE) * scale + shift
        return t.to(case.param_dtype).requires_grad_()

    return {"input": x, "weight": param(case.weight, 0.5, 1.0), "bias": param(case.bias),
            "input_bias": param(case.input_bias)}


def group_norm(inputs, case):
    """kernels.group_norm on make_inputs' tensors."""
    return kernels.group_norm(inputs["input"], case.groups, inputs["weight"], inputs["bias"],
                              relu=case.relu, input_bias=inputs["input_bias"])


def reference(x, groups, weight, bias):
    """GroupNorm from elementary ops (PyTorch 2.13's CPU backward of F.group_norm fails for a
    bias without a weight, and crashes for a channels-last float64 input whose weight alone
    needs a gradient)."""
    N, C = x.shape[:2]
    xg = x.reshape(N, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    out = ((xg - mean) / (var + 1e-5).sqrt()).reshape(x.shape)
    per_channel = (-1, *[1] * (x.dim() - 2))
    if weight is not None:
        out = out * weight.view(per_channel)
    return out if bias is None else out + bias.view(per_channel)


def reference_of(inputs, case):
    """``group_norm(inputs, case)`` by ``reference`` on float64 CPU copies of the inputs:
    (output, {name: the copy, requiring a gradient; None where absent})."""
    ref_in = {k: None if t is None else t.detach().cpu().double().requires_grad_()
              for k, t in inputs.items()}
    x = ref_in["input"]
    if ref_in["input_bias"] is not None:
        x = x + ref_in["input_bias"].view(-1, *[1] * (x.dim() - 2))
    return reference(x.relu() if case.relu else x, case.groups, ref_in["weight"],
                     ref_in["bias"]), ref_in


def check_against_reference(case, offset=0.0, tols=None):
    inputs = make_inputs(case, offset)
    x = inputs["input"]
    out = group_norm(inputs, case)
    assert out.dtype == case.dtype and out.shape == x.shape
    assert out.stride() == x.stride(), "output not in the input's memory format"
    grad_out = torch.randn_like(out)
    present = {k: t for k, t in inputs.items() if t is not None}
    grads = dict(zip(present, torch.autograd.grad(out, list(present.values()), grad_out)))

    ref, ref_in = reference_of(inputs, case)
    ref_grads = torch.autograd.grad(ref, [ref_in[k] for k in present], grad_out.cpu().double())
    errors = {"output": rel_err(out, ref)}
    for (name, g), r in zip(grads.items(), ref_grads):
        assert g.dtype == present[name].dtype and g.shape == present[name].shape, name
        errors[name] = rel_err(g, r)
    assert grads["input"].stride() == x.stride(), "grad_input not in the input's memory format"
    limits = {k: case.tol for k in errors}
    limits.update(tols or {})
    bad = {k: v for k, v in errors.items() if not v <= limits[k]}
    assert not bad, f"relative errors over {limits}: {bad} (all: {errors})"
    return inputs, grads


# small so the interpreter stays fast; the interpreter's 8-channel, 16-position tiles and
# 128-element programs make each case run several chunks, channel blocks and masked tails
CASES = [
    NormCase((2, 12, 3, 5, 7), 3),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True),
    NormCase((2, 12, 3, 5, 7), 3, relu=True),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, relu=True),
    NormCase((2, 16, 3, 5, 7), 1, channels_last=True, relu=True),
    NormCase((2, 16, 3, 5, 7), 1),
    NormCase((2, 6, 3, 5, 7), 6),                       # one channel per group
    NormCase((2, 6, 3, 5, 7), 6, channels_last=True),
    NormCase((2, 20, 9, 11), 4, channels_last=True, relu=True),
    NormCase((2, 20, 9, 11), 4),
    NormCase((3, 8, 37), 2),
    NormCase((4, 24), 3),                               # no spatial dims
    NormCase((2, 32, 5), 1),                            # several channel blocks a program
    NormCase((2, 32, 5), 1, channels_last=True, relu=True),
    NormCase((2, 12, 3, 5, 7), 3, weight=False, bias=False),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, bias=False),
    NormCase((2, 12, 3, 5, 7), 3, weight=False, relu=True),
    NormCase((2, 16, 3, 5, 7), 1, channels_last=True, relu=True, dtype=torch.bfloat16),
    NormCase((2, 12, 3, 5, 7), 3, dtype=torch.bfloat16),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, dtype=torch.float16),
    NormCase((2, 20, 9, 11), 4, relu=True, dtype=torch.float16),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, dtype=torch.bfloat16,
             param_dtype=torch.bfloat16),
]
# a per-channel input bias (a conv's bias) added before the ReLU
CASES_INPUT_BIAS = [
    NormCase((2, 12, 3, 5, 7), 3, relu=True, input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, relu=True, input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, input_bias=True),
    NormCase((2, 16, 3, 5, 7), 1, relu=True, input_bias=True),
    NormCase((2, 16, 3, 5, 7), 1, channels_last=True, relu=True, input_bias=True),
    NormCase((2, 32, 5), 1, relu=True, input_bias=True),       # several channel blocks a program
    NormCase((2, 32, 5), 1, channels_last=True, input_bias=True),
    NormCase((4, 24), 3, relu=True, input_bias=True),           # no spatial dims
    NormCase((3, 8, 37), 2, relu=True, input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, relu=True, weight=False, bias=False, input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, weight=False, input_bias=True),
    NormCase((2, 20, 9, 11), 4, channels_last=True, relu=True, dtype=torch.bfloat16,
             input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, relu=True, dtype=torch.float16, input_bias=True),
    NormCase((2, 12, 3, 5, 7), 3, channels_last=True, relu=True, dtype=torch.bfloat16,
             param_dtype=torch.bfloat16, input_bias=True),
]


@pytest.mark.parametrize("case", CASES + CASES_INPUT_BIAS, ids=str)
def test_matches_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("input_bias", [False, True], ids=["", "inbias"])
def test_relu_gradient_is_zero_where_the_input_is_not_positive(input_bias):
    """With an input bias, where input + input_bias is not positive."""
    case = NormCase((2, 12, 3, 5, 7), 3, channels_last=True, relu=True, input_bias=input_bias)
    inputs, grads = check_against_reference(case)
    pre = inputs["input"].detach()
    if input_bias:
        pre = pre + inputs["input_bias"].detach().view(-1, 1, 1, 1)
    negative = pre <= 0
    assert negative.any() and (grads["input"][negative] == 0).all()
    assert (grads["input"][~negative] != 0).all()


def test_large_mean_statistics_are_stable():
    """1000 + randn in fp32: the variance from fp32 sums of x and x^2 would lose most of its
    digits; the statistics match float64 to fp32 rounding. The output and the weight's gradient
    carry the fp32 rounding of the mean (up to half an ulp of 1000, 3e-5 of one standard
    deviation), the same for every element of a group."""
    case = NormCase((2, 12, 4, 9, 11), 3, channels_last=True)
    check_against_reference(case, offset=1000.0, tols={"output": 1e-4, "weight": 1e-4})
    x = torch.randn(case.shape, device=DEVICE) * 0.5 + 1000.0
    _, mean, rstd = norm.group_norm_fwd(x, 3, None, None, 1e-5, False)
    ref = x.double().view(2, 3, -1)
    ref_rstd = 1 / (ref.var(-1, unbiased=False) + 1e-5).sqrt()
    assert rel_err(mean, ref.mean(-1)) <= 1e-7
    assert rel_err(rstd, ref_rstd) <= 1e-5


@pytest.mark.skipif(ON_GPU, reason="the interpreter's small tiles split these shapes; the GPU's "
                    "take each group whole (test_launch_geometry_at_the_paper_shapes covers those)")
@pytest.mark.parametrize("case", [CASES[4], CASES[5]], ids=str)
def test_statistics_are_split_over_chunks(case, monkeypatch):
    """The test shapes run several chunks per group, along the channels and the positions (the
    partial statistics are merged), and per channel block in the backward."""
    launches = []
    launch = norm._launch

    def recording(kernel, programs, num_warps, **args):
        launches.append((kernel, programs, args))
        launch(kernel, programs, num_warps, **args)

    monkeypatch.setattr(norm, "_launch", recording)
    check_against_reference(case)
    by_kernel = {k: (p, a) for k, p, a in launches}
    assert by_kernel[norm._gn_stats_kernel][1]["N_SC"] > 1
    assert by_kernel[norm._gn_stats_kernel][1]["N_CC"] > 1
    assert by_kernel[norm._gn_grad_sums_kernel][1]["N_SC"] > 1
    assert by_kernel[norm._gn_normalise_kernel][1]["N_CB"] > 1


@pytest.mark.parametrize("layout", ["sliced", "permuted", "grad-format"])
def test_other_strides(layout):
    """A non-dense input (a slice) and a dense one in neither layout (channels between the
    spatial dims) come out in torch.empty_like's format, the fake implementation's; grad_out
    in another format than the input is taken too."""
    base = torch.randn(2, 12, 4, 5, 14, device=DEVICE)
    if layout == "sliced":
        x = base.to(memory_format=torch.channels_last_3d)[..., ::2]
    elif layout == "permuted":
        x = base.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    else:
        x = base.to(memory_format=torch.channels_last_3d)
    x.requires_grad_()
    w, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
    out = kernels.group_norm(x, 4, w, b, relu=True)
    assert out.stride() == torch.empty_like(x).stride()
    grad_out = torch.randn_like(out).contiguous()
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert grad.stride() == torch.empty_like(x).stride()
    rx = x.detach().double().requires_grad_()
    ref = reference(rx.relu(), 4, w.double(), b.double())
    (ref_grad,) = torch.autograd.grad(ref, rx, grad_out.double())
    assert rel_err(out, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


SOME = NormCase((2, 12, 3, 5, 7), 3, channels_last=True)
SOME_INPUT_BIAS = NormCase((2, 12, 3, 5, 7), 3, relu=True, input_bias=True)


@pytest.mark.parametrize("wanted, case", [
    ("input", SOME), ("weight", SOME), ("bias", SOME), ("weight+bias", SOME),
    # grad_input computed for the input bias's gradient alone, not stored
    ("input_bias", SOME_INPUT_BIAS), ("input_bias", replace(SOME_INPUT_BIAS, channels_last=True)),
    ("weight+input_bias", SOME_INPUT_BIAS), ("input+input_bias", SOME_INPUT_BIAS),
    # an input bias without a gradient
    ("input", SOME_INPUT_BIAS), ("weight+bias", replace(SOME_INPUT_BIAS, channels_last=True)),
], ids=lambda v: v if isinstance(v, str) else str(v))
def test_some_gradients(wanted, case):
    inputs = make_inputs(case)
    names = wanted.split("+")
    for name, t in inputs.items():
        if t is not None:
            t.requires_grad_(name in names)
    out = group_norm(inputs, case)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[name] for name in names], grad_out)
    ref, ref_in = reference_of(inputs, case)
    ref_grads = torch.autograd.grad(ref, [ref_in[name] for name in names],
                                    grad_out.cpu().double())
    for name, g, r in zip(names, grads, ref_grads):
        assert rel_err(g, r) <= 1e-5, name


@pytest.mark.parametrize("input_bias", [False, True], ids=["", "inbias"])
def test_deterministic(input_bias):
    """No atomics: two runs give the same bits."""
    case = NormCase((2, 16, 3, 5, 7), 1, channels_last=True, relu=True, input_bias=input_bias)
    inputs = make_inputs(case)
    present = [t for t in inputs.values() if t is not None]
    grad_out = torch.randn(case.shape, device=DEVICE)
    runs = []
    for _ in range(2):
        out = group_norm(inputs, case)
        runs.append((out, *torch.autograd.grad(out, present, grad_out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autocast_keeps_the_input_dtype(dtype):
    """Statistics are fp32 anyway: under autocast a bf16 input is not copied to fp32, nor an fp32
    one to bf16."""
    device_type = "cuda" if ON_GPU else "cpu"
    x = torch.randn(2, 12, 3, 4, 5, device=DEVICE, dtype=dtype)
    w, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = kernels.group_norm(x, 3, w, b)
    assert out.dtype == dtype
    ref = reference(x.double(), 3, w.double(), b.double())
    assert rel_err(out, ref) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_bad_arguments_raise_value_error_naming_them():
    x = torch.randn(2, 12, 3, 4, device=DEVICE)
    for call, word in ((lambda: kernels.group_norm(x, 5), "num_groups"),
                       (lambda: kernels.group_norm(x, 3, torch.randn(11, device=DEVICE)),
                        "weight"),
                       (lambda: kernels.group_norm(x, 3, None, torch.randn(3, device=DEVICE)),
                        "bias"),
                       (lambda: kernels.group_norm(x[0, 0, 0], 1), "input"),
                       (lambda: kernels.group_norm(x, 3, eps=0.0), "eps")):
        with pytest.raises(ValueError, match=word):
            call()


@pytest.mark.parametrize("input_bias", ["shape", "list", "device", "integer"])
def test_bad_input_bias_raises_value_error_naming_it(input_bias):
    x = torch.randn(2, 12, 3, 4, device=DEVICE)
    input_bias = {"shape": torch.randn(11, device=DEVICE), "list": [0.0] * 12,
                  "device": torch.randn(12, device="meta"),
                  "integer": torch.zeros(12, device=DEVICE, dtype=torch.int64)}[input_bias]
    with pytest.raises(ValueError, match="input_bias"):
        kernels.group_norm(x, 3, relu=True, input_bias=input_bias)


def test_opcheck():
    x = torch.randn(2, 8, 3, 5, device=DEVICE).to(memory_format=torch.channels_last)
    w, b, ib = (torch.randn(8, device=DEVICE) for _ in range(3))
    for input_bias in (None, ib):
        torch.library.opcheck(torch.ops.d2conv.group_norm.default,
                              (x, 2, w, b, 1e-5, True, input_bias))
        torch.library.opcheck(torch.ops.d2conv.group_norm.default,
                              (x.contiguous(), 4, None, None, 1e-5, False, input_bias))
    # the autograd registration, the input bias's gradient in its slot
    needing = [t.detach().requires_grad_() for t in (x, b, ib)]
    torch.library.opcheck(torch.ops.d2conv.group_norm.default,
                          (needing[0], 2, w, needing[1], 1e-5, True, needing[2]))
    for input_bias, needs in ((None, (True, True, True, False)),
                              (None, (False, True, False, False)),
                              (ib, (True, True, True, True)), (ib, (False, False, False, True)),
                              (ib, (True, False, True, False))):
        out, mean, rstd = torch.ops.d2conv.group_norm(x, 2, w, b, 1e-5, True, input_bias)
        grad_out = torch.randn_like(out)
        for weight in (w, None):
            torch.library.opcheck(torch.ops.d2conv.group_norm_backward.default,
                                  (grad_out, x, mean, rstd, weight, input_bias, 2, True, *needs))


@pytest.mark.parametrize("shape, fmt", [((2, 8, 3, 4, 5), torch.channels_last_3d),
                                        ((2, 8, 4, 5), torch.channels_last),
                                        ((2, 8, 4, 5), torch.contiguous_format)])
def test_meta_tensors(shape, fmt):
    x = torch.empty(shape, device="meta", dtype=torch.bfloat16).to(memory_format=fmt)
    w = torch.empty(8, device="meta")
    out = kernels.group_norm(x, 2, w, w, relu=True, input_bias=w)
    assert out.device.type == "meta" and out.dtype == torch.bfloat16
    assert out.shape == x.shape and out.stride() == x.stride()


@pytest.mark.parametrize("input_bias", [False, True], ids=["", "inbias"])
def test_torch_compile_traces_without_graph_breaks(input_bias):
    """The custom ops under torch.compile give what the eager autograd.Function does, every
    gradient included."""
    class Unit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))
            self.bias = torch.nn.Parameter(torch.randn(8))
            self.input_bias = torch.nn.Parameter(torch.randn(8)) if input_bias else None

        def forward(self, x):
            return kernels.group_norm(x * 2, 2, self.weight, self.bias, relu=True,
                                      input_bias=self.input_bias)

    unit = Unit().to(DEVICE)
    x = torch.randn(2, 8, 3, 4, 5, device=DEVICE, requires_grad=True)
    wrt = [x, *unit.parameters()]
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(unit, backend=backend, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), wrt)
    ref = unit(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), wrt)
    assert rel_err(out, ref) <= 1e-5
    assert all(rel_err(g, r) <= 1e-5 for g, r in zip(grads, ref_grads))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "cl"])
def test_refine_unit_adds_its_conv_bias_in_the_norm(channels_last):
    """d2conv.model.Unit on a plain nn.Conv3d convolves without the bias (the conv's forward
    does not run) and the norm's kernels add it: the output and the gradients of the input, the
    conv's weight and bias and the norm's weight and bias are those of conv -> ReLU -> GroupNorm
    in float64; the state dict's keys are the three modules' in a row."""
    from d2conv.model import Unit

    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    unit = Unit(4, 12).to(DEVICE, memory_format=fmt)
    torch.nn.init.normal_(unit[0].bias, std=0.5)
    torch.nn.init.uniform_(unit[2].weight, 0.5, 1.5)
    torch.nn.init.normal_(unit[2].bias)
    assert set(unit.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    calls = []
    unit[0].register_forward_hook(lambda *args: calls.append(args))
    x = torch.randn(2, 4, 3, 5, 6, device=DEVICE).to(memory_format=fmt).requires_grad_()
    out = unit(x)
    assert not calls and out.is_contiguous(memory_format=fmt)
    wrt = [x, *unit.parameters()]
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, wrt, grad_out)

    ref_in = [t.detach().cpu().double().requires_grad_() for t in wrt]
    rx, conv_w, conv_b, norm_w, norm_b = ref_in
    ref = reference(torch.conv3d(rx, conv_w, conv_b, padding=1).relu(), 1, norm_w, norm_b)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.cpu().double())
    assert rel_err(out, ref) <= 1e-5
    for name, g, r in zip(["input", "0.weight", "0.bias", "2.weight", "2.bias"], grads,
                          ref_grads):
        assert rel_err(g, r) <= 1e-5, name


# the paper's refine-unit shapes (GroupNorm(1, 256)) and a from-scratch backbone's
PAPER_SHAPES = [((2, 256, 8, 120, 216), 1), ((2, 256, 4, 60, 108), 1), ((2, 256, 2, 30, 54), 1),
                ((8, 32, 8, 32, 48), 8)]


def captured_launches(shape, groups, dtype, channels_last, device="meta", input_bias=False):
    """(kernel, programs, num_warps, args) of a forward and a backward on ``device`` tensors (of
    every gradient, the input bias's too with ``input_bias``), with the GPU's tiles (the
    interpreter's replaced), launching nothing."""
    launches = []
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.empty(shape, device=device, dtype=dtype).to(memory_format=fmt)
    w = torch.empty(shape[1], device=device)
    ib = w if input_bias else None
    real = norm._launch, norm.settings.interpreting
    norm._launch = lambda kernel, programs, num_warps, **args: launches.append(
        (kernel, programs, num_warps, args))
    norm.settings.interpreting = lambda: False
    try:
        out, mean, rstd = norm.group_norm_fwd(x, groups, w, w, 1e-5, True, ib)
        norm.group_norm_bwd(out, x, mean, rstd, w, groups, True, ib, need_input=True,
                            need_weight=True, need_bias=True, need_input_bias=input_bias)
    finally:
        norm._launch, norm.settings.interpreting = real
    return launches


@pytest.mark.parametrize("input_bias", [False, True], ids=["", "inbias"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "contiguous"])
@pytest.mark.parametrize("shape, groups", PAPER_SHAPES, ids=lambda v: "x".join(map(str, v))
                         if isinstance(v, tuple) else f"G{v}")
def test_launch_geometry_at_the_paper_shapes(shape, groups, channels_last, input_bias):
    """On a 132-SM GPU, in bf16: the big passes run at least 4 programs an SM where the tensor
    has that many 8 KiB tiles, each streaming at most 64 KiB of each tensor it reads; on the
    large shapes the backward's partial sums add 2% to the bytes of its first pass at most, and
    the input bias's (written by the last pass, summed by the channels kernel) 1% to the last
    pass's."""
    launches = captured_launches(shape, groups, torch.bfloat16, channels_last,
                                 input_bias=input_bias)
    numel = math.prod(shape)
    assert [k for k, *_ in launches] == [
        norm._gn_stats_kernel, norm._gn_combine_kernel, norm._gn_normalise_kernel,
        norm._gn_grad_sums_kernel, norm._gn_grad_channels_kernel, norm._gn_grad_groups_kernel,
        norm._gn_grad_input_kernel] + [norm._gn_grad_channels_kernel] * input_bias
    for kernel, programs, num_warps, args in launches:
        if kernel in (norm._gn_combine_kernel, norm._gn_grad_channels_kernel,
                      norm._gn_grad_groups_kernel):
            continue
        per_program = numel / programs
        assert per_program <= 32768 + 4096, (kernel, programs)
        assert programs >= min(4 * 132, numel // 4096), (kernel, programs)
        tile = args["BLOCK_C"] * args["BLOCK_S"]
        assert num_warps * 32 * 8 <= tile, (kernel, num_warps, tile)  # 16-byte vectors
    programs = {k: (p, a) for k, p, _, a in launches}
    split = programs[norm._gn_grad_sums_kernel][1]["N_SC"]
    if numel >= 2**24:
        assert 2 * shape[0] * split * shape[1] * 4 <= 0.02 * 2 * numel * 2
    if numel >= 2**24 and input_bias:
        split = programs[norm._gn_grad_input_kernel][1]["N_SC"]
        assert launches[-1][3]["N_SC"] == split
        assert shape[0] * split * shape[1] * 4 <= 0.01 * 3 * numel * 2


# ---------------------------------------------------------------------------------------------
# compiled for sm_90 without a GPU

TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_sm90(kernel, num_warps, args):
    """``kernel`` compiled for sm_90, its arguments specialised as a launch specialises them
    (integers equal to 1 as constants, pointers and integers divisible by 16 marked so)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = args[p.name]
        if p.is_constexpr or (type(v) is int and v == 1):
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32" if abs(int(v)) < 2**31 else "i64"
            if int(v) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps))


def resources(compiled):
    """(registers, stack + local bytes a thread) from cuobjdump -res-usage on the cubin."""
    import tempfile

    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([str(tool), "-res-usage", path], capture_output=True,
                             text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", out)
    return int(found.group(1)), int(found.group(2)) + int(found.group(3))


def print_sm90_resources():
    """One line per kernel, layout and with or without an input bias: registers, spilled bytes
    and 16-byte global loads and stores in the PTX, at the refine unit's shape in bf16."""
    import re
    for input_bias in (False, True):
        for channels_last in (True, False):
            for kernel, _, num_warps, args in captured_launches(
                    (2, 256, 8, 120, 216), 1, torch.bfloat16, channels_last,
                    input_bias=input_bias):
                compiled = compile_sm90(kernel, num_warps, args)
                regs, spilled = resources(compiled)
                ptx = compiled.asm["ptx"]
                loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx))
                stores = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx))
                layout = ("cl" if channels_last else "contiguous") + "+inbias" * input_bias
                print(f"{kernel.__name__} {layout} w{num_warps}: {regs} regs, {spilled} B "
                      f"spilled, {loads} v4 loads, {stores} v4 stores", flush=True)


def _cuda_tools():
    import triton
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.skipif(ON_GPU, reason="the GPU suite compiles them for real")
@pytest.mark.skipif(not _cuda_tools(), reason="Triton without its CUDA tools")
def test_kernels_compile_for_sm90():
    """Each kernel in both layouts at the refine unit's shape, bf16, without and with an input
    bias (whose backward sums its partial sums by the channels kernel once more): no spilled
    register, and the big passes load (and the elementwise ones store) 16 bytes per
    instruction."""
    lines = compiled_run(__file__)
    assert len(lines) == 2 * 7 + 2 * 8, lines
    for line in lines:
        print(line)
        name = line.split()[0]
        regs, spilled, loads, stores = (int(v) for v in re.findall(r"(\d+) (?:regs|B|v4)", line))
        assert 0 < regs <= 255 and spilled == 0, line
        if name in ("_gn_stats_kernel", "_gn_normalise_kernel", "_gn_grad_sums_kernel",
                    "_gn_grad_input_kernel"):
            assert loads > 0, line
        if name in ("_gn_normalise_kernel", "_gn_grad_input_kernel"):
            assert stores > 0, line


if __name__ == "__main__":
    print_sm90_resources()
