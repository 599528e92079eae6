"""The depthwise 3D convolution's kernels (kernels/depthwise.py; the Triton interpreter on CPU,
compiled on a GPU) against F.conv3d with groups = C in float64: the output and every gradient,
with fresh random inputs, NaN-poisoned outputs and NaN-surrounded inputs so that unwritten
elements and out-of-bounds reads show up; the custom op's registration, meta tensors and
torch.compile; and, without a GPU, the kernels compiled for sm_90."""
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import DEVICE, compiled_run, nan_padded, rel_err
from kernels import settings

ON_GPU = DEVICE == "cuda"
NAMES = ("input", "weight", "bias")
FORMATS = {"cl": True, "ncdhw": False}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not settings.interpreting(),
                                   reason="needs a GPU or the Triton interpreter")


# every torch.empty / empty_like made during a test starts as NaN (conftest.py)
pytestmark = pytest.mark.usefixtures("poison_empty")


@dataclass(frozen=True)
class Case:
    N: int = 1
    C: int = 6
    T: int = 2
    H: int = 4
    W: int = 9
    kernel: tuple = (3, 3, 3)
    stride: object = 1
    padding: object = 1
    dilation: object = 1
    bias: bool = True

    def __str__(self):
        k = "".join(map(str, self.kernel))
        parts = [f"N{self.N}-C{self.C}-T{self.T}-H{self.H}-W{self.W}-k{k}"]
        for name, default in (("stride", 1), ("padding", 1), ("dilation", 1)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name[0]}{value}".replace(" ", ""))
        if not self.bias:
            parts.append("nobias")
        return "-".join(parts)

    @property
    def conv(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation)


def make_inputs(case, dtype=torch.float32, channels_last=False):
    """(input, weight, bias) with fresh random values, requiring grad; the input in
    NaN-surrounded storage in the memory format asked for (read in place by the kernels)."""
    x = torch.randn(case.N, case.C, case.T, case.H, case.W, device=DEVICE).to(dtype)
    w = torch.randn(case.C, 1, *case.kernel, device=DEVICE) / math.prod(case.kernel) ** 0.5
    b = torch.randn(case.C, device=DEVICE) if case.bias else None
    x = nan_padded(x, channels_last=channels_last).requires_grad_()
    return [x, w.to(dtype).requires_grad_(),
            None if b is None else b.to(dtype).requires_grad_()]


def reference(case, inputs, grad_out, wanted=NAMES):
    """F.conv3d with groups = C in float64 on the CPU: the output and the ``wanted`` gradients
    (None for the others)."""
    ref = [None if t is None else t.detach().cpu().double().requires_grad_() for t in inputs]
    out = F.conv3d(ref[0], ref[1], ref[2], groups=case.C, **case.conv)
    leaves = [t for name, t in zip(NAMES, ref) if name in wanted and t is not None]
    grads = iter(torch.autograd.grad(out, leaves, grad_out.detach().cpu().double()))
    return out, [next(grads) if name in wanted and t is not None else None
                 for name, t in zip(NAMES, ref)]


def check(case, dtype=torch.float32, channels_last=False, wanted=NAMES, grad_out_format=None):
    """Output and the ``wanted`` gradients (only those asked of autograd) against the reference,
    and the memory formats: output and input gradient in the input's; grad_out in
    ``grad_out_format`` (default: the input's, NaN-surrounded)."""
    inputs = make_inputs(case, dtype, channels_last)
    for name, t in zip(NAMES, inputs):
        if t is not None:
            t.requires_grad_(name in wanted)
    out = kernels.depthwise_conv3d(*inputs, **case.conv)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
    grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
    if grad_out_format is None:
        grad_out = nan_padded(grad_out, channels_last=channels_last)
    else:
        grad_out = grad_out.contiguous(memory_format=grad_out_format)
    leaves = [t for name, t in zip(NAMES, inputs) if name in wanted and t is not None]
    grads = iter(torch.autograd.grad(out, leaves, grad_out))
    grads = [next(grads) if name in wanted and t is not None else None
             for name, t in zip(NAMES, inputs)]
    ref_out, ref_grads = reference(case, inputs, grad_out, wanted)
    tol = TOLERANCE[dtype]
    errors = {"output": rel_err(out, ref_out)}
    for name, g, r in zip(NAMES, grads, ref_grads):
        if r is not None:
            errors[name] = rel_err(g, r)
            assert g.dtype == dtype, name
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errors})"
    if grads[0] is not None:
        assert grads[0].is_contiguous(memory_format=memory_format)
    if grads[1] is not None:
        assert grads[1].shape == inputs[1].shape and grads[1].is_contiguous()
    return errors


