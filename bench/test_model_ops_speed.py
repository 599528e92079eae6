"""GroupNorm, the depthwise 3D convolution and the upsampled skip sum at the paper model's shapes
against PyTorch's kernels: `pytest bench/test_model_ops_speed.py` on a GPU.

- GroupNorm: the refine units' GroupNorm(1, 256) of ReLU(conv output) at rf1, rf2 and rf3, at
  rf1 also with the conv's bias added inside (``rf1_bias``: the units' input_bias), and a
  from-scratch backbone's GroupNorm(8, 96) (ir-CSN-small at 128x224, batch 8), without the ReLU.
  ``triton``: ``kernels.group_norm``; ``pytorch``: the bias add, F.relu, then F.group_norm in
  the same dtype.
- Depthwise: every depthwise 3x3x3 convolution shape of ir-CSN-152 on a batch of two 8x480x864
  clips (padding 1; stride 1, or 2 in the first block of stages 2-4), with how many blocks have
  it. ``triton``: ``kernels.depthwise_conv3d``; ``pytorch``: F.conv3d with groups = C (PyTorch's
  conv_depthwise3d on contiguous tensors, cuDNN on channels_last_3d ones).
- Upsampled skip sum: the refine blocks' s + trilinear upsampling of the coarser map (rf1, rf2,
  rf3) under bf16 autocast. ``triton``: ``kernels.upsample_add``; ``pytorch``: the composite
  (F.interpolate in fp32, then the sum).

GroupNorm and depthwise also as ``triton+graph``: the Triton pass captured in a CUDA graph and
replayed, the GPU's time without the host's (which bounds the eager calls at the smaller shapes),
as the model's replayed training step and inference run them.

bf16, both memory formats, forward ("fwd") and forward+backward ("fwdbwd"). Each case records
the CUDA-event median of triton.testing.do_bench and the bytes the pass must move over it, as
GB/s and as a fraction of the card's DRAM bandwidth (``BANDWIDTH``), in <gpu>-model-ops.json
among the bench's records. Bytes counted: GroupNorm forward reads its input twice (statistics,
then normalisation: a group is larger than L2) and writes once, its backward reads input and
gradient twice and writes once; the depthwise forward reads input and writes output once, its
backward reads the output gradient and the input and writes the input gradient once; the skip
sum reads input and source and writes its fp32 output, its backward reads the output's gradient
and writes both gradients. Before
timing, each op is checked against the float64 reference at the case's channel count.
"""
import math
import time

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.checks import output_size
from records import commit, gpu_name, merge
from test_kernel_speed import captured, time_case, timed

# name: (shape, groups, relu, with an input bias)
NORM_SHAPES = {
    "rf1": ((2, 256, 8, 120, 216), 1, True, False),
    "rf1_bias": ((2, 256, 8, 120, 216), 1, True, True),
    "rf2": ((2, 256, 4, 60, 108), 1, True, False),
    "rf3": ((2, 256, 2, 30, 54), 1, True, False),
    "small_g8": ((8, 96, 8, 32, 56), 8, False, False),
}
# name: (input shape, stride, blocks of ir-CSN-152 with it)
DEPTHWISE_SHAPES = {
    "s1_c64": ((2, 64, 8, 120, 216), 1, 3),
    "s2_c128": ((2, 128, 8, 120, 216), 2, 1),
    "s1_c128": ((2, 128, 4, 60, 108), 1, 7),
    "s2_c256": ((2, 256, 4, 60, 108), 2, 1),
    "s1_c256": ((2, 256, 2, 30, 54), 1, 35),
    "s2_c512": ((2, 512, 2, 30, 54), 2, 1),
    "s1_c512": ((2, 512, 1, 15, 27), 1, 2),
}
# name: (input shape, source shape, the source's dtype in the model under bf16 autocast)
UPSAMPLE_SHAPES = {
    "rf1": ((2, 256, 8, 120, 216), (2, 256, 4, 60, 108), torch.float32),
    "rf2": ((2, 256, 4, 60, 108), (2, 256, 2, 30, 54), torch.float32),
    "rf3": ((2, 256, 2, 30, 54), (2, 256, 1, 15, 27), torch.bfloat16),
}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
# DRAM bandwidth by card (the vendors' figures), bytes/s
BANDWIDTH = {"NVIDIA_H200": 4.8e12, "NVIDIA_H100_80GB_HBM3": 3.35e12}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a GPU")


def norm_fn(impl, groups, relu):
    """(x, w, b[, input bias]) -> the refine unit's norm."""
    if impl.startswith("triton"):
        return lambda x, w, b, c=None: kernels.group_norm(x, groups, w, b, relu=relu,
                                                          input_bias=c)

    def composite(x, w, b, c=None):
        x = x + c.to(x.dtype)[:, None, None, None] if c is not None else x
        # PyTorch's kernels take the affine in the input's dtype
        return F.group_norm(F.relu(x) if relu else x, groups, w.to(x.dtype), b.to(x.dtype))
    return composite


def depthwise_fn(impl, stride):
    if impl.startswith("triton"):
        return lambda x, w: kernels.depthwise_conv3d(x, w, None, stride, 1)
    return lambda x, w: F.conv3d(x, w, None, stride, 1, groups=x.shape[1])


def upsample_fn(impl):
    """The refine blocks' skip sum under bf16 autocast, as the model runs it."""
    def composite(s, p):
        return s + F.interpolate(p, size=s.shape[2:], mode="trilinear", align_corners=True)
    op = kernels.upsample_add if impl == "triton" else composite

    def fn(s, p):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return op(s, p)
    return fn


