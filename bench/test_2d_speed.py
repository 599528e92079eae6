"""Kernel speed of the 2D operators: `pytest bench/test_2d_speed.py` on a GPU machine.

Shapes (N, C_in -> C_out, H x W; 3x3, padding 1, with a mask): det64 (8, 256 -> 256, 64x64) and
det128 (2, 256 -> 256, 128x128), a detector's deformable layers on a feature pyramid's levels;
res56 (16, 64 -> 64, 56x56), a ResNet's first stage. Offsets 2 * N(0, 1), sizes uniform in [0.5, 3].

Ops: dense (cuDNN's conv2d, channels-last), deform_conv2d (kernels.deform_conv2d), d2conv2d
(kernels.d2conv2d, mode xy), deform_conv3d_t1 (kernels.deform_conv3d on the same data as one
frame: a 1x3x3 kernel, zero t offsets) and torchvision (torchvision.ops.deform_conv2d on NCHW
tensors, where torchvision imports; never a dependency). torchvision's CUDA op has no bf16 (it
dispatches float, double and half only): it runs in float16 instead. float32 is strict (TF32 off
for cuDNN, cuBLAS and the kernels).

As test_kernel_speed.py: forward ("fwd") and forward+backward ("fwdbwd"), each op checked
against the float64 reference (kernels.naive) before it is timed, the CUDA-event median, the
peak extra memory and the check's relative errors recorded in <gpu>-2d.json among the bench's
records (records.py). ``test_captured_forward``: the det64 bf16 forwards replayed from a CUDA
graph (op "<op>+graph"), the host's share taken out. Every case skips without a GPU.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import naive
from records import record_timing
from test_kernel_speed import captured, time_case, timed

SHAPES = {  # name: (N, C_in, C_out, H, W)
    "det64": (8, 256, 256, 64, 64),
    "det128": (2, 256, 256, 128, 128),
    "res56": (16, 64, 64, 56, 56),
}
# op: its dtypes
OPS = {"dense": ["bfloat16", "float32"],
       "deform_conv2d": ["bfloat16", "float32"],
       "d2conv2d": ["bfloat16", "float32"],
       "deform_conv3d_t1": ["bfloat16", "float32"],
       "torchvision": ["float32", "float16"]}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CASES = [(dtype, op) for op, dtypes in OPS.items() for dtype in dtypes]
K = 9       # 3x3 kernel points

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a GPU")


@pytest.fixture(autouse=True)
def strict_fp32():
    """No TF32 anywhere: cuDNN's flag drives the dense conv, PyTorch's matmul flag the kernels
    and torchvision's GEMMs."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def torchvision_ops():
    """torchvision.ops, or skip the case where torchvision does not import."""
    try:
        import torchvision.ops
    except Exception as error:      # absent, or built for another torch
        pytest.skip(f"torchvision does not import: {error}")
    return torchvision.ops


def make(shape, dtype, op, device="cuda"):
    """Fresh inputs and the function of one op: returns (fn, inputs). The same draws for every op
    and dtype of a shape (drawn in fp32, then cast). Every op but dense takes (x, offset-or-size,
    weight, bias, mask): 2D x (N, C, H, W), offset (N, 18, H, W) as (y, x) pairs, size (N, 2, H,
    W), mask (N, 9, H, W); deform_conv3d_t1 the same as (N, C, 1, H, W) with offsets (N, 27, 1,
    H, W), t components zero."""
    N, C, Co, H, W = shape
    x = torch.randn(N, C, H, W, device=device)
    w = torch.randn(Co, C, 3, 3, device=device) / (K * C) ** 0.5
    b = torch.randn(Co, device=device)
    offset = torch.randn(N, 2 * K, H, W, device=device) * 2
    size = torch.rand(N, 2, H, W, device=device) * 2.5 + 0.5
    mask = torch.rand(N, K, H, W, device=device)
    x, w, b, offset, size, mask = (t.to(DTYPES[dtype]) for t in (x, w, b, offset, size, mask))
    cl = torch.channels_last
    if op == "dense":
        return (lambda x, w, b: F.conv2d(x, w, b, padding=1)), \
            [x.to(memory_format=cl), w.to(memory_format=cl), b]
    if op == "torchvision":
        conv = torchvision_ops().deform_conv2d
        return (lambda x, o, w, b, m: conv(x, o, w, b, padding=(1, 1), mask=m)), \
            [x, offset, w, b, mask]
    if op == "deform_conv2d":
        return (lambda x, o, w, b, m: kernels.deform_conv2d(x, o, w, b, padding=(1, 1), mask=m)), \
            [x.to(memory_format=cl), offset, w, b, mask]
    if op == "d2conv2d":
        return (lambda x, s, w, b, m: kernels.d2conv2d(x, s, w, b, padding=1, mask=m, mode="xy")), \
            [x.to(memory_format=cl), size, w, b, mask]
    if op == "deform_conv3d_t1":
        pairs = offset.view(N, K, 2, H, W)
        offset3 = torch.cat([torch.zeros_like(pairs[:, :, :1]), pairs], 2).view(N, 3 * K, 1, H, W)
        x3 = x.unsqueeze(2).clone(memory_format=torch.channels_last_3d)
        return (lambda x, o, w, b, m: kernels.deform_conv3d(x, o, w, b, padding=(0, 1, 1),
                                                            mask=m)), \
            [x3, offset3, w.unsqueeze(2).clone(), b, mask.unsqueeze(2).clone()]
    raise ValueError(f"unknown op {op!r}")