# one case per feature, each in the layouts given; small, so that the interpreter stays fast.
# Under it the channel blocks are 16 (channels-last) and 8 wide, W tiles 4 and runs of output
# rows 2: 20 channels make several channel blocks with a tail, W = 9 (3x3x3, stride 1) tiles
# with masked borders and an unmasked interior, C = 16 and 8 whole channel blocks
CASES = [
    (Case(N=2, C=20, T=2, H=3), "cl"),
    (Case(C=20, T=2, H=3), "ncdhw"),
    (Case(T=3, H=5, W=11, stride=2), "cl ncdhw"),
    (Case(H=5, W=9, stride=(1, 2, 2)), "cl"),
    (Case(T=3, padding=0), "ncdhw"),
    (Case(T=3, padding=(0, 2, 1)), "cl"),
    (Case(T=3, H=5, padding=2, dilation=2), "ncdhw"),
    (Case(T=4, H=5, W=9, stride=2, padding=(0, 1, 2), dilation=(1, 2, 1)), "cl"),
    (Case(kernel=(1, 3, 3), padding=(0, 1, 1)), "cl"),
    (Case(T=3, H=3, kernel=(3, 1, 1), padding=(1, 0, 0)), "ncdhw"),
    (Case(C=4, T=1, H=5, W=6, kernel=(1, 7, 7), padding=(0, 3, 3)), "cl"),
    (Case(C=3, T=2, H=3, W=4, kernel=(7, 7, 7), padding=3), "ncdhw"),
    (Case(kernel=(2, 3, 4), padding=(1, 1, 2)), "cl"),
    (Case(C=16, T=3, H=5, W=7, bias=False), "cl"),
    (Case(C=8, T=3, H=5, W=7, bias=False), "ncdhw"),
]
PARAMS = [pytest.param(case, FORMATS[layout], id=f"{case}-{layout}")
          for case, layouts in CASES for layout in layouts.split()]


@needs_kernels
@pytest.mark.parametrize("case, channels_last", PARAMS)
def test_matches_reference(case, channels_last):
    check(case, channels_last=channels_last)


@needs_kernels
@pytest.mark.parametrize("dtype, channels_last", [(torch.bfloat16, True), (torch.float16, False),
                                                  (torch.bfloat16, False)],
                         ids=["bf16-cl", "fp16-ncdhw", "bf16-ncdhw"])
def test_half_precision(dtype, channels_last):
    """16-bit inputs, fp32 accumulation: output and gradients in the input's dtype."""
    check(Case(C=16 if channels_last else 8), dtype, channels_last)


@needs_kernels
@pytest.mark.parametrize("wanted", [("input",), ("weight",), ("bias",), ("weight", "bias")],
                         ids="+".join)
def test_some_gradients(wanted, monkeypatch):
    """Only the gradients autograd asks for are made: the input gradient's kernel runs for it
    alone, the weight gradient's for the weight and bias ones, with what it must sum."""
    from kernels import depthwise
    launches, launch = [], depthwise._launch

    def recorded(kind, channels_last, grid, args):
        launches.append((kind, args.get("FLIP", args.get("NEED_WEIGHT")), args.get("NEED_BIAS")))
        return launch(kind, channels_last, grid, args)

    monkeypatch.setattr(depthwise, "_launch", recorded)
    check(Case(T=3), channels_last=True, wanted=wanted)
    expected = [("corr", False, None)]                      # the forward
    if "input" in wanted:
        expected.append(("corr", True, None))
    if "weight" in wanted or "bias" in wanted:
        expected.append(("wgrad", "weight" in wanted, "bias" in wanted))
    assert launches == expected


@needs_kernels
def test_other_memory_formats():
    """An input neither contiguous nor channels-last is read as a contiguous copy (output in the
    contiguous format); a grad_out in another format than the input's is brought to it."""
    case = Case(H=5)
    x, w, b = make_inputs(case)
    odd = x.detach().transpose(3, 4).contiguous().transpose(3, 4).requires_grad_()
    out = kernels.depthwise_conv3d(odd, w, b, **case.conv)
    assert out.is_contiguous()
    grad_out = torch.randn_like(out).contiguous(memory_format=torch.channels_last_3d)
    grads = torch.autograd.grad(out, [odd, w, b], grad_out)
    ref_out, ref_grads = reference(case, [odd, w, b], grad_out)
    assert rel_err(out, ref_out) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5
    check(case, channels_last=True, grad_out_format=torch.contiguous_format)


