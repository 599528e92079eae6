"""The Gluon forward for Hopper (kernels/hopper.py) against the float64 reference, on the Triton
forward's cases (tests/test_kernels.py) with channels that its TMA weight tiles take: groups,
offset groups, stride, padding, dilation, non-cubic kernels, masks, biases, samples on integer
coordinates and outside the volume, more voxels than a tile; bf16 and fp16; NaN-poisoned outputs
and NaN-surrounded inputs. It runs on an sm_90 GPU only (Gluon has no interpreter);
tests/test_compile.py compiles it for sm_90 in CI. Which forward a call takes is tested
everywhere."""
import pytest
import torch
import triton

import kernels
from helpers import DEVICE, apply, make_inputs, nan_padded, random_coords, rel_err
from kernels import configs, forward, settings
from kernels.checks import check_args
from test_kernels import CASES

# every torch.empty / empty_like made during a test starts as NaN (conftest.py)
pytestmark = pytest.mark.usefixtures("poison_empty")

try:
    from kernels import hopper
except (ImportError, AttributeError):     # a Triton without Gluon's Hopper API
    hopper = None

ON_HOPPER = (hopper is not None and DEVICE == "cuda"
             and torch.cuda.get_device_capability() == (9, 0))
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="the Gluon forward runs on sm_90 GPUs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# the Triton forward's cases with 8x the channels: output channels per group a multiple of 8
# (16-byte weight rows for TMA); 7 more rows make the voxels no multiple of any tile
HOPPER_CASES = [case.with_(C=8 * case.C, Co=8 * case.Co, H=case.H + 7) for case in CASES]


def check_forward(case, dtype, coords=None, tol=1e-2):
    x, c, w, b, m = make_inputs(case, dtype, coords=coords)
    inputs = [nan_padded(x, channels_last=True), nan_padded(c), w, b,
              None if m is None else nan_padded(m)]
    with torch.no_grad(), settings.override(forward="gluon"):
        out = apply(case, *inputs)
    ref = apply(case, *[None if t is None else t.detach().cpu().double() for t in inputs],
                impl=kernels.naive)
    error = rel_err(out, ref)
    assert error <= tol, f"relative error {error:.2e} over {tol}"


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", HOPPER_CASES, ids=str)
def test_matches_reference(case, dtype):
    check_forward(case, dtype)


@needs_hopper
@pytest.mark.parametrize("case", [HOPPER_CASES[i] for i in (0, 1, 9, 15)], ids=str)
def test_integer_coordinates(case):
    """Every sample on an integer: offsets rounded, or sizes 2 (a corner weight of exactly 0 or
    1, where a blend that reads the wrong corner still shows)."""
    coords = random_coords(case)
    coords = coords.round() if case.mode == "offset" else torch.full_like(coords, 2.0)
    check_forward(case, torch.bfloat16, coords=coords)


@needs_hopper
@pytest.mark.parametrize("index", range(len(configs.FWD_HOPPER["16-bit"])))
def test_every_config(index):
    """Each candidate config, pinned: 4 and 8 warps (two warpgroups sharing the slots)."""
    config = configs.FWD_HOPPER["16-bit"][index]
    text = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    with settings.override(config_fwd_hopper=f"{text},num_warps={config.num_warps}"):
        check_forward(HOPPER_CASES[1].with_(C=256, Co=256, N=1), torch.bfloat16)


def test_tile_follows_the_output_channels(monkeypatch):
    """Not autotuned: 64x256 tiles where a program has more than 64 output channels, 128x64 ones
    otherwise (the sweep's best at every bench shape); a pinned config wins."""
    def config(Cog):
        return configs.pinned("FWD_HOPPER", {"Cog": Cog, "SEG": 256})
    monkeypatch.setattr(settings, "interpreting", lambda: False)    # as on a GPU
    assert (config(256).kwargs, config(256).num_warps) == (
        dict(BLOCK_M=64, BLOCK_N=256, BLOCK_C=32), 4)
    assert (config(64).kwargs, config(64).num_warps) == (
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_C=32), 4)
    assert config(24).kwargs == dict(BLOCK_M=128, BLOCK_N=32, BLOCK_C=32)
    with settings.override(config_fwd_hopper="BLOCK_M=64,BLOCK_N=128,BLOCK_C=64,num_warps=8"):
        assert config(256).kwargs == dict(BLOCK_M=64, BLOCK_N=128, BLOCK_C=64)


