"""DAVIS-style evaluation (docs/davis.md): segmenting whole videos with a model, writing and
reading result masks, and scoring them against the DAVIS-2016 ground truth.

One path serves ``evaluate.py`` and the trainer's validation: :func:`segment_videos` runs the
model over each video (clips every ``gap`` frames), :func:`score_sequence` scores one video's
masks, :func:`summary` gives the numbers both print, so the two agree for the same checkpoint.

Results layout, as the official DAVIS evaluation reads it: ``<results>/<sequence>/<frame>.png``,
one indexed PNG per ground-truth frame, 0 background and 1 foreground.
"""
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from .data import davis_sequences, load_mask, read_frames
from .errors import BadInput, MissingInput
from .graphs import GraphedInference
from .inference import clip_windows, predict_video, segment
from .layers import D2Conv3d
from .metrics import davis_scores, sequence_measures
from .model import pad_to_multiple
from .progress import interactive, progress

PALETTE = [0, 0, 0, 128, 0, 0] + [0] * (256 * 3 - 6)   # DAVIS colours: black, dark red
DILATION_RANGE = (0.5, 3.0)                             # the colour map's ends (log scale)


def write_mask(path, mask):
    """Save a bool (H, W) mask as an indexed PNG with values 0 / 1."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(PALETTE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_prediction(path):
    """A predicted mask as bool (H, W): any value > 0 is foreground (indexed, grayscale 0/1 or
    0/255, RGB with black background all work)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"missing prediction {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except Exception as error:
        raise BadInput(f"cannot read prediction {path}: {error}") from error
    return (array.max(axis=-1) if array.ndim == 3 else array) > 0