@needs_kernels
def test_weight_gradient_is_deterministic():
    """The weight and bias gradients sum their partials in a fixed order: equal bit for bit."""
    case = Case(C=16, H=3)
    x, w, b = make_inputs(case, channels_last=True)
    x.requires_grad_(False)
    out = kernels.depthwise_conv3d(x, w, b, **case.conv)
    grad_out = torch.randn_like(out)
    first = torch.autograd.grad(out, [w, b], grad_out, retain_graph=True)
    second = torch.autograd.grad(out, [w, b], grad_out)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.skipif(ON_GPU or not settings.interpreting(),
                    reason="the interpreter stands in for the GPU's autotuned launches")
def test_autotuned_launches(monkeypatch, tmp_path):
    """The autotuned path, a GPU's default, under the interpreter with a stand-in timer: every
    candidate fitted to the shape runs, the one timed fastest (the last) is launched, and the
    results agree with the reference."""
    from kernels import depthwise, tuning

    class Tuning:
        interpreting = staticmethod(lambda: False)
        autotune = staticmethod(lambda: True)

    monkeypatch.setattr(depthwise, "settings", Tuning)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    timed = []

    def stand_in(call):
        call()
        timed.append(call)
        return 1000.0 - len(timed)

    monkeypatch.setattr(tuning, "bench", stand_in)
    tuning.forget()
    try:
        with settings.override(tune_cache=str(tmp_path)):
            for channels_last in (True, False):
                check(Case(C=8, H=3, W=5), channels_last=channels_last)
        picks = {kernel for kernel, key in tuning._memory}
        # per layout: the forward's and the input gradient's picks (keys apart by FLIP), the
        # weight gradient's; each from several candidates
        assert picks == {"DEPTHWISE_CORR", "DEPTHWISE_WGRAD"}
        assert sum(kernel == "DEPTHWISE_CORR" for kernel, key in tuning._memory) == 4
        assert sum(kernel == "DEPTHWISE_WGRAD" for kernel, key in tuning._memory) == 2
        assert len(timed) > 12
    finally:
        tuning.forget()


@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "ncdhw"])
def test_meta_tensors(channels_last):
    """Meta tensors take the custom op's fake implementation: the output's shape and format."""
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.empty(2, 8, 5, 9, 10, device="meta").contiguous(memory_format=memory_format)
    w = torch.empty(8, 1, 3, 3, 3, device="meta")
    out = kernels.depthwise_conv3d(x, w, None, stride=(1, 2, 2), padding=1)
    assert out.device.type == "meta" and out.shape == (2, 8, 5, 5, 5)
    assert out.is_contiguous(memory_format=memory_format)


@needs_kernels
def test_opcheck():
    case = Case(C=4, T=2, H=3, W=5, kernel=(2, 3, 3), padding=(0, 1, 1))
    x, w, b = make_inputs(case)
    conf = ([1, 1, 1], [0, 1, 1], [1, 1, 1])
    torch.library.opcheck(torch.ops.d2conv.depthwise_conv3d.default, (x, w, b, *conf))
    grad_out = torch.randn(1, 4, 1, 3, 5, device=DEVICE)
    inputs = [t.detach() for t in (x, w)]         # the backward op has no backward
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.d2conv.depthwise_conv3d_backward.default,
                              (grad_out, *inputs, *conf, *needs))


