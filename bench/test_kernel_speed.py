"""Kernel speed at the paper model's shapes: `pytest bench` on a GPU machine.

Shapes (N, C_in -> C_out, T x H x W; 3x3x3, padding 1), for a batch of two 8-frame clips of
480x864 (DAVIS's 480x854 frames padded): rf3, the decoder's refine block at 1/4 time and 1/16
space (2, 256 -> 256, 2x30x54); rf2, at 1/2 time and 1/8 space (2, 256 -> 256, 4x60x108);
rf2_in512, rf2's first convolution, which takes the encoder's 512 channels (2, 512 -> 256,
4x60x108); early, a layer at full time and 1/4 space with few channels and many voxels (2, 64 ->
64, 8x120x216). The original CUDA op's cost table (docs/design.md) has rf3, rf2 and rf2_in512.

Each case times forward ("fwd") and forward+backward ("fwdbwd") with pytest-benchmark (host clock
around a synchronised call) and records the CUDA-event median of triton.testing.do_bench, plus the
peak extra memory of a forward+backward, in <gpu>.json among the bench's records (records.py).
Every case skips without a GPU. A figure means nothing if the op is wrong: before timing an op at
a shape, the bench checks its forward and gradients at the same channel counts (a small video)
against the float64 reference and refuses to time it when they disagree.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from records import record_timing

SHAPES = {  # name: (N, C_in, C_out, T, H, W)
    "rf3": (2, 256, 256, 2, 30, 54),
    "rf2": (2, 256, 256, 4, 60, 108),
    "rf2_in512": (2, 512, 256, 4, 60, 108),
    "early": (2, 64, 64, 8, 120, 216),     # an early-stage layer: few channels, many voxels
}
# dense: cuDNN; d2conv3d: mode xyz with mask, sizes drawn per voxel, the default forward (the
# Gluon one on an sm_90 GPU: kernels/hopper.py); d2conv3d_triton: the same with the Triton
# forward forced (D2CONV_FORWARD=triton); d2conv3d_smooth: a smooth size map (as a size
# predictor's), default forward; deform_conv3d: the same sampling as free offsets
# (offsets_from_size); reference: the PyTorch reference (kernels.naive) on the GPU
OPS = ["dense", "d2conv3d", "d2conv3d_triton", "d2conv3d_smooth", "deform_conv3d", "reference"]
# the variants of d2conv3d are timed in bf16 only
VARIANTS = ("d2conv3d_triton", "d2conv3d_smooth")
# float32: strict IEEE (TF32 off for cuDNN and for the kernels); float32-tf32: TF32 allowed
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float32-tf32": torch.float32}

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a GPU")


@pytest.fixture(autouse=True)
def tf32_mode(request):
    """TF32 allowed only for the float32-tf32 cases (PyTorch's matmul flag drives the kernels,
    cuDNN's flag the dense conv)."""
    dtype = request.node.callspec.params.get("dtype") if hasattr(request.node, "callspec") else None
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = dtype == "float32-tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def make(shape, dtype, op, device="cuda"):
    """Fresh inputs (channels-last activations) and the function of one op: returns (fn, inputs).
    Every op but dense takes (x, size-or-offset, weight, bias, mask)."""
    N, C, Co, T, H, W = shape
    cl = torch.channels_last_3d
    x = torch.randn(N, C, T, H, W, device=device, dtype=dtype).to(memory_format=cl)
    w = (torch.randn(Co, C, 3, 3, 3, device=device) / (27 * C) ** 0.5).to(dtype)
    b = torch.randn(Co, device=device, dtype=dtype)
    if op == "dense":
        w = w.to(memory_format=cl)
        inputs = [x, w, b]
        return (lambda x, w, b: F.conv3d(x, w, b, padding=1)), inputs
    size = (smooth_sizes(N, T, H, W, device) if op == "d2conv3d_smooth"
            else torch.rand(N, 3, T, H, W, device=device) * 2.5 + 0.5).to(dtype)
    mask = torch.rand(N, 27, T, H, W, device=device, dtype=dtype)
    if op == "deform_conv3d":
        offset = kernels.offsets_from_size(size, 3)
        return (lambda x, o, w, b, m: kernels.deform_conv3d(x, o, w, b, padding=1, mask=m)), \
            [x, offset, w, b, mask]
    if op == "reference":
        from kernels import naive
        return (lambda x, s, w, b, m: naive.d2conv3d(x, s, w, b, padding=1, mask=m)), \
            [x, size, w, b, mask]
    inputs = [x, size, w, b, mask]
    forward = "triton" if op == "d2conv3d_triton" else None     # None: the default choice

    def d2conv3d(x, s, w, b, m):
        with kernels.settings.override(forward=forward):
            return kernels.d2conv3d(x, s, w, b, padding=1, mask=m)
    return d2conv3d, inputs


def smooth_sizes(N, T, H, W, device):
    """(N, 3, T, H, W) sizes in [0.5, 3]: a field drawn 6x coarser per axis, trilinearly
    upsampled, as smooth as a size predictor's map."""
    coarse = torch.rand(N, 3, *(max(1, n // 6) for n in (T, H, W)), device=device) * 2.5 + 0.5
    return F.interpolate(coarse, size=(T, H, W), mode="trilinear", align_corners=False)


def forward_kernel(op, inputs):
    """ "gluon" or "triton": which forward kernel a call of ``op`` on ``inputs`` takes."""
    from kernels import checks, forward

    if op not in ("d2conv3d", "deform_conv3d") + VARIANTS:
        return None
    x, coords, w, b, m = inputs
    geo = checks.check_args(x, coords, w, b, 1, 1, 1, m, 1,
                            "offset" if op == "deform_conv3d" else "xyz")
    with kernels.settings.override(forward="triton" if op == "d2conv3d_triton" else None):
        return "gluon" if forward._gluon(geo, x) else "triton"


def timed(fn, inputs, pass_):
    """A zero-argument callable running one pass."""
    if pass_ == "fwd":
        return lambda: fn(*inputs)
    leaves = [t.requires_grad_() for t in inputs]
    out = fn(*leaves)
    grad_out = torch.randn_like(out)
    return lambda: torch.autograd.grad(fn(*leaves), leaves, grad_out)


def captured(run):
    """(the replay of ``run`` captured in a CUDA graph, the captured call's output): the GPU's
    time of a pass without the host's Python and launches, as a model replayed by d2conv.graphs
    runs it. Three calls on a side stream first compile (and tune) outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph.replay, out


def peak_extra_mib(run):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_case(benchmark, run, pass_):
    """Time ``run`` once compiled: (CUDA-event median ms, peak extra MiB of a forward+backward or
    None); pytest-benchmark keeps its own host-clock rounds beside them."""
    import triton

    run()                                   # autotune / compile outside the timing
    torch.cuda.synchronize()
    median_ms = triton.testing.do_bench(run, warmup=100, rep=500, return_mode="median")

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=3)
    peak = peak_extra_mib(run) if pass_ == "fwdbwd" else None
    benchmark.extra_info.update(median_ms=median_ms, peak_extra_mib=peak)
    return median_ms, peak


_verified = {}


def verify(op, shape, dtype):
    """Forward and gradients at the shape's channel counts, on a small video, against the float64
    reference (relative error <= 1e-2 in 16-bit, 1e-4 in fp32)."""
    from kernels import naive

    N, C, Co, *_ = SHAPES[shape]
    key = (op, C, Co, dtype)
    if key not in _verified:
        fn, inputs = make((1, C, Co, 2, 7, 12), DTYPES[dtype], op)
        leaves = [t.requires_grad_() for t in inputs]
        out = fn(*leaves)
        grad_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, grad_out)
        ref_in = [t.detach().double().requires_grad_() for t in inputs]
        ref_op = naive.deform_conv3d if op == "deform_conv3d" else naive.d2conv3d
        ref = ref_op(ref_in[0], ref_in[1], ref_in[2], ref_in[3], padding=1, mask=ref_in[4])
        ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
        tol = {"float32": 1e-4, "float32-tf32": 5e-3}.get(dtype, 1e-2)
        errors = [((a.double() - b).norm() / b.norm()).item()
                  for a, b in zip([out, *grads], [ref, *ref_grads])]
        _verified[key] = max(errors) <= tol, errors
    ok, errors = _verified[key]
    if not ok:
        pytest.fail(f"{op} disagrees with the reference at {shape} channels: {errors}; not timed")


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_speed(benchmark, shape, dtype, op, pass_):
    if op in VARIANTS and dtype != "bfloat16":
        pytest.skip("the d2conv3d variants are timed in bf16")
    torch.manual_seed(0)
    if op in ("d2conv3d", "deform_conv3d") + VARIANTS:
        verify(op, shape, dtype)
    fn, inputs = make(SHAPES[shape], DTYPES[dtype], op)
    median_ms, peak = time_case(benchmark, timed(fn, inputs, pass_), pass_)
    kernel = forward_kernel(op, inputs)
    record_timing(".json", dict(shape=shape, dtype=dtype, op=op, **{"pass": pass_},
                                median_ms=median_ms, peak_extra_mib=peak,
                                **({"forward": kernel} if kernel else {})))
