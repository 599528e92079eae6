"""Inference throughput of the paper model on 480×854 videos, clips every 5 frames and every frame.

    PYTHONPATH=. python bench/inference.py [--frames 69] [--videos 20] [--out DIR]

Weights are random (throughput does not depend on them); the videos are procedural (the
synthetic generator at 480×854, padded to 480×864 as DAVIS frames are), by default as many as
DAVIS-2016 val has, of its mean length, so that the end-to-end run's start (the first video's
decoding) and end (the last one's PNGs) weigh what they weigh there. After one warm-up video
it times, per decoder and gap (clip spacing; the evaluation protocol, docs/davis.md, uses 5):
- the model alone: frames already decoded in (pinned) memory, logits out, synchronised;
- end to end: ``evaluate.py``'s path (``d2conv.evaluation.run_model``), reading the JPEGs and
  writing the PNG masks, which overlaps both with the model on threads (``model_s``: the time
  inside it that the model took);
and writes ``<gpu>-inference.json`` among the bench's records (records.py) on a GPU. On a GPU
the model runs as evaluate.py runs it, its clip batches replayed as CUDA graphs
(``d2conv.graphs.GraphedInference``, captured while the warm-up video runs twice);
``--graphs on,off`` times it eagerly too.
``--ops`` names the model variants timed (profile_model.VARIANTS: ``triton``, the model as
evaluate.py runs it, channels-last-3d on a GPU through ``d2conv.model.to_device``; ``pytorch``,
its GroupNorm and depthwise convolutions on PyTorch's kernels, contiguous, as before its Triton
ones), each with every decoder and gap.
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
import triton

from d2conv.data import davis_sequences
from d2conv.data.synthetic import generate
from d2conv.evaluation import read_frames, run_model
from d2conv.graphs import GraphedInference
from d2conv.inference import predict_video
from d2conv.model import EncoderDecoder, to_device
from kernels import settings
from profile_model import VARIANTS
from records import commit, gpu_name, write


def model_alone(model, videos, gap, clips_per_batch, amp):
    """Frames per second of the model on decoded frames (uint8, in memory)."""
    frames, seconds = 0, 0.0
    for video in videos:
        tick = time.perf_counter()
        predict_video(model, video, 8, gap, clips_per_batch, amp)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - tick
        frames += len(video)
    return frames / seconds


def time_decoder(args, decoder, ops, graphs, warm, timed, decoded, root, amp, gpu):
    """The records of one decoder and model variant, eager or replayed, at every gap."""
    cuda = torch.cuda.is_available()
    height, width = map(int, args.size.split("x"))
    records = []
    model = EncoderDecoder(args.backbone, decoder, mdim=256)
    channels_last = cuda and ops != "pytorch"
    model = (to_device(model, "cuda") if channels_last else model.to("cuda" if cuda else "cpu"))
    model.eval()
    graphs = graphs and cuda
    for gap in map(int, args.gaps.split(",")):
        out = root / f"{decoder}-{ops}-{gap}"
        forward = GraphedInference(model) if graphs else model      # one per gap: its shapes
        for _ in range(2):          # a shape is captured at its second batch
            run_model(forward, warm, out, gap=gap, clips_per_batch=args.clips_per_batch,
                      amp_dtype=amp)
        alone = model_alone(forward, decoded, gap, args.clips_per_batch, amp)
        t = run_model(forward, timed, out, gap=gap, clips_per_batch=args.clips_per_batch,
                      amp_dtype=amp)
        records.append(dict(gpu=gpu, decoder=decoder, ops=ops, channels_last=channels_last,
                            cuda_graphs=graphs, gap=gap, frames=t["frames"],
                            height=height, width=width, clips_per_batch=args.clips_per_batch,
                            model_fps=alone, end_to_end_fps=t["frames"] / t["total_s"],
                            model_s=t["model_s"], total_s=t["total_s"],
                            peak_mib=t["peak_mib"] or 0,
                            # a replayed graph's memory is reserved, not allocated, while it runs
                            reserved_mib=torch.cuda.max_memory_reserved() / 2**20 if cuda else 0,
                            torch=torch.__version__,
                            triton=triton.__version__, autotuned=settings.autotune(),
                            commit=commit(), date=time.strftime("%Y-%m-%d")))
        del forward
        print(records[-1], flush=True)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the defaults: DAVIS-2016 val's size (20 videos, 1,376 frames)
    parser.add_argument("--frames", type=int, default=69, help="frames per video")
    parser.add_argument("--videos", type=int, default=20, help="videos timed")
    parser.add_argument("--clips-per-batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--decoders", default="d2conv-xyz,dense")
    parser.add_argument("--gaps", default="5,1", help="clip spacings timed")
    parser.add_argument("--backbone", default="ir_csn_152")
    parser.add_argument("--size", default="480x854", help="frame HxW")
    parser.add_argument("--ops", default="triton", help=f"model variants: {', '.join(VARIANTS)}")
    parser.add_argument("--graphs", default="on", help="on, off or on,off: the model replayed "
                                                       "as CUDA graphs, eagerly, or both")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    amp = torch.bfloat16 if cuda else None
    gpu = gpu_name() if cuda else "cpu"
    height, width = map(int, args.size.split("x"))
    root = Path(args.out or tempfile.mkdtemp())
    tick = time.time()
    generate(root / "data", n_train=1, n_val=args.videos + 1, frames=args.frames,
             height=height, width=width, seed=0)
    print(f"generated {args.videos + 1} videos of {args.frames} frames in "
          f"{time.time() - tick:.0f} s", flush=True)
    sequences = davis_sequences(root / "data", "val", 2016)
    warm, timed = sequences[:1], sequences[1:]
    decoded = [read_frames(seq) for seq in timed]
    if cuda:                        # as evaluate.py's path holds them (segment_videos)
        decoded = [frames.pin_memory() for frames in decoded]

    records = []
    for ops in args.ops.split(","):
        with VARIANTS[ops]():
            for decoder in args.decoders.split(","):
                for graphs in args.graphs.split(","):
                    records += time_decoder(args, decoder, ops, graphs == "on", warm, timed,
                                            decoded, root, amp, gpu)
    print(f"\n{gpu}, {args.backbone}, 8-frame clips of {args.size}, bf16 on the GPU")
    print(f"{'decoder':12} {'ops':8} {'graphs':>6} {'gap':>3} {'model fps':>10} "
          f"{'end-to-end fps':>15} {'ratio':>6} {'its model fps':>14} {'reserved MiB':>13}")
    for r in records:
        print(f"{r['decoder']:12} {r['ops']:8} {'on' if r['cuda_graphs'] else 'off':>6} "
              f"{r['gap']:>3} {r['model_fps']:>10.1f} {r['end_to_end_fps']:>15.1f} "
              f"{r['end_to_end_fps'] / r['model_fps']:>6.2f} "
              f"{r['frames'] / r['model_s']:>14.1f} {r['reserved_mib']:>13.0f}")
    if not cuda:
        return
    what = (f"{gpu}, one process, random-weight {args.backbone} model, {args.videos} timed "
            f"videos of {args.frames} frames at {args.size} after a warm-up video; model_fps: "
            f"the model alone on decoded frames; end_to_end_fps: evaluate.py's whole path")
    path = write(f"{gpu}-inference.json", {"what": what, "records": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
