"""DAVIS-style evaluation (SPEC §5): writing and reading result masks, scoring a results folder
against the ground truth, and running a trained model over whole videos.

Results layout, as the official DAVIS evaluation reads it: ``<results>/<sequence>/<frame>.png``,
one indexed PNG per ground-truth frame, 0 background and 1 foreground.
"""
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data import davis_sequences, load_frame, load_mask
from .inference import clip_starts, predict_video, segment
from .layers import D2Conv3d
from .metrics import davis_scores, f_measure, j_measure

PALETTE = [0, 0, 0, 128, 0, 0] + [0] * (256 * 3 - 6)   # DAVIS colours: black, dark red


def write_mask(path, mask):
    """Save a bool (H, W) mask as an indexed PNG with values 0 / 1."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    image.putpalette(PALETTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_prediction(path):
    """A predicted mask as bool (H, W): any value > 0 is foreground (indexed, grayscale 0/1 or
    0/255, RGB with black background all work)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing prediction {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except Exception as error:
        raise ValueError(f"cannot read prediction {path}: {error}") from error
    return (array.max(axis=-1) if array.ndim == 3 else array) > 0


def evaluate_results(davis_root, results, split="val", year=2016, task="unsupervised"):
    """Score ``results`` (``<sequence>/<frame>.png``) against DAVIS ground truth.

    task: "unsupervised" scores every annotated frame; "semi-supervised" drops the first and last.
    Returns (global_row, per_sequence_rows) as ``metrics.davis_scores`` gives them.
    """
    if int(year) != 2016:
        raise ValueError(f"year {year}: only the DAVIS-2016 protocol (one salient object, masks "
                         f"binarised with > 0) is implemented")
    if task not in ("unsupervised", "semi-supervised"):
        raise ValueError(f"task must be 'unsupervised' or 'semi-supervised', got {task!r}")
    results = Path(results)
    per_sequence = {}
    for seq in tqdm(davis_sequences(davis_root, split, year), desc="score", leave=False):
        frames = [i for i, m in enumerate(seq.masks) if m is not None]
        if task == "semi-supervised":
            frames = frames[1:-1]
        if not (results / seq.name).is_dir():
            raise FileNotFoundError(f"no results for sequence {seq.name!r} in {results}")
        preds, gts = [], []
        for i in frames:
            gt = load_mask(seq.masks[i])
            pred_path = results / seq.name / f"{Path(seq.masks[i]).stem}.png"
            pred = read_prediction(pred_path)
            if pred.shape != gt.shape:
                raise ValueError(f"{pred_path} is {pred.shape[1]}x{pred.shape[0]}, its ground "
                                 f"truth {seq.masks[i]} is {gt.shape[1]}x{gt.shape[0]}")
            preds.append(pred)
            gts.append(gt)
        preds, gts = np.stack(preds), np.stack(gts)
        per_sequence[seq.name] = {"J": j_measure(preds, gts), "F": f_measure(preds, gts)}
    return davis_scores(per_sequence)


def _colormap(values, low=0.5, high=3.0):
    """Scalar map (H, W) -> uint8 RGB (H, W, 3): blue (narrow, s <= low) through green (s = 1
    near the middle) to red (wide, s >= high)."""
    t = np.clip((np.log(values) - np.log(low)) / (np.log(high) - np.log(low)), 0, 1)
    rgb = np.stack([np.clip(2 * t - 1, 0, 1), 1 - np.abs(2 * t - 1), np.clip(1 - 2 * t, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


@torch.no_grad()
def dilation_maps(model, frames, clip_len=8, amp_dtype=None):
    """The mean size map of every D2Conv3d layer for every frame.

    frames: (N, 3, H, W) in [0, 1], H and W multiples of 32. Returns {layer name: (N, H, W)
    float32}: each layer's scales (mean over its size channels) upsampled to the frame, from the
    clips starting every ``clip_len`` frames (the last one ending at the last frame).
    """
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
        for start in clip_starts(N, clip_len, clip_len):
            index = torch.arange(start, start + clip_len).clamp(max=N - 1)
            clip = frames[index].transpose(0, 1)[None].to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(clip)
            for name, size in captured.items():
                up = F.interpolate(size, size=(clip_len, H, W), mode="trilinear")[0, 0].cpu()
                maps[name][index] = up
    finally:
        for h in hooks:
            h.remove()
    return maps


def run_model(model, sequences, out, clip_len=8, gap=5, clips_per_batch=4, amp_dtype=None,
              save_logits=False, save_probabilities=False, save_dilation=False):
    """Segment every frame of every sequence into ``out/<sequence>/<frame>.png``.

    Optional: ``out/logits/<sequence>.npy`` (float16 (N, H, W)), ``out/probabilities/<sequence>/
    <frame>.png`` (uint8 probability x 255), ``out/dilation/<layer>/<sequence>/<frame>.png``.
    Returns timing: frames, model seconds (inference only), total seconds, peak GPU MiB.
    """
    out = Path(out)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    frames_done, model_s, start = 0, 0.0, time.time()
    model.eval()
    for seq in sequences:
        frames = torch.from_numpy(np.stack([load_frame(p) for p in seq.frames]))
        frames = frames.permute(0, 3, 1, 2).float() / 255                       # (N, 3, H, W)
        tick = time.time()
        logits = predict_video(model, frames, clip_len, gap, clips_per_batch, amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        model_s += time.time() - tick
        masks = segment(logits).numpy()
        names = [Path(p).stem for p in seq.frames]
        for name, mask in tqdm(list(zip(names, masks)), desc=seq.name, leave=False):
            write_mask(out / seq.name / f"{name}.png", mask)
        if save_logits:
            (out / "logits").mkdir(parents=True, exist_ok=True)
            np.save(out / "logits" / f"{seq.name}.npy", logits.numpy().astype(np.float16))
        if save_probabilities:
            probs = (torch.sigmoid(logits) * 255).round().byte().numpy()
            for name, prob in zip(names, probs):
                path = out / "probabilities" / seq.name / f"{name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(prob, mode="L").save(path)
        if save_dilation:
            padded = F.pad(frames, (0, -frames.shape[-1] % 32, 0, -frames.shape[-2] % 32))
            H, W = frames.shape[-2:]
            for layer, maps in dilation_maps(model, padded, clip_len, amp_dtype).items():
                for name, m in zip(names, maps[:, :H, :W].numpy()):
                    path = out / "dilation" / layer / seq.name / f"{name}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(_colormap(m)).save(path)
        frames_done += len(names)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return dict(frames=frames_done, model_s=model_s, total_s=time.time() - start, peak_mib=peak)


def format_tables(global_row, rows):
    """The official tool's printout: the global row, then one row per sequence."""
    lines = ["".join(f"{k:>11s}" for k in global_row),
             "".join(f"{v:11.3f}" for v in global_row.values()), ""]
    width = max([len("Sequence")] + [len(r["Sequence"]) for r in rows])
    lines.append(f"{'Sequence':<{width}s}  J-Mean  F-Mean")
    lines += [f"{r['Sequence']:<{width}s}  {r['J-Mean']:6.3f}  {r['F-Mean']:6.3f}" for r in rows]
    return "\n".join(lines)
