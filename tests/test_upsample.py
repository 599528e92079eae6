"""The upsampled skip sum (kernels/upsample.py; interpreter on CPU, compiled on GPU) against
``input + F.interpolate(source, trilinear, align_corners=True)`` in float64: output and both
gradients, up- and downsampling, identity and one-position axes, both memory formats in
NaN-surrounded storage, NaN-poisoned outputs; dtypes under autocast; the custom op; bad
arguments; and, on a machine without a GPU, the kernel's launches at rf1 compiled for sm_90.

``python tests/test_upsample.py`` prints each of those launches compiled for sm_90 (registers,
spills, 16-byte loads); the last test runs it."""
import re

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import DEVICE, compiled_run, rel_err
from kernels import upsample
from test_group_norm import _cuda_tools, compile_sm90, in_nan_storage, resources

pytestmark = pytest.mark.usefixtures("poison_empty")

# (input's T, H, W), (source's Ts, Hs, Ws)
SIZES = {"x2": ((4, 6, 8), (2, 3, 4)),              # the refine blocks' doubling
         "odd": ((5, 7, 9), (3, 4, 5)),             # ratios that are not integers
         "identity-axes": ((4, 6, 6), (4, 3, 6)),   # T and W unchanged: skipped passes
         "down": ((3, 4, 5), (5, 7, 9)),            # fewer positions than the source
         "one-position": ((1, 5, 6), (3, 1, 2))}    # L_dst = 1 (scale 0) and L_src = 1


def composite(input, source):
    return input + F.interpolate(source, size=input.shape[2:], mode="trilinear",
                                 align_corners=True)


def run(input, source, grad_out):
    input, source = (t.detach().requires_grad_() for t in (input, source))
    out = kernels.upsample_add(input, source)
    out.backward(grad_out)
    return out, input.grad, source.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "cl"])
@pytest.mark.parametrize("sizes", SIZES)
def test_matches_reference(sizes, channels_last, dtype):
    (T, H, W), (Ts, Hs, Ws) = SIZES[sizes]
    N, C = 2, 12
    x = in_nan_storage(torch.randn(N, C, T, H, W, device=DEVICE).to(dtype), channels_last)
    s = in_nan_storage(torch.randn(N, C, Ts, Hs, Ws, device=DEVICE).to(dtype), channels_last)
    g = torch.randn(N, C, T, H, W, device=DEVICE).to(dtype)
    out, gx, gs = run(x, s, g)
    ref = run(x.double(), s.double(), g.double())
    assert out.dtype == gx.dtype == gs.dtype == dtype
    assert out.shape == x.shape and gs.shape == s.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip((out, gx, gs), ref):
        assert rel_err(got, want) < tol


def test_mixed_dtypes_promote_and_autocast_gives_fp32():
    x = torch.randn(1, 4, 4, 6, 6, device=DEVICE, dtype=torch.bfloat16)
    s = torch.randn(1, 4, 2, 3, 3, device=DEVICE)
    assert kernels.upsample_add(x, s).dtype == torch.float32
    assert kernels.upsample_add(x, s.bfloat16()).dtype == torch.bfloat16
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = kernels.upsample_add(x, s.bfloat16())
        # CUDA's autocast runs F.interpolate in fp32, the CPU's in bf16
        assert out.dtype == composite(x, s.bfloat16()).dtype
    assert out.dtype == (torch.float32 if DEVICE == "cuda" else torch.bfloat16)
    assert rel_err(out, composite(x.double(), s.bfloat16().double())) < 1e-2


def test_source_gradient_is_deterministic():
    x = torch.randn(2, 8, 4, 6, 10, device=DEVICE)
    s = torch.randn(2, 8, 2, 3, 5, device=DEVICE)
    g = torch.randn_like(x)
    first, second = run(x, s, g)[2], run(x, s, g)[2]
    assert torch.equal(first, second)


def test_bad_arguments_raise_value_error_naming_them():
    x = torch.randn(1, 4, 2, 3, 3, device=DEVICE)
    for args, words in [((x[0], x), "input"), ((x, x[:, :2]), "source"),
                        ((x, x.int()), "floating"), ((x, "x"), "source")]:
        with pytest.raises(ValueError, match=words):
            kernels.upsample_add(*args)


@pytest.mark.skipif(DEVICE != "cuda", reason="opcheck runs the op: CUDA tensors")
def test_opcheck():
    x = torch.randn(2, 4, 4, 6, 6, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 4, 2, 3, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.d2conv.upsample_add.default, (x, s, torch.float32))


def test_meta_tensors():
    x = torch.empty(2, 4, 8, 60, 108, device="meta")
    s = torch.empty(2, 4, 4, 30, 54, device="meta", dtype=torch.bfloat16)
    out = kernels.upsample_add(x, s)
    assert out.shape == x.shape and out.dtype == torch.float32


def captured_launches(shape, source_shape, dtype, source_dtype):
    """(kwargs, num_warps) of every lerp_axis_kernel launch of one forward and one backward,
    run on meta tensors with the launches recorded instead of made."""
    launches = []
    names = [p.name for p in upsample.lerp_axis_kernel.params]

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, num_warps, **meta):
                launches.append((dict(zip(names, args), **meta), num_warps))
            return launch

    saved = upsample.lerp_axis_kernel
    upsample.lerp_axis_kernel = Recorder()
    try:
        x = torch.empty(shape, device="meta", dtype=dtype)
        s = torch.empty(source_shape, device="meta", dtype=source_dtype)
        upsample.upsample_add_fwd(x, s, torch.float32)
        upsample.upsample_add_bwd(torch.empty(shape, device="meta"), source_shape[2:],
                                  source_dtype)
    finally:
        upsample.lerp_axis_kernel = saved
    return launches


def print_sm90_resources():
    """One line per launch of rf1's sum (bf16 input, fp32 source, as under autocast): registers,
    spilled bytes and 16-byte global loads in the PTX."""
    for args, num_warps in captured_launches((2, 256, 8, 120, 216), (2, 256, 4, 60, 108),
                                             torch.bfloat16, torch.float32):
        compiled = compile_sm90(upsample.lerp_axis_kernel, num_warps, args)
        regs, spilled = resources(compiled)
        loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", compiled.asm["ptx"]))
        print(f"lerp_axis_kernel transpose={int(args['TRANSPOSE'])} add={int(args['HAS_ADD'])} "
              f"row {args['B']} w{num_warps}: {regs} regs, {spilled} B spilled, "
              f"{loads} v4 loads", flush=True)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU suite compiles it for real")
@pytest.mark.skipif(not _cuda_tools(), reason="Triton without its CUDA tools")
def test_kernel_compiles_for_sm90():
    """rf1's six launches (three passes each way) compile for sm_90 without spills, and read
    16 bytes per load instruction."""
    lines = compiled_run(__file__)
    assert len(lines) == 6, lines
    for line in lines:
        print(line)
        regs, spilled, loads = (int(v) for v in re.findall(r"(\d+) (?:regs|B|v4)", line))
        assert 0 < regs <= 255 and spilled == 0 and loads > 0, line


if __name__ == "__main__":
    print_sm90_resources()
