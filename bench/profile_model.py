"""Where a training step and inference of the paper model spend the GPU's time, by category.

    PYTHONPATH=. python bench/profile_model.py [--steps 3] [--decoders d2conv-xyz,dense]
                                               [--ops triton,pytorch] [--what train,infer]
                                               [--channels-last] [--graphs] [--no-record]

The model as bench/test_model_speed.py times it: ir-CSN-152 with backbone checkpointing, batch 2
of 8x480x864 clips, bf16 autocast, Adam, gradient clipping; inference: a batch of 4 clips in eval
mode under no_grad (evaluate.py's default --clips-per-batch). ``--ops`` names the variants
measured (``VARIANTS``): ``triton``, the model as it is; ``pytorch``, GroupNorm and the depthwise
convolutions on PyTorch's kernels and the frozen BNs applied after their convolutions (the
model's computation before its Triton kernels); ``unfolded``, only the BNs unfolded; so one
process measures each change; ``--graphs`` replays the training step's forward and backward as
CUDA graphs, as the trainer does on one GPU, and the inference batch as evaluate.py does
(d2conv/graphs.py), each decoder in a process of its own. The kernels' times come from
torch.profiler (CUDA activity), summed per category (``CATEGORIES``) and divided by the steps
profiled; the step's wall time is measured apart, without the profiler. Prints a table per
configuration and writes <gpu>-profile.json among the bench's records (records.py).
"""
import argparse
import contextlib
import re
import time

import torch
import torch.nn.functional as F

import kernels
from d2conv.graphs import GraphedForward, GraphedInference

# (category, pattern on the lower-cased kernel name); the first match wins
CATEGORIES = [
    ("GroupNorm", r"group_?norm|_gn_|rowwisemoments|fusedparams|gammabeta|internalgradients"),
    ("depthwise 3D conv", r"depthwise"),
    ("D²Conv", r"d2conv"),
    ("NCDHW <-> NDHWC copies", r"nchwtonhwc|nhwctonchw"),
    ("cuDNN convolutions", r"fprop|dgrad|wgrad|conv|cudnn|implicit"),
    ("GEMMs", r"gemm|nvjet|cublas"),
    ("optimizer and clipping", r"multi_tensor|foreach"),
    ("copies and casts", r"copy"),
    ("reductions", r"reduce"),
    ("pooling and interpolation", r"pool|upsample|interp"),
    ("elementwise", r"elementwise"),
    ("other", r""),
]


def category(kernel_name):
    """The CATEGORIES entry a CUDA kernel's name falls in."""
    name = kernel_name.lower()
    return next(cat for cat, pattern in CATEGORIES if re.search(pattern, name))


@contextlib.contextmanager
def pytorch_ops():
    """The model's computation before its Triton GroupNorm and depthwise kernels, for a while:
    ``kernels.group_norm`` as F.relu then F.group_norm (fp32 under autocast, as autocast casts
    it), ``kernels.depthwise_conv3d`` as F.conv3d with groups = C, and the frozen BNs applied
    after their convolutions (``unfolded_bn``)."""
    saved = kernels.group_norm, kernels.depthwise_conv3d

    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, relu=False):
        return F.group_norm(F.relu(input) if relu else input, num_groups, weight, bias, eps)

    def depthwise_conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1):
        return F.conv3d(input, weight, bias, stride, padding, dilation, groups=input.shape[1])

    kernels.group_norm, kernels.depthwise_conv3d = group_norm, depthwise_conv3d
    try:
        with unfolded_bn():
            yield
    finally:
        kernels.group_norm, kernels.depthwise_conv3d = saved


@contextlib.contextmanager
def unfolded_bn():
    """The backbone's frozen BNs applied after their convolutions instead of folded into them
    (``d2conv.backbones.conv_norm``), for a while."""
    from d2conv import backbones

    saved = backbones.conv_norm
    backbones.conv_norm = lambda conv, norm, x: norm(conv(x))
    try:
        yield
    finally:
        backbones.conv_norm = saved


# --ops: what each configuration changes of the model as it is ("triton")
VARIANTS = {"triton": contextlib.nullcontext, "unfolded": unfolded_bn, "pytorch": pytorch_ops}