def reference(op):
    """The float64 reference (kernels.naive) of an op, on the op's inputs."""
    if op == "deform_conv3d_t1":
        return lambda x, o, w, b, m: naive.deform_conv3d(x, o, w, b, padding=(0, 1, 1), mask=m)
    conv = naive.d2conv3d if op == "d2conv2d" else naive.deform_conv3d
    mode = "xy" if op == "d2conv2d" else "offset_yx"
    return lambda x, c, w, b, m: conv(x.unsqueeze(2), c.unsqueeze(2), w.unsqueeze(2), b,
                                      padding=(0, 1, 1), mask=m.unsqueeze(2), mode=mode).squeeze(2)


def tolerances(op, dtype):
    """Relative errors allowed for the forward and each gradient (input, offset or size, weight,
    bias, mask): 1e-4 in fp32, 1e-2 in 16-bit. torchvision's fp16 rounds each sampling position
    to fp16 (1/128 near 16), which moves some across an integer, where the bilinear derivative
    jumps: its offset gradient is allowed 0.2 (an fp16 emulation of it: 3-7% at 16x16)."""
    tol = [1e-4 if dtype == "float32" else 1e-2] * 6
    if op == "torchvision" and dtype == "float16":
        tol[2] = 0.2
    return tol


_verified = {}


def check_errors(op, shape, dtype, device="cuda"):
    """Relative errors of the forward and of each gradient (input, offset or size, weight, bias,
    mask) at the shape's channel counts on one 16x16 image, against the float64 reference."""
    N, C, Co, H, W = shape
    fn, inputs = make((1, C, Co, 16, 16), dtype, op, device)
    leaves = [t.requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = reference(op)(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    return [((a.double() - b).norm() / b.norm()).item()
            for a, b in zip([out, *grads], [ref, *ref_grads])]


def verify(op, shape, dtype):
    """check_errors once per (op, channels, dtype); fails the case when one is over its
    tolerance, else returns them."""
    N, C, Co, *_ = SHAPES[shape]
    key = (op, C, Co, dtype)
    if key not in _verified:
        _verified[key] = check_errors(op, SHAPES[shape], dtype)
    errors = _verified[key]
    if any(e > tol for e, tol in zip(errors, tolerances(op, dtype))):
        pytest.fail(f"{op} disagrees with the reference at {shape} channels in {dtype}: "
                    f"{errors} (forward, then the gradients of the inputs); not timed")
    return errors


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("dtype,op", CASES, ids=[f"{dtype}-{op}" for dtype, op in CASES])
@pytest.mark.parametrize("shape", SHAPES)
def test_speed_2d(benchmark, shape, dtype, op, pass_):
    extra = {}
    if op == "torchvision":
        torchvision_ops()
        extra["torchvision"] = __import__("torchvision").__version__
    torch.manual_seed(0)
    errors = None if op == "dense" else verify(op, shape, dtype)
    torch.manual_seed(0)                    # the same draws whether or not the check ran
    fn, inputs = make(SHAPES[shape], dtype, op)
    median_ms, peak = time_case(benchmark, timed(fn, inputs, pass_), pass_)
    record_timing("-2d.json", dict(shape=shape, dtype=dtype, op=op, **{"pass": pass_},
                                   median_ms=median_ms, peak_extra_mib=peak, rel_errors=errors,
                                   **extra))


@pytest.mark.parametrize("op", ["deform_conv2d", "d2conv2d", "dense"])
def test_captured_forward(benchmark, op):
    """The det64 bf16 forward captured once in a CUDA graph and replayed: the GPU's time without
    the host's per-call Python and launches (which bound the eager forward at this shape)."""
    torch.manual_seed(0)
    fn, inputs = make(SHAPES["det64"], "bfloat16", op)
    replay, out = captured(lambda: fn(*inputs))
    replay()
    torch.testing.assert_close(out, fn(*inputs), rtol=1e-5, atol=1e-5)
    median_ms, _ = time_case(benchmark, replay, "fwd")
    record_timing("-2d.json", dict(shape="det64", dtype="bfloat16", op=f"{op}+graph",
                                   **{"pass": "fwd"}, median_ms=median_ms, peak_extra_mib=None,
                                   rel_errors=None))
