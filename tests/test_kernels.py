"""The Triton kernels (interpreter on CPU, compiled on GPU) against the float64 reference:
forward and every gradient, fresh random inputs per test, NaN-poisoned outputs and NaN-surrounded
inputs so that unwritten outputs and out-of-bounds reads show up."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from helpers import (DEVICE, NAMES, Case, apply, make_inputs, nan_padded, reference, rel_err,
                     run)

ON_GPU = DEVICE == "cuda"


# every torch.empty / empty_like made during a test starts as NaN (conftest.py)
pytestmark = pytest.mark.usefixtures("poison_empty")


def check_against_reference(case, dtype=torch.float32, tol=1e-5, coords=None):
    x, c, w, b, m = make_inputs(case, dtype, coords=coords)
    # input channels-last in NaN-surrounded storage (used in place by the kernels); the offset /
    # size and mask are read in place too
    inputs = [nan_padded(x, channels_last=True), nan_padded(c), w, b,
              None if m is None else nan_padded(m)]
    out, grads, grad_out = run(case, inputs)
    ref_out, ref_grads = reference(case, inputs, grad_out)
    errors = {"output": rel_err(out, ref_out)}
    for name, g, r in zip(NAMES, grads, ref_grads):
        if r is not None:
            errors[name] = rel_err(g, r)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors over {tol}: {bad} (all: {errors})"
    return errors


# one case per feature; small so the interpreter stays fast. Channel counts above the
# interpreter's 16-wide blocks and more than 32 voxels run every loop and masked tail.
CASES = [
    Case(N=2, C=18, T=2, H=4, W=5, Co=20, mode="offset"),
    Case(N=2, C=18, T=2, H=4, W=5, Co=20, mode="xyz"),
    Case(N=1, C=8, T=3, H=6, W=5, Co=12, mode="x"),
    Case(N=1, C=8, T=3, H=6, W=5, Co=12, mode="xy"),
    Case(N=1, C=8, T=3, H=6, W=5, Co=12, mode="xxz"),
    Case(N=1, C=6, T=2, H=3, W=4, Co=4, groups=2, G=3, mode="offset"),
    Case(N=1, C=12, T=2, H=4, W=5, Co=8, groups=2, G=1, mode="xyz"),
    Case(N=1, C=12, T=2, H=4, W=5, Co=6, groups=3, G=2, mode="x"),
    Case(N=2, C=8, T=5, H=7, W=6, Co=8, stride=2, padding=0, mode="xyz"),
    Case(N=1, C=8, T=4, H=9, W=8, Co=8, stride=(1, 2, 2), padding=2, dilation=2, mode="offset"),
    Case(N=1, C=8, T=3, H=7, W=6, Co=8, padding=(0, 2, 1), dilation=(1, 2, 1), mode="xxz"),
    Case(N=1, C=8, T=2, H=9, W=5, Co=8, kernel=(1, 7, 1), padding=(0, 3, 0), mode="offset"),
    Case(N=1, C=8, T=2, H=5, W=9, Co=8, kernel=(1, 1, 7), padding=(0, 0, 3), mode="xy"),
    Case(N=1, C=8, T=2, H=5, W=7, Co=8, kernel=(1, 3, 3), padding=(0, 1, 1), mode="xyz"),
    Case(N=1, C=8, T=1, H=5, W=7, Co=8, mode="xyz"),
    Case(N=1, C=8, T=1, H=4, W=5, Co=8, kernel=(2, 2, 3), padding=(1, 0, 1), mode="offset"),
    Case(N=2, C=8, T=3, H=4, W=5, Co=8, mode="xyz", mask=False, bias=False),
    Case(N=2, C=8, T=3, H=4, W=5, Co=8, mode="offset", mask=False),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    check_against_reference(case)


@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[7], CASES[-3], CASES[-2]], ids=str)
def test_data_kernel_in_several_launches(case, monkeypatch):
    """The data kernel over a few kernel points per launch (two here, so a 3x3x3 kernel takes 14
    launches, the last with one point): every point taken once, the size gradient summed across
    launches."""
    from kernels import backward
    monkeypatch.setattr(backward, "points_per_launch", lambda *args: 2)
    check_against_reference(case)


def test_columns_one_chunk_at_a_time(monkeypatch):
    """The backward frees each launch's columns before the GEMM that makes the next chunk (else
    two chunks, twice GCOL_BUDGET, are held at the peak); the weight GEMM reads the live one."""
    import weakref

    from kernels import backward
    monkeypatch.setattr(backward, "points_per_launch", lambda *args: 2)
    case = Case(N=1, C=8, T=2, H=4, W=5, Co=8, mode="xyz")
    M = case.N * case.T * case.H * case.W
    chunks, calls, matmul = [], [], torch.matmul

    def recording_matmul(*args, **kwargs):
        out = matmul(*args, **kwargs)
        makes_chunk = out.shape[1] == M        # (groups, M, points*Cg); the weight's: (.., Cog)
        calls.append(("chunk" if makes_chunk else "weight",
                      sum(ref() is not None for ref in chunks)))
        if makes_chunk:
            chunks.append(weakref.ref(out))
        return out

    monkeypatch.setattr(backward.torch, "matmul", recording_matmul)
    x, c, w, b, m = (t.requires_grad_() if t is not None else t for t in make_inputs(case))
    kernels.d2conv3d(x, c, w, b, padding=1, mask=m).sum().backward()
    # live chunks when each GEMM is called: none before a chunk's, its own at the weight's
    assert calls == [("chunk", 0), ("weight", 1)] * 14


@pytest.mark.parametrize("wanted", [("weight",), ("input", "weight"), ("coords", "mask"),
                                    ("input",)], ids="+".join)
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=str)
def test_some_gradients(case, wanted):
    """The backward computes what autograd asks for: only the weight (the data kernel then
    gathers the columns and reads no column gradient), the input and the weight (no size or
    mask reductions), ... each against the reference, the others left out."""
    check_some_gradients(case, wanted)


def check_some_gradients(case, wanted):
    """Output and the ``wanted`` gradients (names of NAMES) against the reference, with only
    those asked of autograd."""
    x, c, w, b, m = make_inputs(case)
    inputs = dict(zip(NAMES, (x, c, w, b, m)))
    for name, t in inputs.items():
        if t is not None:
            t.requires_grad_(name in wanted)
    out = apply(case, x, c, w, b, m)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[name] for name in wanted], grad_out)
    ref_out, ref_grads = reference(case, [x, c, w, b, m], grad_out)
    assert rel_err(out, ref_out) <= 1e-5
    for name, g in zip(wanted, grads):
        assert rel_err(g, ref_grads[NAMES.index(name)]) <= 1e-5, name


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[9]], ids=str)
def test_fixed_point_input_gradient(case, monkeypatch):
    """Deterministic mode's input gradient (int64 fixed-point atomics, on a GPU under
    torch.use_deterministic_algorithms) against the reference, forced on here; over several
    launches, whose sums must share one scale. The scatter is forced: D²Conv modes would pull."""
    from kernels import backward
    monkeypatch.setattr(backward, "deterministic", lambda device: True)
    monkeypatch.setenv("D2CONV_INPUT_GRAD", "scatter")
    monkeypatch.setattr(backward, "points_per_launch", lambda *args: 5)
    check_against_reference(case)


@pytest.fixture
def pulled(monkeypatch):
    """D2CONV_INPUT_GRAD=pull (kernels/input_grad.py); returns the list of its launches' point
    counts, so that a test can tell that the pull ran and not the scatter."""
    from kernels import input_grad
    monkeypatch.setenv("D2CONV_INPUT_GRAD", "pull")
    launches, launch = [], input_grad.launch

    def counted(shape, coords, mask, col, gx, bounds, k_first, kc, config):
        launches.append(kc)
        return launch(shape, coords, mask, col, gx, bounds, k_first, kc, config)

    monkeypatch.setattr(input_grad, "launch", counted)
    return launches


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 7, 8, 10, 12, 14, 16)], ids=str)
def test_pulled_input_gradient(case, pulled):
    """The input gradient pulled by bricks of input voxels from the outputs whose samples can
    reach them (no atomics), in D²Conv cases of test_matches_reference: modes, groups with
    offset groups, stride, padding and dilation per axis, a non-cubic kernel, one frame, no
    mask. Only the input gradient is asked for (no data kernel runs); the tests below take all
    of them."""
    check_some_gradients(case, ("input",))
    assert sum(pulled) == case.K


@pytest.mark.parametrize("low, high", [(0.05, 0.4), (0.5, 6.0), (1.0, 1.0)])
def test_pulled_input_gradient_size_ranges(low, high, pulled, monkeypatch):
    """Sizes below 1 (samples inside the kernel's own cell), large ones (a window wider than the
    volume) and all 1 (integer samples), over several launches of 4 kernel points, with every
    gradient (the data kernel overwrites the column gradient after the pull has read it)."""
    from kernels import backward
    monkeypatch.setattr(backward, "points_per_launch", lambda *args: 4)
    case = Case(N=1, C=8, T=2, H=5, W=6, Co=8, mode="xyz")
    coords = torch.rand(case.N, 3, *case.out) * (high - low) + low
    check_against_reference(case, coords=coords)
    assert pulled == [4] * 6 + [3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pulled_input_gradient_half(dtype, pulled):
    """16-bit inputs: the brick's weights meet the column gradient in a 16-bit product (fp32
    accumulation). bf16 on the GPU only (the interpreter's bf16 tl.dot is wrong)."""
    if dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the interpreter's bf16 tl.dot is wrong; the GPU suite runs it")
    check_against_reference(Case(N=1, C=18, T=2, H=4, W=5, Co=20, mode="xyz"), dtype=dtype,
                            tol=1e-2)
    assert pulled


def test_input_gradient_choice(monkeypatch):
    """Unset, the pull is deterministic mode's (D²Conv modes, sizes within AUTO_MAX_SPREAD, or any
    while a CUDA graph is captured) and the scatter everyone else's; D2CONV_INPUT_GRAD forces
    either; a bad value names it."""
    from kernels import input_grad
    from kernels.checks import check_args
    case = Case(N=1, C=4, T=2, H=5, W=6, Co=4, mode="xyz")
    x, size, w, _, m = make_inputs(case)
    geo = check_args(x, size, w, None, 1, 1, 1, m, 1, "xyz")     # 3x3x3: reach 1 voxel
    narrow = torch.rand_like(size) * 2.5 + 0.5                      # spread 2.5
    wide = narrow.clone()
    wide.view(-1)[:2] = torch.tensor([0.5, 0.5 + input_grad.AUTO_MAX_SPREAD + 0.1])  # z: 8.1
    monkeypatch.delenv("D2CONV_INPUT_GRAD", raising=False)
    bounds = input_grad.choose("xyz", True, narrow, geo)
    assert torch.equal(bounds, torch.stack([narrow.amin((0, 2, 3, 4)),
                                            narrow.amax((0, 2, 3, 4))], 1))
    assert input_grad.choose("xyz", False, narrow, geo) is None
    assert input_grad.choose("xyz", True, wide, geo) is None
    assert input_grad.choose("offset", True, narrow, geo) is None
    with monkeypatch.context() as capturing:    # a CUDA graph's capture: no host sync
        capturing.setattr(input_grad, "capturing", lambda tensor: True)
        assert input_grad.choose("xyz", True, wide, geo) is not None
    monkeypatch.setenv("D2CONV_INPUT_GRAD", "pull")
    assert input_grad.choose("xyz", False, wide, geo) is not None
    assert input_grad.choose("offset", False, narrow, geo) is None
    monkeypatch.setenv("D2CONV_INPUT_GRAD", "scatter")
    assert input_grad.choose("xyz", True, narrow, geo) is None
    monkeypatch.setenv("D2CONV_INPUT_GRAD", "gather")
    with pytest.raises(ValueError, match="D2CONV_INPUT_GRAD"):
        input_grad.choose("xyz", False, narrow, geo)


def test_fixed_point_scale():
    """A power of two that keeps the bound on every input-gradient sum under 2^62, and NaN (so a
    NaN input gradient) for non-finite gradients."""
    from kernels.backward import fixed_point_scale
    go, w, m = torch.randn(2, 3, 4, 5, 16) * 7, torch.randn(16, 8, 3, 3, 3), torch.rand(2, 27, 3, 4, 5)
    scale = fixed_point_scale(go, w, m, samples=120 * 27).item()
    bound = go.abs().sum(-1).max().item() * w.abs().max().item() * m.max().item() * 120 * 27
    assert scale == 2.0 ** round(math.log2(scale))
    assert 2.0 ** 61 < bound * scale <= 2.0 ** 62
    go[0, 0, 0, 0, 0] = float("inf")
    assert math.isnan(fixed_point_scale(go, w, m, samples=120 * 27).item())


@pytest.mark.parametrize("mode", ["x", "xy", "xxz", "xyz"])
def test_d2conv_equals_deform_on_expanded_offsets(mode):
    case = Case(N=1, C=8, T=2, H=4, W=5, Co=8, mode=mode)
    x, size, w, b, m = make_inputs(case)
    out, grads, grad_out = run(case, [x, size, w, b, m])
    # the same through deform_conv3d; the size gradient flows back through offsets_from_size
    offset = kernels.offsets_from_size(size, case.kernel, case.dilation, mode)
    deform = case.with_(mode="offset")
    out2 = apply(deform, x, offset, w, b, m)
    grads2 = torch.autograd.grad(out2, [x, size, w, b, m], grad_out)
    assert rel_err(out, out2) <= 1e-6
    for name, g, g2 in zip(NAMES, grads, grads2):
        assert rel_err(g, g2) <= 1e-5, name


@pytest.mark.parametrize("mode", ["offset", "x", "xyz"])
def test_identity_coords_equal_conv3d(mode):
    """Zero offsets / unit sizes without mask are the plain convolution."""
    case = Case(N=2, C=8, T=3, H=5, W=6, Co=8, stride=(1, 2, 1), padding=(1, 1, 0),
                dilation=(1, 1, 2), groups=2, mode=mode, mask=False)
    if mode == "offset":
        coords = torch.zeros(case.N, case.K * 3, *case.out)
    else:
        coords = torch.ones(case.N, kernels.SIZE_CHANNELS[mode], *case.out)
    x, c, w, b, _ = make_inputs(case, coords=coords)
    out = apply(case, x, c, w, b, None)
    assert rel_err(out, F.conv3d(x, w, b, **case.conv_kwargs)) <= 1e-5


def test_size_two_equals_dilated_conv():
    case = Case(N=1, C=8, T=3, H=7, W=8, Co=8, mode="x", mask=False)
    x, _, w, b, _ = make_inputs(case)
    size = torch.full((1, 1, *case.out), 2.0, device=DEVICE)
    out = apply(case, x, size, w, b, None)
    expected = F.conv3d(x, w, b, padding=(1, 2, 2), dilation=(1, 2, 2))
    assert rel_err(out, expected) <= 1e-5


def shifted_window(x, shift, pad):
    """The zero-padded input window that a stride-1 convolution with padding ``pad`` reads when
    every sample is moved by ``shift``: result[q] = x[q - pad + shift], zero outside."""
    P = max(abs(s) for s in shift) + pad
    xp = F.pad(x, (P,) * 6)
    (a, b, c), (T, H, W) = shift, x.shape[2:]
    lo = P - pad
    return xp[:, :, lo + a:lo + a + T + 2 * pad, lo + b:lo + b + H + 2 * pad,
              lo + c:lo + c + W + 2 * pad]


def test_integer_offset_equals_shifted_conv():
    case = Case(N=1, C=8, T=4, H=6, W=7, Co=8, mask=False)
    shift = (1, -2, 3)
    offset = torch.tensor(shift, dtype=torch.float32, device=DEVICE).view(1, 1, 3, 1, 1, 1)
    offset = offset.expand(1, case.K, 3, *case.out).reshape(1, -1, *case.out)
    x, _, w, b, _ = make_inputs(case, coords=offset)
    out = apply(case, x, offset, w, b, None)
    assert rel_err(out, F.conv3d(shifted_window(x, shift, 1), w, b)) <= 1e-5


def boundary_offsets(case, targets):
    """Offsets that put every sample of every axis on one of the absolute coordinates in
    ``targets`` (a callable giving, per axis size, the candidate positions)."""
    To, Ho, Wo = case.out
    base = []
    for axis, (n_out, k) in enumerate(zip(case.out, case.kernel)):
        pos = torch.arange(n_out, dtype=torch.float64) - 1  # stride 1, padding 1
        idx = torch.arange(k, dtype=torch.float64)
        base.append(pos.view(1, -1) + idx.view(-1, 1))      # (k, n_out)
    sizes = (case.T, case.H, case.W)
    shape = (case.N, case.K, 3, To, Ho, Wo)
    offset = torch.empty(shape, dtype=torch.float64)
    kd, kh, kw = case.kernel
    for a in range(3):
        cand = torch.tensor(targets(sizes[a]), dtype=torch.float64)
        choice = cand[torch.randint(len(cand), shape[:2] + shape[3:])]
        b = base[a]
        k_index = torch.arange(case.K)
        k_axis = (k_index // (kh * kw), k_index // kw % kh, k_index % kw)[a]
        view = [1, case.K, 1, 1, 1]
        view[2 + a] = case.out[a]
        start = b[k_axis].view(*view[:2], *[case.out[i] if i == a else 1 for i in range(3)])
        offset[:, :, a] = choice - start
    return offset.reshape(case.N, -1, To, Ho, Wo).float()


def test_boundary_samples_match_reference():
    """Samples exactly at -1, in (-1, 0), at 0, at size-1, in (size-1, size), at size and far
    outside: finite and equal to the reference, gradients included."""
    case = Case(N=1, C=8, T=3, H=4, W=5, Co=8)

    def targets(n):
        return [-1e6, -2.0, -1.0, -0.75, -0.001, 0.0, 0.5, n - 1.0, n - 0.75, n - 0.001,
                float(n), n + 0.5, 1e6]

    check_against_reference(case, coords=boundary_offsets(case, targets))


def test_fully_outside_samples_contribute_nothing():
    case = Case(N=1, C=8, T=3, H=4, W=5, Co=8)
    offset = torch.full((1, case.K * 3, *case.out), 1e6, device=DEVICE)
    offset[:, 1::3] = -1.5   # y inside, t and x far away: still entirely outside
    x, c, w, b, m = make_inputs(case, coords=offset)
    out, (gx, gc, gw, gb, gm), _ = run(case, [x, c, w, b, m])
    assert torch.equal(out, b.detach().view(1, -1, 1, 1, 1).expand_as(out))
    for g in (gx, gc, gw, gm):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("mode", ["offset", "xyz", "x"])
def test_integer_coordinates_take_the_right_derivative(mode):
    """At initialisation every D²Conv sample sits on an integer; the kernels must give the
    reference's one-sided gradients there (the reference itself is checked against forward
    differences in test_naive.py)."""
    case = Case(N=1, C=8, T=3, H=5, W=6, Co=8, mode=mode)
    if mode == "offset":
        coords = torch.randint(-2, 3, (1, case.K * 3, *case.out)).float()
    else:
        coords = torch.randint(1, 3, (1, {"x": 1, "xyz": 3}[mode], *case.out)).float()
    check_against_reference(case, coords=coords)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["offset", "xyz"])
def test_half_precision(dtype, mode):
    if dtype == torch.bfloat16 and not ON_GPU:
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; bf16 runs on the GPU")
    case = Case(N=1, C=16, T=3, H=5, W=7, Co=16, mode=mode)
    check_against_reference(case, dtype=dtype, tol=1e-2)


@pytest.mark.skipif(not ON_GPU, reason="paper-sized channels: GPU only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_wide_channels_on_gpu(dtype):
    """The default (large-block) configs with hundreds of channels and several tiles."""
    case = Case(N=1, C=256, T=2, H=9, W=14, Co=256, mode="xyz")
    check_against_reference(case, dtype=dtype, tol=1e-5 if dtype == torch.float32 else 1e-2)


_XYZ = Case(N=2, C=18, T=2, H=4, W=5, Co=20, mode="xyz")
_GROUPED = Case(N=1, C=12, T=2, H=4, W=5, Co=8, groups=2, G=3, mode="offset")


@pytest.mark.parametrize("precision, case", [("tf32", _XYZ), ("tf32", _GROUPED),
                                             ("tf32x3", _XYZ), ("ieee", _GROUPED)], ids=str)
def test_fp32_products(precision, case, monkeypatch):
    """fp32's other products (the default is an IEEE forward): TF32 when PyTorch allows it (TF32's
    error, in the forward and the backward's GEMMs), D2CONV_FP32_DOT=tf32x3 or ieee in the forward
    (fp32's). The TF32 forward reads the weights with input channels contiguous; the interpreter
    checks that indexing (it multiplies in fp32 whatever the precision)."""
    if not ON_GPU and precision != "tf32":
        pytest.skip("the interpreter multiplies in fp32 whatever the precision; only TF32's "
                    "weight layout differs there")
    if precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True     # conftest's ieee_fp32 restores it
    else:
        monkeypatch.setenv("D2CONV_FP32_DOT", precision)
    check_against_reference(case, tol=1e-2 if precision == "tf32" and ON_GPU else 1e-5)
