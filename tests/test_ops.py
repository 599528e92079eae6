"""The public API around the kernels: argument errors, dispatch, torch.library registration,
torch.compile, autotuning configuration."""
import pytest
import torch

import kernels
from helpers import DEVICE, Case, apply, make_inputs, rel_err
from kernels import configs, naive, settings


def good_args(**change):
    args = dict(input=torch.randn(1, 4, 3, 5, 5), offset=torch.randn(1, 81, 3, 5, 5),
                weight=torch.randn(6, 4, 3, 3, 3), bias=None, stride=1, padding=1, dilation=1,
                mask=torch.rand(1, 27, 3, 5, 5), groups=1)
    args.update(change)
    return args


@pytest.mark.parametrize("change, word", [
    (dict(input=torch.randn(4, 3, 5, 5)), "input"),
    (dict(weight=torch.randn(6, 4, 3, 3)), "weight"),
    (dict(offset=torch.randn(1, 80, 3, 5, 5)), "offset"),
    (dict(offset=torch.randn(1, 81, 3, 5, 4)), "offset"),
    (dict(offset=torch.randn(1, 81 * 3, 3, 5, 5)), "offset groups"),   # 3 groups, 4 channels
    (dict(mask=torch.rand(1, 26, 3, 5, 5)), "mask"),
    (dict(mask=torch.rand(1, 27, 3, 5, 5, dtype=torch.float64)), "mask"),
    (dict(bias=torch.randn(5)), "bias"),
    (dict(groups=3), "groups"),
    (dict(weight=torch.randn(6, 2, 3, 3, 3)), "weight"),
    (dict(stride=0), "stride"),
    (dict(dilation=(1, 0, 1)), "dilation"),
    (dict(padding=(1, 1)), "padding"),
    (dict(weight=torch.randn(6, 4, 3, 3, 3, dtype=torch.float64)), "weight"),
    (dict(input=torch.randn(1, 4, 1, 1, 1), offset=torch.randn(1, 81, 1, 1, 1),
          mask=None, padding=0), "too small"),
    (dict(padding=1.0), "padding must be an int"),
    (dict(stride=(1, 1.0, 1)), "stride must be an int"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_arguments_raise_value_error_naming_them(change, word):
    """Also after a good call of the same tensors' shapes: the checks remembered per call
    signature (checks.checked_geometry) pass nothing they would refuse."""
    kernels.deform_conv3d(**good_args())
    with pytest.raises(ValueError, match=word):
        kernels.deform_conv3d(**good_args(**change))


def test_host_side_integer_helpers_equal_tritons():
    import triton

    from kernels.launch import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in range(1, 70))


def test_bad_size_and_mode():
    x, w = torch.randn(1, 4, 3, 5, 5), torch.randn(6, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="size"):
        kernels.d2conv3d(x, torch.rand(1, 2, 3, 5, 5), w, padding=1, mode="xyz")
    with pytest.raises(ValueError, match="mode"):
        kernels.d2conv3d(x, torch.rand(1, 3, 3, 5, 5), w, padding=1, mode="zz")


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    monkeypatch.setattr(naive, "deform_conv3d",
                        lambda *a, **k: calls.append(1) or torch.zeros(1))
    kernels.deform_conv3d(**good_args())
    assert calls == [1]


@pytest.mark.skipif(DEVICE == "cpu" and not settings.interpreting(),
                    reason="needs a GPU or the Triton interpreter")
def test_opcheck():
    case = Case(N=1, C=4, T=2, H=3, W=3, Co=4, kernel=(1, 2, 2), padding=(0, 1, 0), mode="xy")
    x, size, w, b, m = make_inputs(case)
    conf = ([1, 1, 1], [0, 1, 0], [1, 1, 1], 1, "xy")
    torch.library.opcheck(torch.ops.d2conv.conv3d.default, (x, size, w, b, m, *conf))
    grad_out = torch.randn(1, 4, *case.out, device=DEVICE)
    inputs = [t.detach() for t in (x, size, w, m)]      # the backward op has no backward
    for needs in ((True, True, True, True, True), (False, True, False, False, True)):
        torch.library.opcheck(torch.ops.d2conv.conv3d_backward.default,
                              (grad_out, *inputs, *conf, *needs))


@pytest.mark.skipif(DEVICE == "cpu" and not settings.interpreting(),
                    reason="needs a GPU or the Triton interpreter")
@pytest.mark.parametrize("mode", ["offset", "xy"])
def test_eager_path_equals_custom_op(mode, monkeypatch):
    """Eager calls take ops.Conv3dFunction, torch.compile the custom ops: the same values and
    gradients (the same kernels), and each path is the one taken."""
    case = Case(N=1, C=8, T=2, H=3, W=4, Co=8, kernel=(2, 3, 1), padding=(1, 1, 0), mode=mode)
    inputs = make_inputs(case)
    grad_out = torch.randn(1, 8, *case.out, device=DEVICE)
    taken = []
    real_apply = kernels.ops.Conv3dFunction.apply
    monkeypatch.setattr(kernels.ops.Conv3dFunction, "apply",
                        lambda *a: taken.append("eager") or real_apply(*a))
    out = apply(case, *inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)
    assert taken == ["eager"]
    x, coords, w, b, m = inputs
    geo = kernels.checks.check_args(x, coords, w, b, case.stride, case.padding, case.dilation, m,
                                    case.groups, mode)
    ref = torch.ops.d2conv.conv3d(x, coords, w, b, m, list(geo.stride), list(geo.padding),
                                  list(geo.dilation), case.groups, mode)
    ref_grads = torch.autograd.grad(ref, [t for t in inputs if t is not None], grad_out)
    assert taken == ["eager"]       # the custom op did not go through the eager Function
    assert rel_err(out, ref) <= 1e-6
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-6


def test_torch_compile_traces_without_graph_breaks():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(4, 4, 1, 2, 2) * 0.3)

        def forward(self, x, size):
            return kernels.d2conv3d(x, size, self.weight, padding=(0, 1, 0), mode="x").relu()

    block = Block().to(DEVICE)
    x = torch.randn(1, 4, 2, 3, 3, device=DEVICE, requires_grad=True)
    size = torch.rand(1, 1, 2, 4, 2, device=DEVICE) + 0.5
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(x, size)
    out.sum().backward()
    assert rel_err(out, block(x, size)) <= 1e-5


def test_autocast_runs_in_the_autocast_dtype():
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    case = Case(N=1, C=4, T=2, H=3, W=4, Co=4, mode="xyz")
    x, size, w, b, m = make_inputs(case)
    with torch.autocast(device_type, dtype=dtype):
        out = apply(case, x, size, w, b, m)
    assert out.dtype == dtype
    assert rel_err(out, apply(case, x, size, w, b, m)) <= 1e-2


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("D2CONV_CONFIG_FWD", "BLOCK_M=64,BLOCK_N=32,BLOCK_C=16,num_warps=2,num_stages=1")
    config = configs.pinned("FWD", {})
    assert config.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_C": 16}
    assert (config.num_warps, config.num_stages, config.maxnreg) == (2, 1, None)
    monkeypatch.setenv("D2CONV_CONFIG_BWD_DATA", "BLOCK_M=32,BLOCK_C=16,num_warps=4,maxnreg=128")
    config = configs.pinned("BWD_DATA", {})
    assert config.kwargs == {"BLOCK_M": 32, "BLOCK_C": 16}
    assert (config.num_warps, config.maxnreg) == (4, 128)
    monkeypatch.setenv("D2CONV_CONFIG_FWD", "BLOCK_M=big")
    with pytest.raises(ValueError, match="D2CONV_CONFIG_FWD"):
        configs.pinned("FWD", {})


def test_pinned_config_from_environment_is_used(monkeypatch):
    """A run with a pinned small config gives the same result as the default config."""
    case = Case(N=1, C=8, T=2, H=3, W=4, Co=8, kernel=(1, 3, 3), padding=(0, 1, 1), mode="xy")
    x, size, w, b, m = make_inputs(case)
    out = apply(case, x, size, w, b, m)
    monkeypatch.setenv("D2CONV_CONFIG_FWD", "BLOCK_M=16,BLOCK_N=16,BLOCK_C=16,num_warps=1,num_stages=1")
    monkeypatch.setenv("D2CONV_CONFIG_BWD_DATA", "BLOCK_M=16,BLOCK_C=16,num_warps=1,maxnreg=128")
    out2 = apply(case, x, size, w, b, m)
    assert rel_err(out2, out) <= 1e-6
    out2.sum().backward()           # the data kernel takes maxnreg as a launch option


def test_prune_fits_blocks_to_the_shape():
    every = [c for candidates in configs.CANDIDATES["FWD"].values() for c in candidates]
    kept = configs.prune(every, {"Cog": 24, "SEG": 8})
    assert {c.kwargs["BLOCK_N"] for c in kept} == {32}
    assert {c.kwargs["BLOCK_C"] for c in kept} == {16}
    assert len(kept) == len({(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                             for c in kept})


def test_a_register_cap_is_a_candidate_of_its_own(monkeypatch):
    """The data kernel's 64x16 tile is tuned with and without its register cap: neither the
    candidate list nor the pruning takes one for a duplicate of the other; untuned launches
    take the capped one."""
    args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "DOT_PRECISION": "ieee", "Cog": 256,
            "SEG": 256}
    kept = configs.candidates("BWD_DATA", args)
    caps = [c.maxnreg for c in kept if c.kwargs == {"BLOCK_M": 64, "BLOCK_C": 16}]
    assert sorted(caps, key=str) == [168, None]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("D2CONV_AUTOTUNE", "0")
    monkeypatch.delenv("D2CONV_CONFIG_BWD_DATA", raising=False)
    assert configs.pinned("BWD_DATA", args).maxnreg == 168


def test_settings_from_code_win_over_the_environment(monkeypatch):
    """configure() wins over each D2CONV_* variable, override() restores what was set before, None
    hands a setting back to its variable; bad values and unknown names are errors naming them."""
    from kernels import settings
    monkeypatch.setenv("D2CONV_INPUT_GRAD", "scatter")
    monkeypatch.setenv("D2CONV_GCOL_MIB", "64")
    assert settings.input_grad() == "scatter" and settings.gcol_bytes() == 64 * 2**20
    try:
        settings.configure(input_grad="pull")
        with settings.override(input_grad="auto", gcol_mib=1, config_bwd_data="BLOCK_M=32"):
            assert settings.input_grad() == "auto" and settings.gcol_bytes() == 2**20
            assert settings.pinned_config("BWD_DATA") == "BLOCK_M=32"
        assert settings.input_grad() == "pull" and settings.gcol_bytes() == 64 * 2**20
        assert settings.pinned_config("BWD_DATA") is None
    finally:
        settings.configure(input_grad=None)
    assert settings.input_grad() == "scatter"
    monkeypatch.setenv("D2CONV_GCOL_MIB", "lots")
    with pytest.raises(ValueError, match="D2CONV_GCOL_MIB"):
        settings.gcol_bytes()
    with pytest.raises(ValueError, match="autotuning"):
        settings.configure(autotuning=False)


def test_every_setting_is_read_and_documented_in_one_place():
    """Only kernels/settings.py reads the environment, and its docstring names each variable."""
    from pathlib import Path
    from kernels import settings
    for path in Path(settings.__file__).parent.glob("*.py"):
        if path.name != "settings.py":
            assert "os.environ" not in path.read_text(), path.name
    for name in settings.SETTINGS:
        assert settings.variable(name) in settings.__doc__, name


def test_set_autotune_wins_over_the_environment(monkeypatch):
    """kernels.set_autotune(False) launches the default config whatever D2CONV_AUTOTUNE says;
    None hands the choice back to the variable."""
    import kernels
    args = {"x_ptr": torch.empty(1, dtype=torch.bfloat16), "DOT_PRECISION": "ieee", "Cog": 256,
            "SEG": 256}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("D2CONV_AUTOTUNE", "1")
    monkeypatch.delenv("D2CONV_CONFIG_FWD", raising=False)
    assert configs.pinned("FWD", args) is None                      # the autotuner decides
    try:
        kernels.set_autotune(False)
        assert configs.pinned("FWD", args).kwargs == configs.CANDIDATES["FWD"]["16-bit"][0].kwargs
    finally:
        kernels.set_autotune(None)
    assert configs.pinned("FWD", args) is None


def test_data_kernel_tunes_each_set_of_gradients_apart():
    """The data kernel's pick is keyed on which gradients a launch computes: a config tuned for
    the sampled columns alone would otherwise be reused for the whole backward (they differ)."""
    flags = {"NEED_INPUT", "NEED_COORD", "NEED_MASK", "NEED_COLUMN", "FIXED_POINT"}
    assert flags <= set(configs.KEYS["BWD_DATA"])


@pytest.mark.parametrize("dtype, precision, expected", [
    (torch.bfloat16, "ieee", "16-bit"), (torch.float32, "tf32", "tf32"),
    (torch.float32, "tf32x3", "tf32x3"), (torch.float32, "ieee", "ieee")])
def test_prune_keeps_the_precision_class(dtype, precision, expected):
    """Strict fp32 (FMA code) and TF32 get their own small-tile candidates, 16-bit the large ones
    (the Gluon forward takes 16-bit inputs only)."""
    args = {"x_ptr": torch.empty(1, dtype=dtype), "DOT_PRECISION": precision, "Cog": 256,
            "SEG": 256}
    for kernel in [name for name, classes in configs.CANDIDATES.items() if expected in classes]:
        kept = configs.candidates(kernel, args)
        assert [c.kwargs for c in kept] == [c.kwargs for c in configs.CANDIDATES[kernel][expected]]


def test_output_can_be_modified_in_place():
    """The op returns a tensor, not a view of one, so an inplace ReLU after it is allowed."""
    case = Case(N=1, C=4, T=2, H=3, W=4, Co=4, mode="xyz")
    x, size, w, b, m = make_inputs(case)
    out = apply(case, x, size, w, b, m)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    torch.relu_(out).sum().backward()
    assert x.grad is not None


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test, restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_deterministic_mode_policy(deterministic_algorithms):
    """On a GPU in deterministic mode the input gradient is pulled or in fixed point; nothing
    changes on the CPU (the interpreter runs programs one after another) or with the mode off."""
    from kernels.backward import deterministic
    assert deterministic(torch.device("cuda"))
    assert not deterministic(torch.device("cpu"))
    torch.use_deterministic_algorithms(False)
    assert not deterministic(torch.device("cuda"))


@pytest.mark.skipif(DEVICE != "cuda", reason="the deterministic path matters on the GPU")
@pytest.mark.parametrize("input_grad", ["scatter", "pull"])
def test_deterministic_backward_is_bitwise_reproducible(input_grad, deterministic_algorithms,
                                                        monkeypatch):
    """Every gradient, the input's (fixed point, or pulled without atomics) included; fp32
    atomics would differ run to run in their last bits."""
    monkeypatch.setenv("D2CONV_INPUT_GRAD", input_grad)
    case = Case(N=2, C=32, T=3, H=9, W=11, Co=32, mode="xyz")
    x, size, w, b, m = make_inputs(case)
    grad_out = torch.randn_like(apply(case, x, size, w, b, m))

    def grads():
        out = apply(case, x, size, w, b, m)
        return torch.autograd.grad(out, [x, size, w, b, m], grad_out)

    first, second = grads(), grads()
    assert all(torch.equal(a, c) for a, c in zip(first, second))


def test_fp32_precision_choice(monkeypatch):
    """Strict fp32: an IEEE forward unless D2CONV_FP32_DOT picks three TF32 products; TF32 when
    PyTorch allows it; a bad choice is an error naming the variable."""
    from kernels.launch import dot_precision
    monkeypatch.delenv("D2CONV_FP32_DOT", raising=False)
    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("D2CONV_FP32_DOT", "ieee")
    assert dot_precision(torch.float32) == "ieee"
    monkeypatch.setenv("D2CONV_FP32_DOT", "tf32x3")
    assert dot_precision(torch.float32) == "tf32x3"
    monkeypatch.setenv("D2CONV_FP32_DOT", "fast")
    with pytest.raises(ValueError, match="D2CONV_FP32_DOT"):
        dot_precision(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = True     # conftest's ieee_fp32 restores it
    assert dot_precision(torch.float32) == "tf32"
    assert dot_precision(torch.bfloat16) == "ieee"
