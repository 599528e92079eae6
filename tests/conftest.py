"""Test setup: without a GPU the Triton kernels run under the Triton interpreter, which has to be
chosen before Triton is imported; autotuning is off so each test compiles one config."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("D2CONV_AUTOTUNE", "0")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silence Triton 3.9's notice


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 comparisons with F.conv3d need cuDNN without TF32 (PyTorch's default allows it)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def reference_on_cpu(monkeypatch):
    """Layer and model tests on CPU use the PyTorch reference (fast) rather than the kernels
    under the interpreter (tested on their own in tests/test_kernels.py)."""
    if not torch.cuda.is_available():
        # the dispatch, not TRITON_INTERPRET: Triton reads that variable once, and a module it
        # first decorates while the variable is 0 would not run under the interpreter later
        import kernels
        monkeypatch.setattr(kernels, "_use_triton", lambda input: input.device.type == "meta")


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty / empty_like made during a test starts as NaN, so that outputs a kernel
    leaves unwritten show up."""
    # a ``with torch.device(...)`` block redirects the constructors it lists on its first use,
    # cached: list the real ones before they are replaced, or later blocks miss torch.empty
    from torch.utils import _device

    _device._device_constructors()
    empty, empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    def nan_empty_like(*args, **kwargs):
        t = empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
