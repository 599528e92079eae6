"""The bench scripts' kernel variants stay in step with the kernels: bench/ablate.py builds them
by editing a copy of kernels/, and the variants meant to give the same result must give it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# in a process of its own: bench/ablate.py imports bench/test_kernels.py as "test_kernels", a
# name the test suite's own test_kernels.py takes here
_CHECK = """
import importlib, sys, tempfile, torch, triton
sys.path.insert(0, "bench")
import ablate
from kernels import naive
name, dtype = sys.argv[1], getattr(torch, sys.argv[3])
# TF32 products take the weight with its channels contiguous (forward.kernel_args: W_C_MAJOR)
torch.backends.cuda.matmul.allow_tf32 = sys.argv[4] == "tf32"
variant = ablate.variant(name, tempfile.mkdtemp())
checks = importlib.import_module(variant.__name__ + ".checks")
forward = importlib.import_module(variant.__name__ + ".forward")
dev = "cuda" if torch.cuda.is_available() else "cpu"
if dev == "cuda":
    triton.set_allocator(lambda size, alignment, stream:
                         torch.empty(size, device="cuda", dtype=torch.int8))
torch.manual_seed(int(sys.argv[2]))
# 48 channels in 2 groups: a channel block that runs past its segment into the next kernel point
N, C, Co, T, H, W, groups = 2, 48, 32, 3, 4, 5, 2
x = torch.randn(N, C, T, H, W, device=dev).to(dtype)
w = (torch.randn(Co, C // groups, 3, 3, 3, device=dev) * 0.1).to(dtype)
size = (torch.rand(N, 3, T, H, W, device=dev) * 2.5 + 0.5).to(dtype)
mask = torch.rand(N, 27, T, H, W, device=dev).to(dtype)
geo = checks.check_args(x, size, w, None, 1, 1, 1, mask, groups, "xyz")
out = forward.d2conv_fwd(geo, x, size, w, None, mask, "xyz").double().cpu()
ref = naive.d2conv3d(*(t.double().cpu() for t in (x, size, w)), None, padding=1,
                     mask=mask.double().cpu(), groups=groups)
print(((out - ref).abs().max() / ref.abs().max()).item())
"""


@pytest.mark.parametrize("dtype, products", [("float16", "16-bit"), ("float32", "tf32")])
def test_tma_weight_variant_gives_the_forward(dtype, products):
    """Both weight layouts: (K * C, Cog) tiles for 16-bit products, (K * Co, Cg) transposed in
    shared memory for TF32."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    seed = str(int.from_bytes(os.urandom(2), "little"))
    result = subprocess.run([sys.executable, "-c", _CHECK, "tma-weights", seed, dtype, products],
                            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    error = float(result.stdout.split()[-1])
    tolerance = 2e-3 if products == "16-bit" else 5e-3
    assert error < tolerance, f"tma-weights forward off the reference by {error:.1e} (seed {seed})"
