"""One device call: correctness of a few cases against the float64 reference, then rf2 and
rf2_in512 timings (bf16, xyz, mask) against cuDNN and the split of the backward by kernel.

    PYTHONPATH=. python bench/quick.py      # CHECK=0 skips the correctness part, TUNE=0 autotuning
"""
import os, time, torch
import torch.nn.functional as F
import triton
import kernels
from kernels import naive
torch.manual_seed(0)
dev = "cuda"
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)

def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

def case(N, C, T, H, W, Co, k, mode, dtype, groups=1, G=1, stride=1, padding=None, dilation=1, mask=True, bias=True):
    padding = tuple(kk // 2 for kk in k) if padding is None else padding
    x = torch.randn(N, C, T, H, W, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(Co, C // groups, *k, device=dev) / (C // groups * k[0]*k[1]*k[2]) ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(Co, device=dev).to(dtype).requires_grad_() if bias else None
    from kernels.checks import output_size, triple
    out_sz = output_size((T, H, W), k, triple(stride, "s"), triple(padding, "p"), triple(dilation, "d"))
    K = k[0]*k[1]*k[2]
    if mode == "offset":
        c = (torch.randn(N, G*K*3, *out_sz, device=dev) * 2).to(dtype).requires_grad_()
    else:
        c = (torch.rand(N, G*kernels.SIZE_CHANNELS[mode], *out_sz, device=dev) * 2.5 + 0.5).to(dtype).requires_grad_()
    m = torch.rand(N, G*K, *out_sz, device=dev).to(dtype).requires_grad_() if mask else None
    ins = [t for t in (x, c, w, b, m) if t is not None]
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if mode == "offset":
        out = kernels.deform_conv3d(x, c, w, b, mask=m, **kw)
    else:
        out = kernels.d2conv3d(x, c, w, b, mask=m, mode=mode, **kw)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, ins, go)
    d = [t.detach().double().cpu().requires_grad_() for t in ins]
    dx, dc, dw = d[:3]; db = d[3] if bias else None; dm = d[-1] if mask else None
    if mode == "offset":
        ref = naive.deform_conv3d(dx, dc, dw, db, mask=dm, **kw)
    else:
        ref = naive.d2conv3d(dx, dc, dw, db, mask=dm, mode=mode, **kw)
    rgrads = torch.autograd.grad(ref, d, go.double().cpu())
    errs = [rel(out.cpu(), ref)] + [rel(g.cpu(), r) for g, r in zip(grads, rgrads)]
    return errs

os.environ["D2CONV_AUTOTUNE"] = "0"   # correctness with the default configs (one compile each)
cases = [
    dict(N=2, C=32, T=3, H=9, W=11, Co=48, k=(3,3,3), mode="xyz"),
    dict(N=2, C=32, T=3, H=9, W=11, Co=48, k=(3,3,3), mode="offset"),
    dict(N=1, C=24, T=4, H=7, W=10, Co=20, k=(3,3,3), mode="x", groups=2, G=3),
    dict(N=1, C=16, T=1, H=8, W=9, Co=16, k=(1,7,1), mode="xy", bias=False),
    dict(N=2, C=16, T=5, H=8, W=9, Co=24, k=(3,3,3), mode="xxz", stride=2, dilation=2, padding=2, mask=False),
]
for dtype in (torch.float32, torch.bfloat16) if os.environ.get("CHECK", "1") == "1" else ():
    for cs in cases:
        t0 = time.time()
        errs = case(**cs, dtype=dtype)
        print(f"{str(dtype):15s} {cs}  " + " ".join(f"{e:.1e}" for e in errs) + f"  ({time.time()-t0:.1f}s)", flush=True)

os.environ["D2CONV_AUTOTUNE"] = os.environ.get("TUNE", "1")
# timings at rf2 (SPEC §2 with W=108), bf16, xyz with mask
def bench(fn, ms=None):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
N, C, T, H, W, Co = 2, 256, 4, 60, 108, 256
for shape_name, C in (("rf2", 256), ("rf2_in512", 512)):
    x = torch.randn(N, C, T, H, W, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d).requires_grad_()
    w = (torch.randn(Co, C, 3, 3, 3, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
    b = torch.zeros(Co, device=dev, dtype=torch.bfloat16).requires_grad_()
    s = (torch.rand(N, 3, T, H, W, device=dev) * 2.5 + 0.5).to(torch.bfloat16).requires_grad_()
    m = torch.rand(N, 27, T, H, W, device=dev, dtype=torch.bfloat16).requires_grad_()
    wd = w.detach().to(memory_format=torch.channels_last_3d).requires_grad_()
    go = torch.randn(N, Co, T, H, W, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last_3d)
    t0 = time.time()
    out = kernels.d2conv3d(x, s, w, b, padding=1, mask=m)
    out.backward(go)
    torch.cuda.synchronize(); print(f"{shape_name}: first call (autotune) {time.time()-t0:.0f}s", flush=True)
    dense_f = bench(lambda: F.conv3d(x, wd, b, padding=1))
    dense_fb = bench(lambda: torch.autograd.grad(F.conv3d(x, wd, b, padding=1), [x, wd, b], go))
    d2_f = bench(lambda: kernels.d2conv3d(x, s, w, b, padding=1, mask=m))
    d2_fb = bench(lambda: torch.autograd.grad(kernels.d2conv3d(x, s, w, b, padding=1, mask=m), [x, s, w, b, m], go))
    print(f"{shape_name} bf16: dense fwd {dense_f:.3f} fwdbwd {dense_fb:.3f} | d2conv fwd {d2_f:.3f} ({d2_f/dense_f:.2f}x) fwdbwd {d2_fb:.3f} ({d2_fb/dense_fb:.2f}x)", flush=True)
    # per-kernel split of the backward
    from kernels.backward import d2conv_bwd
    from kernels.checks import check_args
    geo = check_args(x, s, w, b, 1, 1, 1, m, 1, "xyz")
    t_data = bench(lambda: d2conv_bwd(geo, go, x, s, w, m, "xyz", False, True, True, True, False))
    t_data_noin = bench(lambda: d2conv_bwd(geo, go, x, s, w, m, "xyz", False, False, True, True, False))
    t_w = bench(lambda: d2conv_bwd(geo, go, x, s, w, m, "xyz", True, False, False, False, True))
    t_all = bench(lambda: d2conv_bwd(geo, go, x, s, w, m, "xyz", True, True, True, True, True))
    print(f"{shape_name} bwd split: data {t_data:.3f} (without input grad {t_data_noin:.3f}) "
          f"weight only (columns + GEMMs) {t_w:.3f} all gradients {t_all:.3f}", flush=True)
