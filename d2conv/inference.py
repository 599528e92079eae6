"""Whole-video inference by overlapping clips (docs/davis.md).

Clips of ``clip_len`` frames start every ``gap`` frames (and one more ends at the last frame);
each frame's logits are the mean over the clips covering it, every real frame counted once per
clip (a video shorter than a clip is padded by repeating its last frame, and the copies are not
counted).
"""
import contextlib

import torch
import torch.nn.functional as F
from einops import rearrange

from .data.clips import resize
from .model import pad_to_multiple


def clip_starts(num_frames, clip_len=8, gap=5):
    """First frame of every clip: 0, gap, 2*gap, ... and num_frames - clip_len for the tail."""
    if num_frames <= clip_len:
        return [0]
    starts = list(range(0, num_frames - clip_len + 1, gap))
    if starts[-1] != num_frames - clip_len:
        starts.append(num_frames - clip_len)
    return starts


def clip_windows(num_frames, clip_len=8, gap=5):
    """The frame indices of every clip, (clip_len,) int64 each (the last frame repeated in a
    video shorter than a clip)."""
    return [torch.arange(start, start + clip_len).clamp(max=num_frames - 1)
            for start in clip_starts(num_frames, clip_len, gap)]


@torch.no_grad()
def predict_video(model, frames, clip_len=8, gap=5, clips_per_batch=2, amp_dtype=None,
                  size=None):
    """Mean logits of every frame of a video.

    frames: (N, 3, H, W), uint8 in [0, 255] or float in [0, 1], on any device (moved to the
    model's device once). size: (h, w) to run the model at (the training resolution: frames are
    resized to it and the logits back), None for the frames' own size.
    returns: (N, H, W) float32 logits on the model's device.
    """
    device = next(model.parameters()).device
    N, _, H, W = frames.shape
    frames = frames.to(device, non_blocking=True)
    frames = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
    if size is not None:
        frames = resize(frames, tuple(size), "bilinear")
    h, w = frames.shape[-2:]
    # every index on the GPU up front: a copy from pageable host memory inside the loop would
    # wait for the GPU to finish the clips queued before it, each batch
    windows = torch.stack(clip_windows(N, clip_len, gap))              # (clips, clip_len)
    # a clip counts its distinct frames, a prefix (a video shorter than a clip repeats its last)
    real = [len(window.unique()) for window in windows]
    count = torch.bincount(torch.cat([window[:k] for window, k in zip(windows, real)]),
                           minlength=N).float().view(N, 1, 1)
    total = torch.zeros(N, h, w, device=device)
    count, windows = count.to(device), windows.to(device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for b in range(0, len(windows), clips_per_batch):
        batch = windows[b:b + clips_per_batch]
        clips = rearrange(frames[batch], "b t c h w -> b c t h w")
        clips, (rows, cols) = pad_to_multiple(clips)
        with autocast:
            logits = model(clips)[:, 0, :, rows, cols].float()                # (B, T, h, w)
        for index, clip_logits, k in zip(batch, logits, real[b:b + clips_per_batch]):
            total.index_add_(0, index[:k], clip_logits[:k])
    logits = total / count
    return resize_logits(logits, (H, W)) if (h, w) != (H, W) else logits


def segment(logits, threshold=0.5):
    """Binary masks from logits: sigmoid > threshold."""
    return torch.sigmoid(logits) > threshold


def resize_logits(logits, size):
    """(N, H, W) logits -> (N, *size), bilinear."""
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