@needs_kernels
def test_torch_compile_traces_without_graph_breaks():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 1, 3, 3, 3) * 0.2)
            self.bias = torch.nn.Parameter(torch.randn(4))

        def forward(self, x):
            return kernels.depthwise_conv3d(x, self.weight, self.bias, padding=1).relu()

    block = Block().to(DEVICE)
    x = torch.randn(1, 4, 2, 3, 5, device=DEVICE, requires_grad=True)
    backend = "inductor" if ON_GPU else "aot_eager"
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), [x, block.weight, block.bias])
    ref = block(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x, block.weight, block.bias])
    assert rel_err(out, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-6


@pytest.mark.parametrize("change, word", [
    (dict(input=torch.randn(4, 3, 5, 5)), "input"),
    (dict(weight=torch.randn(4, 2, 3, 3, 3)), "weight"),
    (dict(weight=torch.randn(4, 1, 3, 8, 3)), "weight"),
    (dict(weight=torch.randn(4, 1, 3, 3, 3, dtype=torch.float64)), "weight"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(stride=0), "stride"),
    (dict(padding=-1), "padding"),
    (dict(dilation=(1, 0, 1)), "dilation"),
    (dict(padding=(1, 1)), "padding"),
    (dict(input=torch.randn(1, 4, 1, 1, 1), padding=0), "too small"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_raise_value_error_naming_them(change, word):
    args = dict(input=torch.randn(1, 4, 3, 5, 5), weight=torch.randn(4, 1, 3, 3, 3), bias=None,
                stride=1, padding=1, dilation=1)
    args.update(change)
    with pytest.raises(ValueError, match=word):
        kernels.depthwise_conv3d(**args)


# ------------------------------------------------------------------ compiled for sm_90
TOOLS = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin"


def compile_report(shape=(1, 64, 4, 6, 20), dtype=torch.bfloat16):
    """One line per kernel launch of a forward and backward (stride 1 and 2, both layouts,
    each kernel's first candidate), compiled for sm_90 with the installed Triton:
    "<layout> <kernel> <registers> regs <bytes> B spilled <n> 16-bit loads <n> 32-bit loads"
    (global loads in the PTX). Run with TRITON_INTERPRET=0 (a process of its own)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import depthwise
    from kernels.checks import check_depthwise

    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
    launches = []

    def capture(kind, channels_last, grid, args):
        launches.append((kind, channels_last, args))

    reduce_fn = depthwise.depthwise_wgrad_reduce_kernel

    class Reduce:       # records the reduce kernel's launch
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                names = [p.name for p in reduce_fn.params]
                launches.append(("reduce", None, dict(zip(names, args), **kwargs)))
            return run

    real = depthwise._launch, reduce_fn
    depthwise._launch, depthwise.depthwise_wgrad_reduce_kernel = capture, Reduce()
    try:
        for stride in (1, 2):
            for channels_last in (True, False):
                x = torch.zeros(shape, dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                w = torch.zeros(shape[1], 1, 3, 3, 3, dtype=dtype)
                geo = check_depthwise(x, w, None, stride, 1, 1)
                depthwise.depthwise_fwd(geo, x, w, w.new_zeros(shape[1]))
                g = torch.zeros(shape[0], shape[1], *geo.out, dtype=dtype)
                depthwise.depthwise_bwd(geo, g, x, w, need_input=True, need_weight=True,
                                        need_bias=True)
    finally:
        depthwise._launch, depthwise.depthwise_wgrad_reduce_kernel = real

    for kind, channels_last, args in launches:
        if kind == "reduce":
            fn, values = reduce_fn, dict(args)
            options = dict(num_warps=values.pop("num_warps"), num_stages=values.pop("num_stages"))
        else:
            config = depthwise._fit(depthwise.CANDIDATES[kind][channels_last][0], args)
            fn, values = depthwise.KERNELS[kind], {**args, **config.kwargs}
            options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        while not isinstance(fn, triton.runtime.JITFunction):       # through the heuristics
            for name, rule in getattr(fn, "values", {}).items():
                values[name] = rule(values)
            fn = fn.fn
        # specialised as a launch would: integers equal to 1 become constants, pointers and
        # integers divisible by 16 are marked so
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = values[p.name]
            if p.is_constexpr or isinstance(v, bool) or (type(v) is int and v == 1):
                signature[p.name] = "constexpr"
                constexprs[p.name] = v
            elif isinstance(v, torch.Tensor):
                signature[p.name] = types[v.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[p.name] = "i32" if abs(v) < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
        cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"depthwise-{os.getpid()}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", str(cubin)],
                               capture_output=True, text=True).stdout
        cubin.unlink()
        found = re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", usage)
        ptx = compiled.asm["ptx"]
        loads16 = len(re.findall(r"ld\.global(?:\.\w+)*\.b16 ", ptx))
        loads32 = len(re.findall(r"ld\.global(?:\.\w+)*\.b32 ", ptx))
        layout = {True: "cl", False: "ncdhw", None: "-"}[channels_last]
        name = kind + ("-flip" if args.get("FLIP") else "")
        print(f"{layout} {name} {int(found.group(1))} regs "
              f"{int(found.group(2)) + int(found.group(3))} B spilled {loads16} 16-bit loads "
              f"{loads32} 32-bit loads")


@pytest.mark.skipif(ON_GPU, reason="the GPU suite compiles them for real")
@pytest.mark.skipif(not (TOOLS / "cuobjdump").exists(), reason="Triton without its CUDA tools")
def test_kernels_compile_for_sm90_without_spills():
    """bf16 at 64 channels, each kernel's default config: no register spills, at most 255
    registers; channels-last tiles move channel pairs (32-bit loads), the only 16-bit loads
    being the forward's 27 weights of 2 channels, once a program."""
    lines = compiled_run("-c", "import test_depthwise as t; t.compile_report()")
    # per stride and layout: forward, input gradient (flipped), weight gradient, reduction
    assert len(lines) == 2 * 2 * 4, lines
    for line in lines:
        registers, spilled, loads16, loads32 = (
            int(v) for v in re.findall(r"(\d+) (?:regs|B|16|32)", line))
        assert 0 < registers <= 255 and spilled == 0, line
        if line.startswith("cl "):
            assert loads32 > 0 and loads16 <= (27 * 2 if " corr" in line else 0), line