def segment_videos(model, sequences, clip_len=8, gap=5, clips_per_batch=4, amp_dtype=None,
                   size=None, workers=4):
    """For each sequence, (sequence, frames uint8 (N, 3, H, W), logits (N, H, W) on the model's
    device, masks bool (N, H, W) on the CPU, model seconds): the model over clips every ``gap``
    frames at ``size`` (None: the frames' own). The next sequence's JPEGs decode on ``workers``
    threads while the model runs, into pinned memory for a GPU model (its copy to the GPU then
    leaves the host free). On a GPU a video is yielded once the next one's clips are queued, so
    that its masks come back and are written while the GPU runs on; its model seconds are then
    the GPU's, between events recorded around its clips.
    """
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    model.eval()

    def load(seq):
        frames = read_frames(seq, pool=decode)
        return frames.pin_memory() if cuda else frames

    def launch(seq, frames):
        """Queue the model over one video; returns what waits for it and gives its tuple."""
        if not cuda:
            tick = time.perf_counter()
            logits = predict_video(model, frames, clip_len, gap, clips_per_batch, amp_dtype,
                                   size)
            done = (seq, frames, logits, segment(logits), time.perf_counter() - tick)
            return lambda: done
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        logits = predict_video(model, frames, clip_len, gap, clips_per_batch, amp_dtype, size)
        end.record()
        masks = torch.empty(logits.shape, dtype=torch.bool, pin_memory=True)
        masks.copy_(segment(logits), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def finish():
            copied.synchronize()
            return seq, frames, logits, masks, start.elapsed_time(end) / 1e3
        return finish

    with ThreadPoolExecutor(workers) as decode, ThreadPoolExecutor(1) as ahead:
        upcoming = ahead.submit(load, sequences[0]) if sequences else None
        pending = None
        for k, seq in enumerate(sequences):
            frames = upcoming.result()
            if k + 1 < len(sequences):
                upcoming = ahead.submit(load, sequences[k + 1])
            queued = launch(seq, frames)
            if pending is not None:
                yield pending()
            pending = queued
        if pending is not None:
            yield pending()


def protocol_sequences(davis_root, split="val"):
    """The sequences of image set ``split`` with the DAVIS-2016 ground truth the protocol scores
    (``ImageSets/2016`` of a DAVIS-2017 root, ``ImageSets/480p`` of the DAVIS-2016 release)."""
    return davis_sequences(davis_root, split, 2016, masks="davis2016")


def scored_frames(seq, task="unsupervised"):
    """Indices of the frames a task scores: every annotated one ("unsupervised"), without the
    first and the last ("semi-supervised")."""
    if task not in ("unsupervised", "semi-supervised"):
        raise ValueError(f"task must be 'unsupervised' or 'semi-supervised', got {task!r}")
    frames = [i for i, m in enumerate(seq.masks) if m is not None]
    return frames[1:-1] if task == "semi-supervised" else frames


def score_sequence(pred, seq, frames):
    """{"J": (n,), "F": (n,)} of the masks ``pred`` (n, H, W) of ``seq``'s frames ``frames``
    (n indices) against its ground truth."""
    gt = np.stack([load_mask(seq.masks[i]) for i in frames])
    pred = np.asarray(pred)
    if pred.shape != gt.shape:
        raise BadInput(f"sequence {seq.name!r}: masks are {pred.shape[2]}x{pred.shape[1]}, its "
                       f"ground truth {gt.shape[2]}x{gt.shape[1]}")
    return sequence_measures(pred, gt)


def summary(per_sequence):
    """{"iou", "J&F", "J", "F"} of ``{sequence: {"J", "F"}}``: the foreground IoU is J averaged
    over every frame, the others are the DAVIS global means over sequences."""
    global_row, _ = davis_scores(per_sequence)
    frames = np.concatenate([np.asarray(m["J"], dtype=np.float64) for m in per_sequence.values()])
    return {"iou": float(frames.mean()), "J&F": global_row["J&F-Mean"],
            "J": global_row["J-Mean"], "F": global_row["F-Mean"]}


@torch.no_grad()
def validate(model, sequences, clip_len=8, gap=5, amp_dtype=None, size=None):
    """``summary`` of the model's masks on ``sequences`` (with their DAVIS-2016 ground truth),
    by the evaluation protocol; nothing is written."""
    per_sequence = {}
    for seq, _, _, masks, _ in segment_videos(model, sequences, clip_len, gap,
                                              amp_dtype=amp_dtype, size=size):
        frames = scored_frames(seq)
        per_sequence[seq.name] = score_sequence(masks[frames].numpy(), seq, frames)
    return summary(per_sequence)


def evaluate_results(davis_root, results, split="val", task="unsupervised"):
    """Score ``results`` (``<sequence>/<frame>.png``) against the DAVIS-2016 ground truth
    (``Annotations/480p`` binarised, either DAVIS layout).

    task: "unsupervised" scores every annotated frame; "semi-supervised" drops the first and last.
    Returns (global_row, per_sequence_rows, per_sequence measures) as ``metrics.davis_scores``
    gives the first two.
    """
    results = Path(results)
    if not results.is_dir():
        raise MissingInput(f"no results folder {results}")
    per_sequence = {}
    for seq in progress(protocol_sequences(davis_root, split), desc="score", leave=False):
        if not (results / seq.name).is_dir():
            raise MissingInput(f"no results for sequence {seq.name!r}: no folder "
                               f"{results / seq.name}")
        frames = scored_frames(seq, task)
        pred = [read_prediction(results / seq.name / f"{Path(seq.masks[i]).stem}.png")
                for i in frames]
        shapes = {m.shape for m in pred}
        if len(shapes) > 1:
            raise BadInput(f"{results / seq.name}: masks of several sizes {sorted(shapes)}")
        per_sequence[seq.name] = score_sequence(np.stack(pred), seq, frames)
    global_row, rows = davis_scores(per_sequence)
    return global_row, rows, per_sequence


def scale_position(values, low=DILATION_RANGE[0], high=DILATION_RANGE[1]):
    """Where a scale s falls on the colour map, in [0, 1]: log-linear from ``low`` (0) to 1
    (0.5, the middle) and from 1 to ``high`` (1), so the plain grid is the middle whatever the
    range."""
    log = np.log(np.asarray(values, dtype=np.float64))
    return np.clip(np.where(log < 0, 0.5 - 0.5 * log / math.log(low),
                            0.5 + 0.5 * log / math.log(high)), 0, 1)


def position_scale(t, low=DILATION_RANGE[0], high=DILATION_RANGE[1]):
    """The scale at position ``t`` of the colour map (the inverse of ``scale_position``)."""
    t = np.asarray(t, dtype=np.float64)
    return np.exp(np.where(t < 0.5, (1 - 2 * t) * math.log(low), (2 * t - 1) * math.log(high)))


def colormap(values):
    """Scale map (H, W) -> uint8 RGB (H, W, 3): blue (narrowed, s <= 0.5) through pure green
    (s = 1, the plain grid) to red (widened, s >= 3), log-linear on each side of 1."""
    t = scale_position(values)
    rgb = np.stack([np.clip(2 * t - 1, 0, 1), 1 - np.abs(2 * t - 1), np.clip(1 - 2 * t, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def write_dilation_legend(path, ticks=(0.5, 0.75, 1, 1.5, 2, 3)):
    """A colour bar of ``colormap`` with its scale values, as a PNG."""
    width, bar, margin = 360, 24, 14
    values = position_scale(np.linspace(0, 1, width))
    image = Image.new("RGB", (width + 2 * margin, bar + 44), "white")
    image.paste(Image.fromarray(np.repeat(colormap(values)[None], bar, 0)), (margin, 4))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for v in ticks:
        x = margin + round(float(scale_position(v)) * (width - 1))
        draw.line([(x, bar + 4), (x, bar + 9)], fill="black")
        label = f"{v:g}"
        draw.text((x - draw.textlength(label, font=font) / 2, bar + 11), label, fill="black",
                  font=font)
    draw.text((margin, bar + 27), "dilation scale s (mean over its axes; 1 = plain grid)",
              fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@torch.no_grad()
def dilation_maps(model, frames, clip_len=8, amp_dtype=None):
    """The mean size map of every D2Conv3d layer for every frame.

    frames: (N, 3, H, W) float in [0, 1] on the model's device. Returns {layer name: (N, H, W)
    float32}: each layer's scales (mean over its size channels) upsampled to the frame, from the
    clips starting every ``clip_len`` frames (the last one ending at the last frame).
    """
    if isinstance(model, GraphedInference):     # replays would not call the hooks
        model = model.model
    layers = {name: m for name, m in model.named_modules() if isinstance(m, D2Conv3d)}
    captured, hooks = {}, []
    for name, layer in layers.items():
        def hook(module, inputs, output, name=name):
            size, _ = module.sizes(inputs[0])
            captured[name] = size.float().mean(1, keepdim=True)
        hooks.append(layer.register_forward_hook(hook))
    device = next(model.parameters()).device
    N, _, H, W = frames.shape
    maps = {name: torch.zeros(N, H, W) for name in layers}
    try:
        for index in clip_windows(N, clip_len, clip_len):
            clip = rearrange(frames[index], "t c h w -> 1 c t h w").to(device)
            clip, (rows, cols) = pad_to_multiple(clip)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(clip)
            for name, size in captured.items():
                up = torch.nn.functional.interpolate(size, size=clip.shape[2:], mode="trilinear")
                maps[name][index] = up[0, 0, :, rows, cols].cpu()
    finally:
        for h in hooks:
            h.remove()
    return maps


def run_model(model, sequences, out, clip_len=8, gap=5, clips_per_batch=4, amp_dtype=None,
              size=None, save_logits=False, save_probabilities=False, save_dilation=False,
              workers=4):
    """Segment every frame of every sequence into ``out/<sequence>/<frame>.png``.

    Optional: ``out/logits/<sequence>.npy`` (float16 (N, H, W)), ``out/probabilities/<sequence>/
    <frame>.png`` (uint8 probability x 255), ``out/dilation/<layer>/<sequence>/<frame>.png`` with
    the colour bar ``out/dilation/legend.png``. JPEG decoding and PNG writing run on ``workers``
    threads each, beside the model. Returns timing: frames, model seconds (inference only),
    total seconds, peak GPU MiB.
    """
    out = Path(out)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames_done, model_s, start = 0, 0.0, time.perf_counter()
    if save_dilation:
        write_dilation_legend(out / "dilation" / "legend.png")
    bar = progress(total=sum(len(s) for s in sequences), desc="segment", unit="frame")
    with ThreadPoolExecutor(workers) as write:
        writing = []                                    # the previous video's files
        for seq, frames, logits, masks, seconds in segment_videos(
                model, sequences, clip_len, gap, clips_per_batch, amp_dtype, size, workers):
            model_s += seconds
            names = [Path(p).stem for p in seq.frames]
            files = [(out / seq.name / f"{name}.png", mask, write_mask)
                     for name, mask in zip(names, masks.numpy())]
            if save_logits:
                (out / "logits").mkdir(parents=True, exist_ok=True)
                np.save(out / "logits" / f"{seq.name}.npy",
                        logits.cpu().numpy().astype(np.float16))
            if save_probabilities:
                probs = (torch.sigmoid(logits) * 255).round().byte().cpu().numpy()
                files += [(out / "probabilities" / seq.name / f"{name}.png", prob, _save_image)
                          for name, prob in zip(names, probs)]
            if save_dilation:
                maps = dilation_maps(model, frames.float() / 255, clip_len, amp_dtype)
                files += [(out / "dilation" / layer / seq.name / f"{name}.png", colormap(m),
                           _save_image)
                          for layer, layer_maps in maps.items()
                          for name, m in zip(names, layer_maps.numpy())]
            for done in writing:
                done.result()                           # raises a failed write here
            writing = [write.submit(save, path, array) for path, array, save in files]
            frames_done += len(names)
            bar.update(len(names))
            if not interactive():
                print(f"segmented {seq.name} ({len(names)} frames, {frames_done}/{bar.total} in "
                      f"all)", flush=True)
        for done in writing:
            done.result()
    bar.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(frames=frames_done, model_s=model_s, total_s=time.perf_counter() - start,
                peak_mib=peak)


def _save_image(path, array):
    """Save a uint8 (H, W) or (H, W, 3) array as a PNG, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def format_tables(global_row, rows):
    """The official tool's printout: the global row, then one row per sequence."""
    lines = ["".join(f"{k:>11s}" for k in global_row),
             "".join(f"{v:11.3f}" for v in global_row.values()), ""]
    width = max([len("Sequence")] + [len(r["Sequence"]) for r in rows])
    lines.append(f"{'Sequence':<{width}s}  J-Mean  F-Mean")
    lines += [f"{r['Sequence']:<{width}s}  {r['J-Mean']:6.3f}  {r['F-Mean']:6.3f}" for r in rows]
    return "\n".join(lines)