def training_step(model, batch=2, size=(8, 480, 864), graphs=False):
    """A closure running one training step (forward, BCE, backward, clipping, Adam); with
    ``graphs`` the forward and backward replay CUDA graphs (d2conv.graphs, as the trainer runs
    them), captured on the first call."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    clip = torch.rand(batch, 3, *size, device="cuda")
    target = (torch.rand(batch, 1, *size, device="cuda") > 0.5).float()
    clip = clip.contiguous(memory_format=_format(model))
    model.train()
    forward = model

    def step():
        nonlocal forward
        optimizer.zero_grad(set_to_none=True)
        if graphs and forward is model:
            forward = GraphedForward(model, clip, torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(clip)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        return loss
    return step


def inference_step(model, batch=4, size=(8, 480, 864), graphs=False):
    """A closure running the model on a batch of clips in eval mode, as evaluate.py does; with
    ``graphs`` replayed as a CUDA graph (d2conv.graphs.GraphedInference: eager at the first
    call, captured at the second)."""
    clip = torch.rand(batch, 3, *size, device="cuda").contiguous(memory_format=_format(model))
    model.eval()
    forward = GraphedInference(model) if graphs else model

    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return forward(clip)
    return step


def _format(model):
    return (torch.channels_last_3d if getattr(model, "channels_last", False)
            else torch.contiguous_format)


def wall_ms(step, steps):
    """Median milliseconds of ``steps`` synchronised calls of ``step``."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        tick = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - tick) * 1e3)
    return sorted(times)[len(times) // 2]


def kernel_times(step, steps):
    """({category: ms a step}, {kernel name: ms a step}) over ``steps`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_kernel = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.time_range.elapsed_us() / 1e3 / steps
            by_kernel[event.name] = by_kernel.get(event.name, 0.0) + ms
    by_category = {cat: 0.0 for cat, _ in CATEGORIES}
    for name, ms in by_kernel.items():
        by_category[category(name)] += ms
    return by_category, by_kernel


def measure(model, what, steps, graphs=False):
    """One configuration's record: wall ms a step, kernel ms by category, the top kernels;
    ``graphs``: the step's passes replayed as CUDA graphs."""
    step = (training_step if what == "train" else inference_step)(model, graphs=graphs)
    step()
    step()                                   # compiles / tunes the kernels, fills the caches
    torch.cuda.reset_peak_memory_stats()
    ms = wall_ms(step, steps + 2)
    by_category, by_kernel = kernel_times(step, steps)
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]
    return dict(step_ms=ms, kernel_ms=sum(by_kernel.values()),
                peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                # graphs replay into memory reserved at their capture, outside the peak above
                reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                categories={k: round(v, 3) for k, v in by_category.items() if v > 0},
                top_kernels=[[name[:160], round(v, 3)] for name, v in top])


def print_table(rows):
    cats = [c for c, _ in CATEGORIES if any(c in r["categories"] for r in rows)]
    heads = [f"{r['what']} {r['decoder']} {r['ops']}{' cl' if r['channels_last'] else ''}"
             f"{' graphs' if r.get('graphs') else ''}" for r in rows]
    width = max(12, *map(len, heads))
    print(f"{'ms a step':28}" + "".join(f"{h:>{width + 2}}" for h in heads))
    for cat in cats:
        print(f"{cat:28}" + "".join(f"{r['categories'].get(cat, 0):>{width + 2}.1f}"
                                     for r in rows))
    for key, label in (("kernel_ms", "all kernels"), ("step_ms", "wall time"),
                       ("peak_mib", "peak MiB")):
        print(f"{label:28}" + "".join(f"{r[key]:>{width + 2}.1f}" for r in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps profiled (and timed)")
    parser.add_argument("--decoders", default="d2conv-xyz")
    parser.add_argument("--ops", default="triton,pytorch",
                        help="triton: the model as it is; pytorch: GroupNorm and the depthwise "
                             "convolutions on PyTorch's kernels, frozen BN unfolded; unfolded: "
                             "frozen BN unfolded")
    parser.add_argument("--what", default="train,infer")
    parser.add_argument("--channels-last", action="store_true",
                        help="the model's parameters and input in channels_last_3d")
    parser.add_argument("--graphs", action="store_true",
                        help="the training step's forward and backward and the inference "
                             "batch as CUDA graphs (as train.py and evaluate.py run them)")
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()

    decoders = args.decoders.split(",")
    if args.graphs and len(decoders) > 1:
        # a process per decoder: in one process (H100, PyTorch 2.11, 2026-12-06), after the
        # d2conv-xyz model's training and inference captures, the dense model's training capture
        # failed (cudaErrorStreamCaptureInvalidated); each captures in a process of its own
        import subprocess
        import sys

        flags = ["--steps", str(args.steps), "--ops", args.ops, "--what", args.what, "--graphs",
                 *(["--channels-last"] if args.channels_last else []),
                 *(["--no-record"] if args.no_record else [])]
        for decoder in decoders:
            subprocess.run([sys.executable, __file__, *flags, "--decoders", decoder], check=True)
        return

    import triton

    from d2conv.model import EncoderDecoder
    from records import commit, gpu_name, merge

    rows = []
    for decoder in decoders:
        torch.manual_seed(0)
        model = EncoderDecoder("ir_csn_152", decoder, checkpoint=True).cuda()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
            model.channels_last = True
        for what in args.what.split(","):
            for ops in args.ops.split(","):
                with VARIANTS[ops]():
                    graphs = args.graphs
                    row = dict(what=what, decoder=decoder, ops=ops,
                               channels_last=args.channels_last,
                               **({"graphs": True} if graphs else {}),
                               **measure(model, what, args.steps, graphs))
                rows.append(row)
                print(f"{what} {decoder} {ops}: {row['step_ms']:.1f} ms a step", flush=True)
        del model
        torch.cuda.empty_cache()
    print_table(rows)
    if args.no_record:
        return
    gpu = gpu_name()
    for row in rows:
        batch = "train: batch 2 of 8x480x864" if row["what"] == "train" else "infer: 4 clips"
        merge(f"{gpu}-profile.json",
              dict(gpu=gpu, **row, shape=batch, torch=torch.__version__,
                   triton=triton.__version__, date=time.strftime("%Y-%m-%d"), commit=commit()),
              key=("what", "decoder", "ops", "channels_last", "graphs", "commit"))
    print(f"wrote {gpu}-profile.json")


if __name__ == "__main__":
    main()
