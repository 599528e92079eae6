"""Whole-video inference by overlapping clips (SPEC §5).

Clips of ``clip_len`` frames start every ``gap`` frames (and one more ends at the last frame);
each frame's logits are the mean over the clips covering it, every real frame counted once per
clip (a video shorter than a clip is padded by repeating its last frame, and the copies are not
counted).
"""
import contextlib

import torch
import torch.nn.functional as F

from .model import pad_to_multiple


def clip_starts(num_frames, clip_len=8, gap=5):
    """First frame of every clip: 0, gap, 2*gap, ... and num_frames - clip_len for the tail."""
    if num_frames <= clip_len:
        return [0]
    starts = list(range(0, num_frames - clip_len + 1, gap))
    if starts[-1] != num_frames - clip_len:
        starts.append(num_frames - clip_len)
    return starts


@torch.no_grad()
def predict_video(model, frames, clip_len=8, gap=5, clips_per_batch=2, amp_dtype=None):
    """Mean logits of every frame of a video.

    frames: (N, 3, H, W) float in [0, 1] (any device; moved to the model's device clip by clip)
    returns: (N, H, W) float32 logits on the CPU.
    """
    device = next(model.parameters()).device
    N, _, H, W = frames.shape
    total = torch.zeros(N, H, W)
    count = torch.zeros(N, 1, 1)
    windows = []
    for start in clip_starts(N, clip_len, gap):
        index = torch.arange(start, start + clip_len).clamp(max=N - 1)
        windows.append(index)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    for b in range(0, len(windows), clips_per_batch):
        batch = windows[b:b + clips_per_batch]
        clips = torch.stack([frames[i].transpose(0, 1) for i in batch]).to(device)  # (B,3,T,H,W)
        clips, _ = pad_to_multiple(clips)
        with autocast:
            logits = model(clips)[:, 0, :, :H, :W].float().cpu()                  # (B, T, H, W)
        for index, clip_logits in zip(batch, logits):
            real = torch.ones(len(index), dtype=torch.bool)
            real[1:] = index[1:] != index[:-1]          # a repeated last frame counts once
            total.index_add_(0, index[real], clip_logits[real])
            count.index_add_(0, index[real], torch.ones(int(real.sum()), 1, 1))
    return total / count


def segment(logits, threshold=0.5):
    """Binary masks from logits: sigmoid > threshold."""
    return torch.sigmoid(logits) > threshold


def resize_logits(logits, size):
    """(N, H, W) logits -> (N, *size), bilinear."""
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