def geometry(dtype, device=DEVICE, Co=16):
    x = torch.zeros(1, 16, 2, 3, 4, dtype=dtype, device=device)
    size = torch.ones(1, 3, 2, 3, 4, dtype=dtype, device=device)
    weight = torch.zeros(Co, 16, 3, 3, 3, dtype=dtype, device=device)
    return check_args(x, size, weight, None, 1, 1, 1, None, 1, "xyz"), x


def test_forward_choice():
    """auto takes the Gluon forward for 16-bit inputs on sm_90 with a tested Triton; triton never
    does; gluon does or says why it cannot."""
    geo, x = geometry(torch.float32)
    with settings.override(forward="triton"):
        assert not forward._gluon(geo, x)
    with settings.override(forward="auto"):
        assert not forward._gluon(geo, x)        # fp32, or a CPU under the interpreter
    with settings.override(forward="gluon"), pytest.raises(ValueError, match="bf16 or fp16"):
        forward._gluon(geo, x)
    geo, x = geometry(torch.bfloat16)
    if ON_HOPPER:
        tested = ".".join(triton.__version__.split(".")[:2]) in hopper.TESTED_TRITON
        with settings.override(forward="auto"):
            assert forward._gluon(geo, x) == tested
        geo, x = geometry(torch.bfloat16, Co=12)
        with settings.override(forward="gluon"), pytest.raises(ValueError, match="multiple of 8"):
            forward._gluon(geo, x)
    elif hopper is not None:
        with settings.override(forward="gluon"), pytest.raises(ValueError, match="sm_90"):
            forward._gluon(geo, x)


def test_forward_setting_names_its_choices(monkeypatch):
    monkeypatch.setenv("D2CONV_FORWARD", "cudnn")
    with pytest.raises(ValueError, match="D2CONV_FORWARD must be one of auto, triton, gluon"):
        settings.forward()


@needs_hopper
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_2d_ops(dtype):
    """deform_conv2d (offsets as (y, x) pairs: t never interpolated, stride, dilation, two
    offset groups) and d2conv2d on the Gluon forward, against the 2D float64 reference."""
    from test_2d import bilinear_reference

    x = torch.randn(2, 64, 13, 17, device=DEVICE)
    w = torch.randn(32, 32, 3, 3, device=DEVICE) / (32 * 9) ** 0.5        # 2 conv groups
    b = torch.randn(32, device=DEVICE)
    offset = torch.randn(2, 2 * 2 * 9, 7, 17, device=DEVICE) * 1.5        # 2 offset groups
    mask = torch.rand(2, 2 * 9, 7, 17, device=DEVICE)
    args = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    ref = bilinear_reference(*(t.cpu().double() for t in (x, offset, w, b)), args["stride"],
                             args["padding"], args["dilation"], mask.cpu().double())
    with torch.no_grad(), settings.override(forward="gluon"):
        out = kernels.deform_conv2d(*(t.to(dtype) for t in (x, offset, w, b)), **args,
                                    mask=mask.to(dtype))
    assert rel_err(out, ref) <= 1e-2
    size = torch.rand(2, 2, 13, 17, device=DEVICE) * 2.5 + 0.5
    d2 = dict(padding=1, groups=2, mode="xy")
    ref = kernels.d2conv2d(*(t.cpu().double() for t in (x, size, w, b)), **d2)
    with torch.no_grad(), settings.override(forward="gluon"):
        out = kernels.d2conv2d(*(t.to(dtype) for t in (x, size, w, b)), **d2)
    assert rel_err(out, ref) <= 1e-2