def run_of(impl, fn, inputs, pass_):
    """One pass of ``fn``, eager or (``triton+graph``) the replay of its capture."""
    run = timed(fn, inputs, pass_)
    return captured(run)[0] if impl.endswith("+graph") else run


def check(fn, inputs, ref_fn):
    """Forward and every gradient against ``ref_fn`` in float64 (relative error <= 1e-2)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = ref_fn(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    errors = [((a.double() - b).norm() / b.norm()).item()
              for a, b in zip([out, *grads], [ref, *ref_grads])]
    if not max(errors) <= 1e-2:
        pytest.fail(f"disagrees with the float64 reference: {errors}; not timed")


def record(entry, bytes_moved, median_ms):
    gpu = gpu_name()
    gbps = bytes_moved / median_ms / 1e6
    import triton
    merge(f"{gpu}-model-ops.json",
          dict(gpu=gpu, **entry, median_ms=median_ms, gbytes=bytes_moved / 1e9, gbps=gbps,
               of_bandwidth=gbps * 1e9 / BANDWIDTH[gpu] if gpu in BANDWIDTH else None,
               torch=torch.__version__, triton=triton.__version__,
               autotuned=kernels.settings.autotune(), date=time.strftime("%Y-%m-%d"),
               commit=commit()),
          key=("op", "shape", "format", "impl", "pass"))


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["triton", "triton+graph", "pytorch"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_group_norm_speed(benchmark, shape, layout, impl, pass_):
    torch.manual_seed(0)
    size, groups, relu, biased = NORM_SHAPES[shape]
    fn = norm_fn(impl, groups, relu)
    C = size[1]
    params = lambda: [torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")] + \
        ([torch.randn(C, device="cuda") / 4] if biased else [])        # noqa: E731
    small = [torch.randn(2, C, 3, 5, 7, device="cuda").to(torch.bfloat16,
                                                         memory_format=FORMATS[layout]),
             *params()]
    check(fn, small, norm_fn("pytorch", groups, relu))
    x = torch.randn(size, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=FORMATS[layout])
    median_ms, _ = time_case(benchmark, run_of(impl, fn, [x, *params()], pass_), pass_)
    passes = 3 if pass_ == "fwd" else 8
    record(dict(op="group_norm", shape=shape, size=list(size), groups=groups, relu=relu,
                format=layout, impl=impl, dtype="bfloat16", **{"pass": pass_}),
           passes * x.numel() * x.element_size(), median_ms)


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["triton", "triton+graph", "pytorch"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", DEPTHWISE_SHAPES)
def test_depthwise_speed(benchmark, shape, layout, impl, pass_):
    torch.manual_seed(0)
    size, stride, blocks = DEPTHWISE_SHAPES[shape]
    fn = depthwise_fn(impl, stride)
    C = size[1]
    small = [torch.randn(2, C, 4, 6, 7, device="cuda").to(torch.bfloat16,
                                                         memory_format=FORMATS[layout]),
             (torch.randn(C, 1, 3, 3, 3, device="cuda") / 27 ** 0.5).to(torch.bfloat16)]
    check(fn, small, depthwise_fn("pytorch", stride))
    x = torch.randn(size, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=FORMATS[layout])
    w = (torch.randn(C, 1, 3, 3, 3, device="cuda") / 27 ** 0.5).to(torch.bfloat16)
    median_ms, _ = time_case(benchmark, run_of(impl, fn, [x, w], pass_), pass_)
    out = output_size(size[2:], (3, 3, 3), (stride,) * 3, (1, 1, 1), (1, 1, 1))
    in_bytes, out_bytes = x.numel() * x.element_size(), x.numel() // math.prod(size[2:]) * \
        math.prod(out) * x.element_size()
    moved = in_bytes + out_bytes if pass_ == "fwd" else 3 * in_bytes + 2 * out_bytes
    record(dict(op="depthwise_conv3d", shape=shape, size=list(size), stride=stride,
                blocks=blocks, format=layout, impl=impl, dtype="bfloat16",
                **{"pass": pass_}), moved, median_ms)


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["triton", "pytorch"])
@pytest.mark.parametrize("layout", FORMATS)
@pytest.mark.parametrize("shape", UPSAMPLE_SHAPES)
def test_upsample_add_speed(benchmark, shape, layout, impl, pass_):
    torch.manual_seed(0)
    size, source_size, source_dtype = UPSAMPLE_SHAPES[shape]
    fn = upsample_fn(impl)
    fmt = FORMATS[layout]
    small = [torch.randn(2, 8, 4, 6, 10, device="cuda").to(torch.bfloat16, memory_format=fmt),
             torch.randn(2, 8, 2, 3, 5, device="cuda").to(source_dtype, memory_format=fmt)]
    check(fn, small, upsample_fn("pytorch"))
    s = torch.randn(size, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
    p = torch.randn(source_size, device="cuda", dtype=source_dtype).contiguous(memory_format=fmt)
    median_ms, _ = time_case(benchmark, timed(fn, [s, p], pass_), pass_)
    # the output is fp32 (autocast upsamples in fp32); fwd+bwd also reads its gradient and
    # writes both inputs' gradients
    s_bytes, p_bytes, out_bytes = s.numel() * 2, p.numel() * p.element_size(), s.numel() * 4
    moved = s_bytes + p_bytes + out_bytes
    if pass_ == "fwdbwd":
        moved += out_bytes + s_bytes + p_bytes
    record(dict(op="upsample_add", shape=shape, size=list(size), source=list(source_size),
                format=layout, impl=impl, dtype="bfloat16-autocast", **{"pass": pass_}),
           moved, median_ms)
