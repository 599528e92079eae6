"""Shared pieces of the tests: for the kernels a case description, fresh random inputs, the
float64 reference, NaN-surrounded storage and relative errors; for the command lines the check of
a bad-input message."""
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import kernels
from kernels import naive
from kernels.checks import SIZE_CHANNELS, output_size, triple

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


def compiled_run(*command):
    """The output lines of ``python *command`` run in the repository's root with the Triton
    interpreter off, as the sm_90 compile checks need it (Triton reads TRITON_INTERPRET once, at
    import, so a test process under the interpreter cannot compile itself); a non-zero exit fails
    the test with its stderr."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()


@dataclass(frozen=True)
class Case:
    N: int = 2
    C: int = 8
    T: int = 3
    H: int = 5
    W: int = 6
    Co: int = 8
    kernel: tuple = (3, 3, 3)
    stride: object = 1
    padding: object = 1
    dilation: object = 1
    groups: int = 1
    G: int = 1                      # offset groups
    mode: str = "offset"            # "offset" (deform_conv3d) or a D²Conv mode
    mask: bool = True
    bias: bool = True
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def __str__(self):
        k = "".join(map(str, self.kernel))
        parts = [f"N{self.N}-C{self.C}-T{self.T}-H{self.H}-W{self.W}-Co{self.Co}-k{k}", self.mode]
        for name, default in (("stride", 1), ("padding", 1), ("dilation", 1), ("groups", 1),
                              ("G", 1)):
            value = getattr(self, name)
            if value != default:
                parts.append(f"{name[0] if name != 'G' else 'G'}{value}".replace(" ", ""))
        if not self.mask:
            parts.append("nomask")
        if not self.bias:
            parts.append("nobias")
        return "-".join(parts)

    with_ = replace

    @property
    def K(self):
        return math.prod(self.kernel)

    @property
    def out(self):
        return output_size((self.T, self.H, self.W), self.kernel, triple(self.stride, "stride"),
                           triple(self.padding, "padding"), triple(self.dilation, "dilation"))

    @property
    def conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)


def random_coords(case, device=DEVICE, dtype=torch.float32):
    """Fresh offsets (about +-2 voxels, some samples outside) or sizes in [0.5, 3]."""
    if case.mode == "offset":
        return torch.randn(case.N, case.G * case.K * 3, *case.out, device=device, dtype=dtype) * 1.5
    c = SIZE_CHANNELS[case.mode]
    return torch.rand(case.N, case.G * c, *case.out, device=device, dtype=dtype) * 2.5 + 0.5


def make_inputs(case, dtype=torch.float32, device=DEVICE, coords=None):
    """(input, coords, weight, bias, mask) with fresh random values, requiring grad."""
    fan_in = case.C // case.groups * case.K
    x = torch.randn(case.N, case.C, case.T, case.H, case.W, device=device)
    w = torch.randn(case.Co, case.C // case.groups, *case.kernel, device=device) / fan_in ** 0.5
    b = torch.randn(case.Co, device=device) if case.bias else None
    m = torch.rand(case.N, case.G * case.K, *case.out, device=device) if case.mask else None
    coords = random_coords(case, device) if coords is None else coords.to(device)
    tensors = [x, coords, w, b, m]
    return [None if t is None else t.to(dtype).requires_grad_() for t in tensors]


def apply(case, x, coords, w, b, m, impl=kernels):
    if case.mode == "offset":
        return impl.deform_conv3d(x, coords, w, b, mask=m, **case.conv_kwargs)
    return impl.d2conv3d(x, coords, w, b, mask=m, mode=case.mode, **case.conv_kwargs)


def nan_padded(t, channels_last=False):
    """A copy of t whose storage is surrounded by NaN, so out-of-bounds reads show up."""
    requires_grad, t = t.requires_grad, t.detach()
    if channels_last:
        inner = t.permute(0, 2, 3, 4, 1).contiguous()
    else:
        inner = t.contiguous()
    pad = 4096
    buf = torch.full((inner.numel() + 2 * pad,), float("nan"), device=t.device, dtype=t.dtype)
    view = buf[pad:pad + inner.numel()].view(inner.shape)
    view.copy_(inner)
    if channels_last:
        view = view.permute(0, 4, 1, 2, 3)
    return view.requires_grad_(requires_grad)


def reference(case, inputs, grad_out):
    """Float64 reference output and gradients (None where an input is None)."""
    ref_in = [None if t is None else t.detach().cpu().double().requires_grad_() for t in inputs]
    out = apply(case, *ref_in, impl=naive)
    present = [t for t in ref_in if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out.detach().cpu().double()))
    return out, [None if t is None else next(grads) for t in ref_in]


def run(case, inputs, grad_out=None):
    """Output and gradients of the implementation under test (kernels.*)."""
    out = apply(case, *inputs)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad_out))
    return out, [None if t is None else next(grads) for t in inputs], grad_out


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


NAMES = ("input", "coords", "weight", "bias", "mask")


def one_line_error(capsys, *names):
    """A command line's stderr after bad input: one line, no traceback, naming every one of
    ``names``."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and all(str(n) in err for n in names), err
    return err
